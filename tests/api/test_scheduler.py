"""The claim cycle through the API (docs/lifecycle.md#the-claim-cycle,
docs/lifecycle.md#the-claim-cycle): lanes, partitions, reclaim routing.

Both topologies; bounded polling only, no assertion depends on timing.
"""

from __future__ import annotations

import asyncio
import uuid

from flowfabric.server.valkey.ids import solo_partition
from flowfabric.v1 import types_pb2 as t
from tests.api.test_lifecycle import (
    LANE,
    claim_next,
    claim_one,
    create,
    eventually,
    get,
    state,
)
from tests.conftest import Api


async def test_one_call_serves_several_lanes(api: Api) -> None:
    a = await create(api, lane_id="lane-a")
    b = await create(api, lane_id="lane-b")
    lanes = ("lane-a", "lane-b")
    got = {(await claim_one(api, lanes=lanes)).lease.execution_id for _ in range(2)}
    assert got == {a, b}
    assert (await claim_next(api, lanes=lanes)).WhichOneof("outcome") == "no_work"
    # a batch fills itself across lanes
    c = await create(api, lane_id="lane-a")
    d = await create(api, lane_id="lane-b")
    batch = await claim_next(api, lanes=lanes, max_tasks=4)
    assert {task.lease.execution_id for task in batch.batch.tasks} == {c, d}
    assert {task.lease.lane_id for task in batch.batch.tasks} == set(lanes)
    # a worker serving only another lane never sees them
    await create(api, lane_id="lane-a")
    assert (await claim_next(api, lanes=("lane-c",))).WhichOneof("outcome") == "no_work"


async def test_long_poll_wakes_for_any_of_its_lanes(api: Api) -> None:
    waiter = asyncio.ensure_future(claim_next(api, lanes=("lane-a", "lane-b"), wait_ms=5_000))
    await asyncio.sleep(0.2)
    eid = await create(api, lane_id="lane-b")
    reply = await waiter
    assert reply.WhichOneof("outcome") == "task", reply
    assert reply.task.lease.execution_id == eid and reply.task.lease.lane_id == "lane-b"


async def test_work_on_other_partitions_is_found_by_the_rotating_window(api: Api) -> None:
    partitions = api.server.config.flow_partitions
    solo = solo_partition(LANE, partitions)
    # ids minted on partitions other than the lane's solo partition (e.g. flow members)
    targets = {(solo + partitions // 2) % partitions, (solo + 1) % partitions}
    created = {await create(api, execution_id=f"{{fp:{p}}}:{uuid.uuid4()}") for p in targets}
    claimed: set[str] = set()

    async def all_claimed() -> bool:
        reply = await claim_next(api)
        if reply.WhichOneof("outcome") == "task":
            claimed.add(reply.task.lease.execution_id)
        return claimed == created

    # every partition is probed within ceil(P / 32) rotation windows of 250 ms
    await eventually(all_claimed, "the rotating window to reach every partition")


async def test_reclaim_skips_an_incapable_worker_without_starving_a_capable_one(
    api: Api,
) -> None:
    policy = t.ExecutionPolicy(
        routing_requirements=t.RoutingRequirements(required_capabilities=["gpu"])
    )
    eid = await create(api, policy=policy)
    crashed = await claim_one(api, "gpu-1", caps=("gpu",), lease_ttl_ms=100)
    assert crashed.lease.execution_id == eid

    async def lease_due() -> bool:
        # an incapable worker is never handed the execution, however often it asks
        assert (await claim_next(api, "cpu-1")).WhichOneof("outcome") == "no_work"
        ownership = (await get(api, eid)).state_vector.ownership_state
        return bool(ownership == t.OWNERSHIP_STATE_LEASE_EXPIRED_RECLAIMABLE)

    await eventually(lease_due, "the incapable worker's claim to mark the lease expired")
    assert await state(api, eid) == t.PUBLIC_STATE_ACTIVE
    # the capable worker reclaims it at once: the incapable worker's mismatch parks the
    # candidate for that capability set only
    task = await claim_one(api, "gpu-2", caps=("gpu",))
    assert task.lease.execution_id == eid and task.attempt_type == t.ATTEMPT_TYPE_RECLAIM
    assert task.lease.lease_epoch == 2


async def test_batch_claim_carries_inputs_and_blocks_what_the_worker_cannot_run(api: Api) -> None:
    policy = t.ExecutionPolicy(
        routing_requirements=t.RoutingRequirements(required_capabilities=["gpu"])
    )
    gpu = await create(api, policy=policy, priority=9)
    low = await create(api, input_payload=b"\x00a", tags={"app.k": "a"}, priority=1)
    high = await create(api, input_payload=b"\x00b", payload_encoding="raw", priority=5)
    reply = await claim_next(api, caps=("cpu",), max_tasks=4)
    tasks = reply.batch.tasks
    assert [task.lease.execution_id for task in tasks] == [high, low], "priority order"
    assert (tasks[0].payload, tasks[0].payload_encoding, tasks[0].priority) == (b"\x00b", "raw", 5)
    assert (tasks[1].payload, dict(tasks[1].tags), tasks[1].priority) == (
        b"\x00a",
        {"app.k": "a"},
        1,
    )
    for task in tasks:
        assert task.attempt_type == t.ATTEMPT_TYPE_INITIAL and not task.resumed
        assert task.lease.lease_epoch == 1 and task.execution_kind == "demo"
        assert await state(api, task.lease.execution_id) == t.PUBLIC_STATE_ACTIVE
    # the head no connected capability can take is moved out of the way, not claimed
    info = await get(api, gpu)
    assert info.state_vector.eligibility_state == t.ELIGIBILITY_STATE_BLOCKED_BY_ROUTE
    assert not info.HasField("started_at")
