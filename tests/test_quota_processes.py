"""A concurrency cap across processes (docs/budgets.md#accuracy): three workers claim through
two server processes on one Valkey against a cap of 2, and no more than two jobs ever hold a
lease at once. Releases travel between the servers on the ready channel; the scanners are off,
so only the event path frees and hands on slots."""

from __future__ import annotations

import asyncio
import uuid

import grpc

from flowfabric.v1 import (
    budget_pb2,
    budget_pb2_grpc,
    execution_pb2,
    execution_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from tests.test_unblock_processes import servers  # noqa: F401  (the fixture)

CAP, JOBS, WORKERS = 2, 24, 3


def claim(instance: str) -> worker_pb2.ClaimNextRequest:
    return worker_pb2.ClaimNextRequest(
        worker_id="pool", worker_instance_id=instance, lane_ids=["capped"],
        lease_ttl_ms=30_000, wait_ms=1_000,
    )  # fmt: skip


async def test_a_cap_of_two_holds_for_three_workers_on_two_servers(
    servers: list[str],  # noqa: F811
) -> None:
    channels = [grpc.aio.insecure_channel(a) for a in servers]
    stubs = [worker_pb2_grpc.WorkerServiceStub(c) for c in channels]
    qid = str(uuid.uuid4())
    await budget_pb2_grpc.BudgetServiceStub(channels[0]).CreateQuotaPolicy(
        budget_pb2.CreateQuotaPolicyRequest(
            quota_policy_id=qid, window_seconds=1, max_concurrent=CAP
        )
    )
    execs = execution_pb2_grpc.ExecutionServiceStub(channels[1])
    for _ in range(JOBS):
        await execs.CreateExecution(
            execution_pb2.CreateExecutionRequest(
                execution_kind="job", lane_id="capped", quota_policy_id=qid
            )
        )
    running, peak, done = 0, 0, 0

    async def worker(n: int) -> None:
        nonlocal running, peak, done
        while done < JOBS:
            stub = stubs[(n + done) % 2]  # alternate servers
            reply = await stub.ClaimNext(claim(f"w-{n}"))
            if reply.WhichOneof("outcome") != "task":
                continue
            running += 1
            peak = max(peak, running)
            assert running <= CAP, f"{running} jobs hold a lease under a cap of {CAP}"
            await asyncio.sleep(0.05)
            running -= 1  # before the call that ends the lease (and frees the slot)
            lease = reply.task.lease
            if done % 3:
                await stub.CompleteExecution(
                    worker_pb2.CompleteExecutionRequest(lease=lease, result_payload=b"ok")
                )
            else:
                await stub.FailExecution(
                    worker_pb2.FailExecutionRequest(
                        lease=lease, failure_reason="x", failure_category="permanent"
                    )
                )
            done += 1

    try:
        await asyncio.wait_for(asyncio.gather(*(worker(n) for n in range(WORKERS))), 120)
        assert done >= JOBS and peak == CAP, (done, peak)
    finally:
        for channel in channels:
            await channel.close()
