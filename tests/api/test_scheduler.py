"""The claim cycle through the API (docs/lifecycle.md#the-claim-cycle,
docs/lifecycle.md#the-claim-cycle): lanes, partitions, reclaim routing.

Both topologies; bounded polling only, no assertion depends on timing.
"""

from __future__ import annotations

import asyncio
import uuid

from flowfabric.server.valkey.ids import parse_execution_id, solo_partition
from flowfabric.server.valkey.keys import PartitionKeys
from flowfabric.server.valkey.store import server_time_ms
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
from tests.conftest import FAST_SCANNERS, Api


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


async def test_an_expired_lease_is_reclaimed_within_its_bound_behind_a_backlog(
    engine_api: Api,
) -> None:
    """Reclaim with a bound: a steady inflow keeps the lane's backlog non-empty, a worker holding
    a lease stops renewing, and another worker reclaims it within the lease TTL + the expiry
    scanner's interval + one claim (Valkey time)."""
    api, ttl = engine_api, 1_000
    interval = FAST_SCANNERS["FF_LEASE_EXPIRY_INTERVAL_MS"]
    for _ in range(10):
        await create(api)
    crashed = (await claim_one(api, "crashed-1", lease_ttl_ms=ttl)).lease
    acquired = crashed.lease_expires_at - ttl
    eid = parse_execution_id(crashed.execution_id, api.server.config.flow_partitions)
    eligible = PartitionKeys(eid.tag).lane(LANE, "eligible")
    longest_claim = 0
    while True:
        await create(api)  # the inflow: one new execution per claim taken
        assert await api.store.call("ZCARD", eligible) > 0, "the backlog stays non-empty"
        started = await server_time_ms(api.store)
        task = await claim_one(api, "busy-1", lease_ttl_ms=60_000)
        ended = await server_time_ms(api.store)
        longest_claim = max(longest_claim, ended - started)
        if task.lease.execution_id == crashed.execution_id:
            break
        assert ended - acquired < ttl + 10_000, "the expired lease was never reclaimed"
    assert task.attempt_type == t.ATTEMPT_TYPE_RECLAIM and task.lease.lease_epoch == 2
    assert ended - acquired <= ttl + interval + longest_claim, (ended - acquired, longest_claim)
