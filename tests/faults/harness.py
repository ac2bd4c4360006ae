"""What the fault scenarios are built from: real processes, a retrying inflow and a store audit.

- `ServerProcess`: `flowfabric serve` in a subprocess on a fixed port, so a restart after a
  kill -9 keeps the address its clients dial.
- `WorkerProcess`: `fault_worker.py` (an SDK `Worker`) in a subprocess; every handler run is
  a line in a runs file.
- `Inflow`: a steady rate of creates from SDK clients; each create has an idempotency key and
  is retried on UNAVAILABLE / DEADLINE_EXCEEDED until it is acknowledged, so a retried create
  is never a second execution. Only what the server answered OK counts as acknowledged.
- `audit`: reads every acknowledged execution back from Valkey (core, lease history,
  attempts) and counts what the assertions need: missing, not terminal, completions per
  execution, and double transitions (a lease epoch issued, expired or reclaimed twice).
- `valkey_servers_on`: the valkey-server processes working in a data dir (from /proc).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import grpc

from flowfabric import Client, FlowFabricError, Submitted
from flowfabric.server.embedded import PID_FILE, free_port
from flowfabric.server.valkey.codec import text
from flowfabric.server.valkey.ids import parse_execution_id
from flowfabric.server.valkey.keys import ExecKeys
from flowfabric.server.valkey.store import Store

CLI = [sys.executable, "-c", "from flowfabric.cli import main; main()"]
WORKER_SCRIPT = Path(__file__).with_name("fault_worker.py")
#: The environment of every child: ours without FF_* (each scenario sets its own).
BASE_ENV = {k: v for k, v in os.environ.items() if not k.startswith("FF_")}
HMAC_SECRET = "ab" * 32
PARTITIONS = 16
#: Released reasons that end an execution (docs/lifecycle.md#lease-release).
TERMINAL_RELEASES = ("completed", "failed_terminal", "cancelled", "max_reclaims_exceeded")
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def now_ms() -> int:
    """Wall-clock ms: comparable with Valkey `TIME` on the same machine."""
    return int(time.time() * 1000)


# -- processes --------------------------------------------------------------------------------


class ServerProcess:
    """`flowfabric serve` in a subprocess, on `port` (a free one by default) for its whole
    life: `restart()` after `kill()` comes back on the same address."""

    def __init__(self, log_dir: Path, name: str, env: dict[str, str], port: int = 0) -> None:
        self.log_path = log_dir / f"{name}.log"
        # one partition per lane: the scenarios read a lane's keys on its home partition
        self.env = {**BASE_ENV, "FF_FLOW_PARTITIONS": str(PARTITIONS), "FF_LANE_SPREAD": "1", **env}
        self.port = port or free_port()
        self.proc: subprocess.Popen[str] | None = None
        self.starts = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> ServerProcess:
        with self.log_path.open("a") as log:
            self.proc = subprocess.Popen(
                [*CLI, "serve", "--listen-addr", self.address],
                env=self.env, stdout=subprocess.PIPE, stderr=log, text=True,
            )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"server did not start:\n{self.log_tail()}")
        self.starts += 1
        return self

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text()[-chars:] if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: the crash (no shutdown path runs)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._close()

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait: a graceful exit (code 0)."""
        code = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    code = self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            else:
                code = self.proc.returncode
        self._close()
        return code

    def _close(self) -> None:
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()


class WorkerProcess:
    """`fault_worker.py` in a subprocess; its runs file says which executions it ran."""

    def __init__(
        self,
        address: str,
        log_dir: Path,
        worker_id: str,
        *,
        concurrency: int = 4,
        lease_ttl_ms: int = 2000,
        sleep_ms: int = 100,
        lane: str = "default",
    ) -> None:
        self.worker_id = worker_id
        self.runs_path = log_dir / f"{worker_id}.runs"
        self.log_path = log_dir / f"{worker_id}.log"
        self.argv = [
            sys.executable, str(WORKER_SCRIPT), address, "--worker-id", worker_id,
            "--instance-id", f"{worker_id}-{os.getpid()}", "--lane", lane,
            "--concurrency", str(concurrency), "--lease-ttl-ms", str(lease_ttl_ms),
            "--sleep-ms", str(sleep_ms), "--runs", str(self.runs_path),
        ]  # fmt: skip
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> WorkerProcess:
        with self.log_path.open("a") as log:
            self.proc = subprocess.Popen(
                self.argv, env=BASE_ENV, stdout=subprocess.PIPE, stderr=log, text=True
            )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"worker {self.worker_id} did not start:\n{self.log_tail()}")
        return self

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text()[-chars:] if self.log_path.exists() else ""

    def runs(self) -> list[tuple[float, str, int, str]]:
        """(unix s, execution id, attempt index, attempt type) per handler run."""
        if not self.runs_path.exists():
            return []
        out = []
        for line in self.runs_path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 5:
                out.append((float(parts[0]), parts[1], int(parts[2]), parts[3]))
        return out

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._close()

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close()

    def _close(self) -> None:
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()


