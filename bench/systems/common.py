"""What every driver shares: stdlib only, so it imports in any peer's venv.

* `Resp`: a tiny RESP2 client (INFO, FLUSHALL, CONFIG RESETSTAT) that needs no redis-py.
* `ValkeyStats`: `INFO commandstats cpu` snapshots and their deltas (our own INFO calls removed).
* `Board`: an mmap'd file in /dev/shm where worker processes count finished jobs and publish the
  first-start / last-finish times, so the driver sees "all done" without touching Valkey.
* `WorkerSet`: spawns worker processes, waits until all are ready, says go, waits for done,
  reads their CPU from /proc, says stop. Workers call `worker_ready_then_wait_go()` and
  `install_stop_thread()`.
* `emit()`: the one JSON result line the orchestrator reads.
"""

from __future__ import annotations

import json
import mmap
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

RESULT_PREFIX = "BENCH_RESULT "

# -- RESP ---------------------------------------------------------------------------------------


class Resp:
    """Blocking RESP2 over one socket; enough for the harness's own housekeeping commands."""

    def __init__(self, url: str) -> None:
        u = urlparse(url)
        self.sock = socket.create_connection((u.hostname or "127.0.0.1", u.port or 6379), 10)
        self.buf = self.sock.makefile("rb")

    def close(self) -> None:
        self.buf.close()
        self.sock.close()

    def __call__(self, *args: str | bytes | int) -> object:
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            b = a if isinstance(a, bytes) else str(a).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(b), b))
        self.sock.sendall(b"".join(out))
        return self._read()

    def _read(self) -> object:
        line = self.buf.readline()
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RuntimeError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = self.buf.read(n + 2)[:-2]
            return data
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._read() for _ in range(n)]
        raise RuntimeError(f"unexpected RESP line {line!r}")


# -- Valkey stats -------------------------------------------------------------------------------

# Commands the harness itself sends between snapshots (removed from the per-job counts).
HARNESS_COMMANDS = ("info",)


class ValkeyStats:
    """Snapshots of commandstats + CPU; `delta(a, b)` = what happened between them."""

    def __init__(self, url: str) -> None:
        self.r = Resp(url)

    def snap(self) -> dict:
        raw = self.r("INFO", "commandstats", "cpu")
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        calls: dict[str, int] = {}
        usec: dict[str, int] = {}
        cpu = 0.0
        for line in text.splitlines():
            if line.startswith("cmdstat_"):
                name, _, rest = line[len("cmdstat_") :].partition(":")
                fields = dict(kv.split("=", 1) for kv in rest.split(","))
                calls[name] = int(fields["calls"])
                usec[name] = int(fields.get("usec", 0))
            elif line.startswith(("used_cpu_sys:", "used_cpu_user:")):
                cpu += float(line.split(":", 1)[1])
        return {"calls": calls, "usec": usec, "cpu": cpu, "t": time.time()}

    @staticmethod
    def delta(a: dict, b: dict) -> dict:
        calls = {
            k: b["calls"].get(k, 0) - a["calls"].get(k, 0)
            for k in b["calls"]
            if b["calls"].get(k, 0) - a["calls"].get(k, 0) and k not in HARNESS_COMMANDS
        }
        usec = {k: b["usec"].get(k, 0) - a["usec"].get(k, 0) for k in calls}
        return {
            "commands": sum(calls.values()),
            "by_command": dict(sorted(calls.items(), key=lambda kv: -kv[1])),
            "usec_by_command": usec,
            "cpu_s": round(b["cpu"] - a["cpu"], 6),
            "wall_s": round(b["t"] - a["t"], 6),
        }

    def close(self) -> None:
        self.r.close()


# -- progress board (shared memory between worker processes and the driver) --------------------

HEADER = 64
SLOT = 64
# per worker slot: ready flag (q), jobs finished (q), first job start (d), last job finish (d)
SLOT_FMT = "qqdd"


class Board:
    def __init__(self, path: str, slots: int, create: bool = False) -> None:
        self.path = path
        self.slots = slots
        size = HEADER + SLOT * slots
        if create:
            with open(path, "wb") as f:
                f.write(b"\0" * size)
        self.f = open(path, "r+b")  # noqa: SIM115
        self.mm = mmap.mmap(self.f.fileno(), size)

    # worker side ------------------------------------------------------------------------------
    def ready(self, i: int) -> None:
        struct.pack_into("q", self.mm, HEADER + SLOT * i, 1)

    def read(self, i: int) -> tuple[int, int, float, float]:
        return struct.unpack_from(SLOT_FMT, self.mm, HEADER + SLOT * i)  # type: ignore[return-value]

    def totals(self) -> tuple[int, int, float, float]:
        """(ready workers, finished jobs, earliest first start, latest last finish)."""
        ready = done = 0
        first, last = 0.0, 0.0
        for i in range(self.slots):
            r, d, f, l_ = self.read(i)
            ready += r
            done += d
            if f and (not first or f < first):
                first = f
            last = max(last, l_)
        return ready, done, first, last

    def close(self) -> None:
        self.mm.close()
        self.f.close()


