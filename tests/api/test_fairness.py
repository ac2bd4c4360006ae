"""Tenant fairness through the server's claim cycle (docs/lifecycle.md#tenant-fairness): ClaimNext
shares a lane between namespaces, also when one of them spreads its work over many flows on other
partitions, and the scheduler hands the configured weights to the claim."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter

from flowfabric.server.engine.claims import ClaimRequest
from flowfabric.server.engine.scheduler import Scheduler
from flowfabric.v1 import flow_pb2 as fpb
from flowfabric.v1 import flow_pb2_grpc
from tests.api.test_budgets import create_quota
from tests.api.test_claim_limits import claim_batch
from tests.api.test_lifecycle import LANE, WORKER, create
from tests.conftest import Api

ROUND = 16


async def create_for(api: Api, namespace: str, n: int) -> set[str]:
    sem = asyncio.Semaphore(32)

    async def one() -> str:
        async with sem:
            return await create(api, namespace=namespace)

    return set(await asyncio.gather(*(one() for _ in range(n))))


async def submit_flows(api: Api, namespace: str, flows: int, members: int) -> None:
    stub = flow_pb2_grpc.FlowServiceStub(api.channel)
    for _ in range(flows):
        reply = await stub.SubmitFlow(
            fpb.SubmitFlowRequest(
                flow_id=str(uuid.uuid4()),
                flow_kind="dag",
                namespace=namespace,
                members=[
                    fpb.SubmitFlowRequest.Member(key=f"m{i}", execution_kind="demo", lane_id=LANE)
                    for i in range(members)
                ],
            ),
            metadata=api.metadata,
        )
        assert reply.WhichOneof("outcome") == "submitted", reply


async def rounds_until(api: Api, wanted: set[str], most: int) -> list[int]:
    """Claim rounds of ROUND tasks; the round (0-based) in which each of `wanted` started."""
    started: list[int] = []
    for r in range(most):
        tasks = await claim_batch(api, ROUND)
        started += [r for task in tasks if task.lease.execution_id in wanted]
    return started


async def test_claim_next_starts_b_within_two_rounds_behind_a(api: Api) -> None:
    await create_for(api, "tenant-a", 300)
    b = await create_for(api, "tenant-b", 10)
    started = await rounds_until(api, b, 2)
    assert len(started) == 10, started


async def test_a_spreading_over_many_flows_does_not_delay_b_past_four_rounds(api: Api) -> None:
    """A's flows live on their own partitions, which a claim pass tries first on every other
    pass once they are announced; B's solo work gets at least every other pass of the lane's
    solo partition, shared there with A's solo work."""
    await create_for(api, "tenant-a", 100)
    await submit_flows(api, "tenant-a", 30, 5)
    b = await create_for(api, "tenant-b", 10)
    started = await rounds_until(api, b, 4)
    assert len(started) == 10, started


async def test_a_spreading_over_many_concurrency_keys_does_not_delay_b(api: Api) -> None:
    """A's backlog carries a per-key quota over 150 keys (2 running per key: none of it is
    blocked), B's work none: the namespaces still share the claims."""
    qid, _ = await create_quota(api, window_seconds=60, max_concurrent=2)
    sem = asyncio.Semaphore(32)

    async def one(i: int) -> str:
        async with sem:
            return await create(
                api, namespace="tenant-a", quota_policy_id=qid, concurrency_key=f"cust-{i % 150}"
            )

    await asyncio.gather(*(one(i) for i in range(300)))
    b = await create_for(api, "tenant-b", 10)
    started = await rounds_until(api, b, 2)
    assert len(started) == 10, started


async def test_the_scheduler_passes_the_configured_weights(api: Api) -> None:
    await create_for(api, "tenant-a", 200)
    await create_for(api, "tenant-b", 200)
    live = api.server.scheduler
    assert live is not None
    scheduler = Scheduler(
        live.functions, api.store, live.partitions, None, tenant_weights={"tenant-a": 3}
    )
    req = ClaimRequest(WORKER, "w-weights", (LANE,), "", 60_000, max_tasks=ROUND)
    got: Counter[str] = Counter()
    for _ in range(10):  # 160 claims
        got.update(task.namespace for task in await scheduler.claim(req))
    assert sum(got.values()) == 160
    assert abs(got["tenant-a"] - 3 * got["tenant-b"]) <= 4, got