@contextlib.contextmanager
def reaped(*groups: Iterable[ServerProcess | WorkerProcess]) -> Iterator[None]:
    """Whatever a scenario started is stopped at the end, however it ends."""
    try:
        yield
    finally:
        for group in groups:
            for proc in group:
                proc.stop(timeout=15)


def valkey_servers_on(data_dir: Path) -> list[int]:
    """Pids of valkey-server processes working in `data_dir`. Valkey rewrites its process
    title, so the executable and the working directory (it chdirs into `--dir`) identify it."""
    want = data_dir.resolve()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            exe = Path(os.readlink(entry / "exe")).name
            cwd = Path(os.readlink(entry / "cwd"))
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if "valkey-server" in exe and cwd == want and state not in ("Z", "X"):
            pids.append(int(entry.name))
    return pids


def embedded_url(data_dir: Path) -> str:
    """The URL (with its generated password) of the embedded Valkey of a data dir."""
    password = (data_dir / "valkey_password").read_text().strip()
    pid = int((data_dir / PID_FILE).read_text())
    # the rewritten title is `valkey-server 127.0.0.1:<port>`
    title = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[0]
    port = title.rsplit(":", 1)[1].split()[0]
    return f"valkey://:{password}@127.0.0.1:{port}"


# -- the inflow -------------------------------------------------------------------------------


@dataclass
class Ack:
    key: str
    execution_id: str
    at_ms: int
    duplicate: bool


Submit = Callable[[Client, int, str], Awaitable[Submitted]]


class CodeCounter(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Counts every non-OK status a client's unary calls see on the wire, retried or not."""

    def __init__(self) -> None:
        self.codes: Counter[str] = Counter()

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        call = await continuation(details, request)
        try:
            await call
        except grpc.aio.AioRpcError as exc:
            self.codes[exc.code().name] += 1
        return call


@dataclass
class Inflow:
    """Creates at `rate` per second, spread over `addresses`, until `stop()`.

    The first `burst` creates go out at once. Each create (`submit`, default a `job`) carries
    the idempotency key `<prefix>-<n>` and is retried on a retryable error until acknowledged
    or `give_up_s` passes; a retry that finds the first attempt committed answers `duplicate`
    with the same execution id.
    """

    addresses: Sequence[str]
    rate: float
    prefix: str
    submit: Submit | None = None
    burst: int = 0  # creates sent at once at the start (a backlog), before the steady rate
    give_up_s: float = 90.0
    acked: dict[str, Ack] = field(default_factory=dict)
    retries: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    error_messages: list[str] = field(default_factory=list)  # the first few, for the report
    abandoned: int = 0
    wire: CodeCounter = field(default_factory=CodeCounter)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None
    _clients: list[Client] = field(default_factory=list)

    async def __aenter__(self) -> Inflow:
        self._clients = [
            Client(a, default_timeout=3.0, interceptors=[self.wire]) for a in self.addresses
        ]
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
        for c in self._clients:
            await c.close()

    @property
    def count(self) -> int:
        return len(self.acked)

    def acked_ids(self) -> list[str]:
        return [a.execution_id for a in self.acked.values()]

    async def stop(self) -> None:
        """No new creates; the ones in flight finish (or give up)."""
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None

    async def wait_for(self, n: int, within: float = 60.0) -> None:
        await until(lambda: self.count >= n, within, f"{n} acknowledged creates")

    def max_gap_ms(self, since_ms: int = 0) -> int:
        """The longest stretch without an acknowledgement among creates acked after
        `since_ms` (the outage a client saw)."""
        times = sorted(a.at_ms for a in self.acked.values() if a.at_ms >= since_ms)
        return max((b - a for a, b in itertools.pairwise(times)), default=0)

    async def _run(self) -> None:
        pending: set[asyncio.Task[None]] = set()
        n = 0
        started = time.monotonic()
        while not self._stop.is_set():
            due = started + max(n - self.burst, 0) / self.rate
            delay = due - time.monotonic()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
                continue
            task = asyncio.create_task(self._one(n))
            pending.add(task)
            task.add_done_callback(pending.discard)
            n += 1
        if pending:
            await asyncio.gather(*pending)

    async def _one(self, n: int) -> None:
        key = f"{self.prefix}-{n}"
        client = self._clients[n % len(self._clients)]
        give_up = time.monotonic() + self.give_up_s
        while True:
            try:
                if self.submit is not None:
                    sub = await self.submit(client, n, key)
                else:
                    sub = await client.submit("job", {}, idempotency_key=key)
            except FlowFabricError as exc:
                if exc.code in RETRYABLE and time.monotonic() < give_up:
                    self.retries += 1
                    # the next client: with several servers, another may be up
                    client = self._clients[(n + self.retries) % len(self._clients)]
                    await asyncio.sleep(0.2)
                    continue
                if exc.code in RETRYABLE:
                    self.abandoned += 1
                else:
                    self.errors[exc.reason or exc.code.name] += 1
                    if len(self.error_messages) < 5:
                        self.error_messages.append(f"{exc.reason}: {exc.message}")
                return
            self.acked[key] = Ack(key, sub.execution_id, now_ms(), sub.duplicate)
            return


async def until(check: Callable[[], bool], within: float, what: str) -> None:
    end = time.monotonic() + within
    while not check():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.05)