class Progress:
    """A worker process's counter; thread-safe; one `started()` and one `finished()` per job."""

    def __init__(self, board: Board, index: int) -> None:
        self.board = board
        self.off = HEADER + SLOT * index
        self.count = 0
        self.first = 0.0
        self.lock = threading.Lock()

    def started(self) -> float:
        now = time.time()
        if not self.first:
            self.first = now
            struct.pack_into("d", self.board.mm, self.off + 16, now)
        return now

    def finished(self) -> float:
        now = time.time()
        with self.lock:
            self.count += 1
            struct.pack_into("qdd", self.board.mm, self.off + 8, self.count, self.first, now)
        return now


# -- worker-process protocol -------------------------------------------------------------------


def worker_ready_then_wait_go(board: Board, index: int, on_stop=None) -> None:
    """Say ready on the board, block until the driver writes `go` on stdin, then start the
    stop thread (`on_stop()` runs before the process exits on `stop`)."""
    board.ready(index)
    line = sys.stdin.readline()
    if line.strip() != "go":
        os._exit(3)
    install_stop_thread(on_stop)


async def async_ready_then_wait_go(board: Board, index: int, on_stop=None) -> None:
    import asyncio

    await asyncio.get_running_loop().run_in_executor(
        None, worker_ready_then_wait_go, board, index, on_stop
    )


def install_stop_thread(on_stop=None) -> None:
    """A daemon thread: on `stop` (or EOF) on stdin run `on_stop()` then exit the process now.

    Workers are not shut down gracefully: the run is over and the keyspace is flushed next.
    """

    def wait() -> None:
        sys.stdin.readline()
        try:
            if on_stop is not None:
                on_stop()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)

    threading.Thread(target=wait, daemon=True, name="bench-stop").start()


def dump_records(path: str | None, records: dict) -> None:
    """Per-job timestamps for latency runs: {job id: [start, done]} as JSON."""
    if path:
        with open(path, "w") as f:
            json.dump(records, f)


# -- driver side --------------------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of one process (all its threads), from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
        return (int(parts[11]) + int(parts[12])) / CLK_TCK
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return 0.0


def machine_cpu() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, steal seconds) from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system = fields[:3]
    steal = fields[7] if len(fields) > 7 else 0
    # idle, iowait, irq and softirq left out (loopback traffic of the system under test is
    # softirq time that no process is charged for)
    return (user + nice + system) / CLK_TCK, steal / CLK_TCK


def self_cpu() -> float:
    t = os.times()
    return t.user + t.system


class WorkerSet:
    """Worker processes of one system: spawn → all ready → go → all done → stop."""

    def __init__(
        self, argvs: list[list[str]], log_dir: str, env: dict | None = None, records: bool = False
    ) -> None:
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.tmp = tempfile.mkdtemp(prefix="ffbench-", dir=shm)
        self.board = Board(os.path.join(self.tmp, "board"), len(argvs), create=True)
        self.procs: list[subprocess.Popen] = []
        self.log_dir = log_dir
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        for i, argv in enumerate(argvs):
            log = open(os.path.join(log_dir, f"worker-{i}.log"), "ab")  # noqa: SIM115
            full = [*argv, "--board", self.board.path, "--slots-total", str(len(argvs)),
                    "--index", str(i)]  # fmt: skip
            if records:
                full += ["--records", self.records_path(i)]
            self.procs.append(
                subprocess.Popen(
                    full,
                    stdin=subprocess.PIPE,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, **(env or {})},
                )
            )
        self.cpu0: list[float] = []
        self.t_go = 0.0

    def records_path(self, i: int) -> str:
        return os.path.join(self.tmp, f"records-{i}.json")

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while self.board.totals()[0] < len(self.procs):
            self._check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError("workers did not become ready")
            time.sleep(0.01)

    def go(self) -> float:
        self.cpu0 = [proc_cpu(p.pid) for p in self.procs]
        self.t_go = time.time()
        for p in self.procs:
            p.stdin.write(b"go\n")
            p.stdin.flush()
        return self.t_go

    def wait_done(self, jobs: int, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            _, done, first, last = self.board.totals()
            if done >= jobs:
                break
            self._check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"timeout: {done}/{jobs} jobs done")
            time.sleep(0.005)
        cpu1 = [proc_cpu(p.pid) for p in self.procs]
        per = [round(b - a, 3) for a, b in zip(self.cpu0, cpu1, strict=True)]
        return {
            "done": done,
            "t_first_start": first,
            "t_last_finish": last,
            "worker_cpu_s": round(sum(per), 3),
            "worker_cpu_per_process": per,
        }

    def _check_alive(self) -> None:
        for i, p in enumerate(self.procs):
            if p.poll() is not None:
                raise RuntimeError(
                    f"worker {i} exited with {p.returncode}; see {self.log_dir}/worker-{i}.log"
                )

    def stop(self, timeout: float = 15.0) -> None:
        for p in self.procs:
            try:
                p.stdin.write(b"stop\n")
                p.stdin.flush()
                p.stdin.close()
            except (BrokenPipeError, OSError):
                pass
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def records(self) -> dict:
        out: dict = {}
        for i in range(len(self.procs)):
            try:
                with open(self.records_path(i)) as f:
                    out.update(json.load(f))
            except FileNotFoundError:
                pass
        return out

    def close(self) -> None:
        self.board.close()
        for name in os.listdir(self.tmp):
            os.unlink(os.path.join(self.tmp, name))
        os.rmdir(self.tmp)


