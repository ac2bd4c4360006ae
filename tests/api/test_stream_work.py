"""WorkerService.StreamWork: server-pushed work with at most `max_in_flight` unfinished tasks.

Both topologies. A task frees its slot once its execution leaves the lease the stream handed out
(complete, fail, suspend, delay, operator cancel, revoke or lease expiry); no assertion depends
on timing. Each test serves a lane of its own: the server can learn of a client's cancel only at
its next write to the stream, so a cancelled stream of one test may still claim on its lanes.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import grpc
import pytest

from flowfabric.server.engine.scanners import server_time_ms
from flowfabric.v1 import execution_pb2 as pb
from flowfabric.v1 import types_pb2 as t
from flowfabric.v1 import worker_pb2 as wpb
from tests.api.suspend_util import suspend
from tests.api.test_lifecycle import (
    WORKER,
    complete,
    describe,
    eventually,
    fail,
    get,
    state,
)
from tests.api.test_lifecycle import create as lifecycle_create
from tests.api.test_watches import small_api  # noqa: F401 (fixture)
from tests.api.util import error_info, expect_error, keyspace_size
from tests.conftest import Api

C = grpc.StatusCode
CURRENT = {"lane": ""}


@pytest.fixture(autouse=True)
def own_lane() -> str:
    CURRENT["lane"] = f"sw-{uuid.uuid4().hex[:12]}"
    return CURRENT["lane"]


def create(api: Api, **fields: Any) -> Any:
    fields.setdefault("lane_id", CURRENT["lane"])
    return lifecycle_create(api, **fields)


def stream_work(
    api: Api,
    instance: str = "w-1",
    *,
    lanes: tuple[str, ...] = (),
    caps: tuple[str, ...] = (),
    max_in_flight: int = 0,
    **kw: Any,
) -> Any:
    return api.worker.StreamWork(
        wpb.StreamWorkRequest(
            worker_id=WORKER, worker_instance_id=instance,
            lane_ids=list(lanes or (CURRENT["lane"],)),
            capabilities=list(caps), max_in_flight=max_in_flight, **kw,
        ),
        metadata=api.metadata,
    )  # fmt: skip


async def take(call: Any, n: int) -> list[t.ClaimedTask]:
    """The next `n` tasks of the stream (bounded: a missing task fails the test)."""
    out = []
    async with asyncio.timeout(10):
        for _ in range(n):
            reply = await call.read()
            assert reply is not grpc.aio.EOF
            out.append(reply.task)
    return out


async def test_tasks_arrive_in_priority_order_up_to_max_in_flight(api: Api) -> None:
    by_priority = {p: await create(api, priority=p) for p in (1, 9, 5, 3)}
    call = stream_work(api, max_in_flight=2)
    try:
        first = await take(call, 2)
        assert [task.priority for task in first] == [9, 5]
        assert [task.lease.execution_id for task in first] == [by_priority[9], by_priority[5]]
        assert all(task.lease.worker_instance_id == "w-1" for task in first)
        assert all(task.lease.lease_ttl_ms == 30_000 for task in first)
        # two slots are taken: the others stay waiting until one frees
        for p in (3, 1):
            assert await state(api, by_priority[p]) == t.PUBLIC_STATE_WAITING
        await complete(api, first[0].lease)
        [third] = await take(call, 1)
        assert third.lease.execution_id == by_priority[3]
        assert await state(api, by_priority[1]) == t.PUBLIC_STATE_WAITING
        await complete(api, first[1].lease)
        [fourth] = await take(call, 1)
        assert fourth.lease.execution_id == by_priority[1]
        # new work reaches the open stream once a slot is free
        await complete(api, third.lease)
        late = await create(api)
        [fifth] = await take(call, 1)
        assert fifth.lease.execution_id == late
        assert await state(api, late) == t.PUBLIC_STATE_ACTIVE
    finally:
        call.cancel()


async def test_default_max_in_flight_is_one(api: Api) -> None:
    a, b = await create(api, priority=2), await create(api, priority=1)
    call = stream_work(api)
    try:
        [first] = await take(call, 1)
        assert first.lease.execution_id == a
        assert await state(api, b) == t.PUBLIC_STATE_WAITING
        await complete(api, first.lease)
        [second] = await take(call, 1)
        assert second.lease.execution_id == b
    finally:
        call.cancel()


async def test_suspend_delay_fail_free_their_slots(api: Api) -> None:
    eids = [await create(api, priority=p) for p in (9, 8, 7, 6)]
    call = stream_work(api, max_in_flight=1)
    try:
        [one] = await take(call, 1)
        assert one.lease.execution_id == eids[0]
        assert (await suspend(api, one.lease, "go")).WhichOneof("outcome") == "suspended"
        [two] = await take(call, 1)
        assert two.lease.execution_id == eids[1]
        now = await server_time_ms(api.store)
        await api.worker.DelayExecution(
            wpb.DelayExecutionRequest(lease=two.lease, delay_until=now + 60_000),
            metadata=api.metadata,
        )
        [three] = await take(call, 1)
        assert three.lease.execution_id == eids[2]
        await fail(api, three.lease, "permanent")
        [four] = await take(call, 1)
        assert four.lease.execution_id == eids[3]
    finally:
        call.cancel()


async def test_operator_cancel_and_revoke_free_their_slots(api: Api) -> None:
    eids = [await create(api, priority=p) for p in (9, 8, 7)]
    call = stream_work(api, max_in_flight=1)
    try:
        [one] = await take(call, 1)
        await api.execution.CancelExecution(
            pb.CancelExecutionRequest(execution_id=one.lease.execution_id, reason="ops"),
            metadata=api.metadata,
        )
        [two] = await take(call, 1)
        assert two.lease.execution_id == eids[1]
        await api.execution.RevokeLease(
            pb.RevokeLeaseRequest(execution_id=eids[1], expected_lease_id=two.lease.lease_id),
            metadata=api.metadata,
        )
        # the revoked execution may be reclaimed again by this same stream: either way the
        # slot frees and the stream hands out one more task, never two at once
        [three] = await take(call, 1)
        assert three.lease.execution_id in (eids[1], eids[2])
        assert three.lease.lease_id != two.lease.lease_id
    finally:
        call.cancel()


async def test_stream_serves_several_lanes(api: Api, own_lane: str) -> None:
    lanes = (f"{own_lane}-a", f"{own_lane}-b")
    a = await create(api, lane_id=lanes[0])
    b = await create(api, lane_id=lanes[1])
    call = stream_work(api, lanes=lanes, max_in_flight=4)
    try:
        got = await take(call, 2)
        assert {task.lease.execution_id for task in got} == {a, b}
        assert {task.lease.lane_id for task in got} == set(lanes)
    finally:
        call.cancel()


async def test_capability_routing_as_claim_next(engine_api: Api) -> None:
    api = engine_api
    policy = t.ExecutionPolicy(
        routing_requirements=t.RoutingRequirements(required_capabilities=["gpu"])
    )
    gpu = await create(api, policy=policy, priority=9)
    plain = await create(api, priority=1)
    cpu = stream_work(api, "cpu-1", max_in_flight=4)
    try:
        [task] = await take(cpu, 1)
        assert task.lease.execution_id == plain
        snap = await describe(api, gpu)
        assert snap.blocking_reason == t.BLOCKING_REASON_WAITING_FOR_CAPABLE_WORKER
    finally:
        cpu.cancel()
    await api.worker.RegisterWorker(
        wpb.RegisterWorkerRequest(
            worker_id=WORKER, worker_instance_id="gpu-1", capabilities=["gpu"],
            lane_ids=[CURRENT["lane"]], lease_ttl_ms=10_000,
        ),
        metadata=api.metadata,
    )  # fmt: skip

    async def unblocked() -> bool:
        return (await get(api, gpu)).state_vector.eligibility_state == (
            t.ELIGIBILITY_STATE_ELIGIBLE_NOW
        )

    await eventually(unblocked, "the unblock scanner to re-admit the execution")
    call = stream_work(api, "gpu-1", caps=("gpu",))
    try:
        [task] = await take(call, 1)
        assert task.lease.execution_id == gpu
    finally:
        call.cancel()


async def test_cancel_ends_the_stream_and_keeps_the_leases(api: Api) -> None:
    eid = await create(api)
    call = stream_work(api, max_in_flight=2)
    [task] = await take(call, 1)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call.read()
    assert call.cancelled()
    # the worker still owns its task: it completes with the streamed lease
    assert await state(api, eid) == t.PUBLIC_STATE_ACTIVE
    done = await complete(api, task.lease)
    assert done.WhichOneof("outcome") == "completed"


async def test_validation_errors(api: Api) -> None:
    await create(api)
    before = await keyspace_size(api.store)
    bad: list[dict[str, Any]] = [
        {"lanes": ("",)},
        {"lanes": ("x" * 65,)},
        {"max_in_flight": 1001},
        {"grant_ttl_ms": 60_001},
    ]
    for kw in bad:
        await expect_error(first_reply(stream_work(api, **kw)), C.INVALID_ARGUMENT,
                           "invalid_input")  # fmt: skip
    await expect_error(first_reply(stream_work(api, "")), C.INVALID_ARGUMENT, "invalid_input")
    no_lanes = api.worker.StreamWork(
        wpb.StreamWorkRequest(worker_id=WORKER, worker_instance_id="w-1"), metadata=api.metadata
    )
    await expect_error(first_reply(no_lanes), C.INVALID_ARGUMENT, "invalid_input")
    assert await keyspace_size(api.store) == before


async def first_reply(call: Any) -> Any:
    async with asyncio.timeout(10):
        return await call.read()


async def test_shutdown_ends_the_stream_unavailable(small_api: Api) -> None:  # noqa: F811
    api = small_api
    await create(api)
    call = stream_work(api, max_in_flight=2)
    await take(call, 1)
    stop = asyncio.create_task(api.server.stop())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async with asyncio.timeout(10):
            await call.read()
    assert caught.value.code() == C.UNAVAILABLE
    assert error_info(caught.value).reason == "shutting_down"
    await stop


async def test_lease_expiry_frees_the_slot(engine_api: Api) -> None:
    api = engine_api
    first, second = await create(api, priority=9), await create(api, priority=1)
    call = stream_work(api, max_in_flight=1, lease_ttl_ms=200)
    try:
        [one] = await take(call, 1)
        assert one.lease.execution_id == first
        # the worker never renews: the scanner marks the lease expired, which frees the slot
        [two] = await take(call, 1)
        assert two.lease.execution_id in (first, second)
        assert two.lease.lease_id != one.lease.lease_id
        # the expired lease is fenced out
        with pytest.raises(grpc.aio.AioRpcError):
            await complete(api, one.lease)
    finally:
        call.cancel()