# -- the store audit --------------------------------------------------------------------------


@dataclass
class Audit:
    """What the store says about one execution."""

    execution_id: str
    core: dict[str, str]
    history: list[dict[str, str]]
    attempt_states: list[str]

    @property
    def exists(self) -> bool:
        return bool(self.core)

    @property
    def terminal(self) -> bool:
        return self.core.get("lifecycle_phase") == "terminal"

    @property
    def outcome(self) -> str:
        return self.core.get("terminal_outcome", "")

    def events(self, name: str) -> list[dict[str, str]]:
        return [e for e in self.history if e.get("event") == name]

    @property
    def completions(self) -> int:
        return sum(1 for e in self.events("released") if e.get("reason") == "completed")

    @property
    def terminal_releases(self) -> int:
        reasons = [e.get("reason", "") for e in self.events("released")]
        return sum(1 for r in reasons if r in TERMINAL_RELEASES or r.startswith("expired:"))

    @property
    def issued_epochs(self) -> list[str]:
        got = [e.get("lease_epoch", "") for e in self.events("acquired")]
        return got + [e.get("new_lease_epoch", "") for e in self.events("reclaimed")]

    def double_transitions(self) -> list[str]:
        """Each lease epoch is issued once, and expired, reclaimed and released at most once;
        at most one terminal release; at most one successful attempt."""
        found = []
        for what, epochs in (
            ("issued", self.issued_epochs),
            ("expired", [e.get("lease_epoch", "") for e in self.events("expired")]),
            ("reclaimed", [e.get("old_lease_epoch", "") for e in self.events("reclaimed")]),
            ("released", [e.get("lease_epoch", "") for e in self.events("released")]),
        ):
            found += [f"{what} twice: epoch {ep}" for ep, k in Counter(epochs).items() if k > 1]
        if self.terminal_releases > 1:
            found.append(f"{self.terminal_releases} terminal releases")
        if self.attempt_states.count("ended_success") > 1:
            found.append("two successful attempts")
        return found

    def reclaims_of(self, worker_id: str) -> list[tuple[int, int | None]]:
        """(lease acquired ms, reclaimed ms or None) for each lease `worker_id` held that was
        not released by a terminal call: the leases a crash of that worker left behind."""
        released = {e.get("lease_epoch") for e in self.events("released")}
        reclaimed = {e.get("old_lease_epoch"): int(e["ts"]) for e in self.events("reclaimed")}
        out = []
        for e in self.events("acquired") + self.events("reclaimed"):
            epoch = e.get("lease_epoch") if e["event"] == "acquired" else e.get("new_lease_epoch")
            if e.get("worker_id") != worker_id or epoch in released:
                continue
            out.append((int(e["ts"]), reclaimed.get(epoch)))
        return out