def percentiles(values: list[float], ps=(50, 95, 99)) -> dict:
    if not values:
        return {f"p{p}": None for p in ps}
    s = sorted(values)
    out = {}
    for p in ps:
        k = max(0, min(len(s) - 1, round(p / 100 * len(s) + 0.5) - 1))  # nearest rank
        out[f"p{p}"] = s[k]
    return out


ACKS: dict[str, float] = {}  # job id -> when the submit call returned (open loop)


def latency_summary(submits: dict, records: dict) -> dict:
    """submit → start and submit → done percentiles in ms, from per-job times in seconds."""
    start, done, ack = [], [], []
    for jid, t0 in submits.items():
        rec = records.get(str(jid))
        if rec is None:
            continue
        start.append((rec[0] - t0) * 1000)
        done.append((rec[1] - t0) * 1000)
        if str(jid) in ACKS:
            ack.append((ACKS[str(jid)] - t0) * 1000)
    return {
        "samples": len(done),
        "submit_call_ms": {k: round(v, 3) for k, v in percentiles(ack).items() if v is not None},
        "submit_to_start_ms": {
            k: round(v, 3) for k, v in percentiles(start).items() if v is not None
        },
        "submit_to_complete_ms": {
            k: round(v, 3) for k, v in percentiles(done).items() if v is not None
        },
    }


def emit(result: dict) -> None:
    sys.stdout.write(RESULT_PREFIX + json.dumps(result) + "\n")
    sys.stdout.flush()


def common_args(parser) -> None:
    parser.add_argument("--url", required=True, help="redis://127.0.0.1:PORT")
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--log-dir", default="/tmp/ffbench-logs")
    parser.add_argument("--mode", choices=("burn", "latency"), default="burn")
    parser.add_argument("--rate", type=float, default=500.0, help="offered jobs/s (latency mode)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds (latency mode)")
    parser.add_argument("--timeout", type=float, default=600.0, help="max seconds to drain")
    # worker-process side (set by WorkerSet)
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--board")
    parser.add_argument("--slots-total", type=int, default=1)
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--records")


def run_burn(args, enqueue, worker_argvs, env=None, extra=None, around=None) -> dict:
    """Burn-down: enqueue everything (timed, Valkey deltas), start the workers, wait until
    all are ready, go, time until every job finished, stop.

    `enqueue()` runs in this process; `extra()` (optional) adds fields after the run;
    `around` (optional) is a pair of callables run at go and at done (e.g. server CPU).
    """
    stats = ValkeyStats(args.url)
    s0, c0, t0 = stats.snap(), self_cpu(), time.time()
    enqueue()
    t1, c1, s1 = time.time(), self_cpu(), stats.snap()
    ws = WorkerSet(worker_argvs, args.log_dir, env=env)
    try:
        ws.wait_ready()
        s2 = stats.snap()
        if around:
            around[0]()
        m0, d0, r0 = machine_cpu(), self_cpu(), replica_cpu()
        ws.go()
        done = ws.wait_done(args.jobs, timeout=args.timeout)
        m1, d1, r1 = machine_cpu(), self_cpu(), replica_cpu()
        s3 = stats.snap()
        aux = around[1]() if around else {}
    finally:
        ws.stop()
        ws.close()
        stats.close()
    d = ValkeyStats.delta
    # CPU used on the machine during the burn-down by anything that is not this system
    # (Valkey, workers, server, this driver): other sessions' load on a shared machine.
    wall = max(s3["t"] - s2["t"], 1e-9)
    ours = (s3["cpu"] - s2["cpu"]) + done["worker_cpu_s"] + (d1 - d0)
    ours += (aux or {}).get("server_cpu_process_s", 0.0) + (r1 - r0)
    foreign = (m1[0] - m0[0]) - ours
    out = {
        "jobs": args.jobs,
        "slots": args.slots,
        "worker_processes": len(worker_argvs),
        "enqueue_s": round(t1 - t0, 4),
        "enqueue_client_cpu_s": round(c1 - c0, 4),
        "process_s": round(done["t_last_finish"] - done["t_first_start"], 4),
        "process_from_go_s": round(done["t_last_finish"] - ws.t_go, 4),
        "worker_cpu_s": done["worker_cpu_s"],
        "worker_cpu_per_process": done["worker_cpu_per_process"],
        "valkey_enqueue": d(s0, s1),
        "valkey_process": d(s2, s3),
        "other_load_cores": round(max(foreign, 0.0) / wall, 3),
        "steal_cores": round((m1[1] - m0[1]) / wall, 3),
        "replica_cpu_process_s": round(r1 - r0, 4),
        **(aux or {}),
    }
    if extra:
        out.update(extra())
    return out