async def open_store(url: str) -> Store:
    store = Store.from_url(url)
    if store.cluster:
        await store.client.initialize()
    return store


async def audit(url: str, execution_ids: Sequence[str], chunk: int = 200) -> list[Audit]:
    """Core, lease history and attempt states of each execution, read straight from Valkey."""
    store = await open_store(url)
    out: list[Audit] = []
    try:
        for start in range(0, len(execution_ids), chunk):
            ids = execution_ids[start : start + chunk]
            keys = [ExecKeys(parse_execution_id(eid, PARTITIONS)) for eid in ids]
            pipe = store.pipeline()
            for k in keys:
                pipe.hgetall(k.core)
                pipe.xrange(k.lease_history)
            rows = await store.run_pipeline(pipe)
            cores = [{text(a): text(b) for a, b in raw.items()} for raw in rows[0::2]]
            histories = [
                [{text(a): text(b) for a, b in fields.items()} for _id, fields in entries]
                for entries in rows[1::2]
            ]
            pipe = store.pipeline()
            counts = []
            for k, core in zip(keys, cores, strict=True):
                n = int(core.get("total_attempt_count") or 0)
                counts.append(n)
                for i in range(n):
                    pipe.hget(k.attempt(i), "attempt_state")
            states = [text(s) if s is not None else "" for s in await store.run_pipeline(pipe)]
            pos = 0
            for eid, core, hist, n in zip(ids, cores, histories, counts, strict=True):
                out.append(Audit(eid, core, hist, states[pos : pos + n]))
                pos += n
    finally:
        await store.close()
    return out


@dataclass
class Tally:
    """The counts every scenario reports from its audit."""

    acked: int
    missing: int
    not_terminal: int
    completed: int
    duplicates: int
    double_transitions: int
    outcomes: Counter[str]
    problems: list[str]

    @classmethod
    def of(cls, audits: Sequence[Audit], expect: str = "success") -> Tally:
        problems: list[str] = []
        missing = [a.execution_id for a in audits if not a.exists]
        open_ = [a for a in audits if a.exists and not a.terminal]
        dups = [a for a in audits if a.completions > 1]
        doubles = [(a.execution_id, a.double_transitions()) for a in audits]
        doubles = [d for d in doubles if d[1]]
        problems += [f"missing {eid}" for eid in missing[:5]]
        problems += [
            f"not terminal {a.execution_id}: {a.core.get('public_state')}" for a in open_[:5]
        ]
        problems += [f"{eid}: {what}" for eid, what in doubles[:5]]
        return cls(
            acked=len(audits),
            missing=len(missing),
            not_terminal=len(open_),
            completed=sum(1 for a in audits if a.completions == 1),
            duplicates=len(dups),
            double_transitions=len(doubles),
            outcomes=Counter(a.outcome for a in audits if a.terminal),
            problems=problems,
        )


async def wait_terminal(url: str, execution_ids: Sequence[str], within: float) -> list[Audit]:
    """Audit until every execution is terminal (or `within` s pass); the last audit."""
    end = time.monotonic() + within
    while True:
        audits = await audit(url, execution_ids)
        if all(a.terminal for a in audits) or time.monotonic() > end:
            return audits
        await asyncio.sleep(0.5)


# -- reporting --------------------------------------------------------------------------------


def summary_line(name: str, counts: dict[str, Any]) -> str:
    """`faults: <name> k=v k=v ...` (the line the suite prints per scenario)."""
    parts = " ".join(f"{k}={v}" for k, v in counts.items())
    return f"faults: {name} {parts}"


def append_jsonl(path: Path, name: str, counts: dict[str, Any], out: IO[str] | None = None) -> None:
    record = {"scenario": name, "at": time.strftime("%Y-%m-%dT%H:%M:%S"), **counts}
    with path.open("a") as f:
        f.write(json.dumps(record, sort_keys=False) + "\n")
    if out is not None:
        print(summary_line(name, counts), file=out, flush=True)