def replica_cpu() -> float:
    """CPU of the Valkey replicas the harness started for this run (FF_BENCH_REPLICA_PIDS):
    part of the system under test, not other load."""
    pids = [int(p) for p in os.environ.get("FF_BENCH_REPLICA_PIDS", "").split(",") if p]
    return sum(proc_cpu(p) for p in pids)


def run_latency(args, open_loop, worker_argvs, env=None, around=None) -> dict:
    """Open loop: workers first, then `open_loop()` submits at the offered rate and returns
    ({job id: submit time}, max scheduling lag); wait until all are done; percentiles.
    `around` (optional): callables run at go and at done (the latter returns extra fields,
    e.g. `server_cpu_process_s`, counted as ours in the other-load figure)."""
    stats = ValkeyStats(args.url)
    ws = WorkerSet(worker_argvs, args.log_dir, env=env, records=True)
    try:
        ws.wait_ready()
        if around:
            around[0]()
        s0, m0, d0 = stats.snap(), machine_cpu(), self_cpu()
        ws.go()
        submits, lag = open_loop()
        done = ws.wait_done(len(submits), timeout=args.timeout + args.duration)
        m1, d1, s1 = machine_cpu(), self_cpu(), stats.snap()
        aux = around[1]() if around else {}
    finally:
        ws.stop()
        stats.close()
    out = latency_summary(submits, ws.records())
    ws.close()
    wall = max(s1["t"] - s0["t"], 1e-9)
    ours = (s1["cpu"] - s0["cpu"]) + done["worker_cpu_s"] + (d1 - d0)
    ours += (aux or {}).get("server_cpu_process_s", 0.0)
    out.update(
        offered_rate=args.rate, duration_s=args.duration, submit_lag_max_s=round(lag, 4),
        other_load_cores=round(max((m1[0] - m0[0]) - ours, 0.0) / wall, 3),
        valkey_cpu_cores=round((s1["cpu"] - s0["cpu"]) / wall, 3),
        worker_cpu_cores=round(done["worker_cpu_s"] / wall, 3),
        **(aux or {}),
    )  # fmt: skip
    if "server_cpu_process_s" in out:
        out["server_cpu_cores"] = round(out["server_cpu_process_s"] / wall, 3)
    return out


async def open_loop_async(rate: float, duration: float, send) -> tuple[dict, float]:
    """Call `await send(i)` (returns the job id) at `rate`/s for `duration` s without waiting
    for earlier sends (open loop); submit time is taken just before each send."""
    import asyncio

    submits: dict[str, float] = {}
    n = int(rate * duration)
    start = time.time() + 0.05
    lag_max = 0.0
    pending: set = set()

    async def one(i: int) -> None:
        t = time.time()
        jid = await send(i)
        submits[str(jid)] = t
        ACKS[str(jid)] = time.time()

    for i in range(n):
        delay = start + i / rate - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            lag_max = max(lag_max, -delay)
        task = asyncio.ensure_future(one(i))
        pending.add(task)
        task.add_done_callback(pending.discard)
    while pending:
        await asyncio.gather(*list(pending))
    return submits, lag_max


def url_from_argv(default: str = "redis://127.0.0.1:6379") -> str:
    """`--url` from the command line, for libraries configured at import time."""
    argv = sys.argv
    for i, a in enumerate(argv):
        if a == "--url" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--url="):
            return a.split("=", 1)[1]
    return default
