"""The execution lifecycle end to end: real gRPC server, real Valkey, both topologies.

Claims, leases, complete/fail/retry, cancel, revoke and reclaim, delay, replay, priority,
batches, long polls, capability routing, two-step grants, watches and input validation
(docs/lifecycle.md, docs/architecture.md#events-and-watches, docs/architecture.md#error-model,
docs/lifecycle.md#replay-of-a-terminal-call, docs/lifecycle.md#the-claim-cycle,
docs/architecture.md). Scanner-driven behaviour uses `engine_api`
(every scanner at 100 ms); effects are awaited with bounded polling, never fixed sleeps, and no
assertion depends on how fast anything ran.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import pytest

from flowfabric.server.engine.scanners import server_time_ms
from flowfabric.server.valkey.ids import parse_execution_id
from flowfabric.server.valkey.keys import ExecKeys, PartitionKeys
from flowfabric.v1 import execution_pb2 as pb
from flowfabric.v1 import types_pb2 as t
from flowfabric.v1 import worker_pb2 as wpb
from tests.api.util import error_info, expect_error, keyspace_size
from tests.conftest import Api

C = grpc.StatusCode
LANE = "L"
WORKER = "w"
T = TypeVar("T")


# -- helpers ------------------------------------------------------------------------------------


async def create(api: Api, **fields: Any) -> str:
    fields.setdefault("execution_kind", "demo")
    fields.setdefault("lane_id", LANE)
    reply = await api.execution.CreateExecution(
        pb.CreateExecutionRequest(**fields), metadata=api.metadata
    )
    assert reply.WhichOneof("outcome") == "created", reply
    return str(reply.created.execution_id)


async def claim_next(
    api: Api,
    instance: str = "w-1",
    *,
    worker: str = WORKER,
    lanes: tuple[str, ...] = (LANE,),
    caps: tuple[str, ...] = (),
    lease_ttl_ms: int = 30_000,
    wait_ms: int = 0,
    max_tasks: int = 0,
) -> wpb.ClaimNextResponse:
    return await api.worker.ClaimNext(  # type: ignore[no-any-return]
        wpb.ClaimNextRequest(
            worker_id=worker,
            worker_instance_id=instance,
            lane_ids=list(lanes),
            capabilities=list(caps),
            lease_ttl_ms=lease_ttl_ms,
            wait_ms=wait_ms,
            max_tasks=max_tasks,
        ),
        metadata=api.metadata,
    )


async def claim_one(api: Api, instance: str = "w-1", **kw: Any) -> t.ClaimedTask:
    reply = await claim_next(api, instance, **kw)
    assert reply.WhichOneof("outcome") == "task", reply
    return reply.task


async def describe(api: Api, eid: str) -> t.ExecutionSnapshot:
    reply = await api.execution.DescribeExecution(
        pb.DescribeExecutionRequest(execution_id=eid), metadata=api.metadata
    )
    return reply.snapshot


async def get(api: Api, eid: str) -> t.ExecutionInfo:
    reply = await api.execution.GetExecution(
        pb.GetExecutionRequest(execution_id=eid), metadata=api.metadata
    )
    return reply.execution


async def state(api: Api, eid: str) -> int:
    reply = await api.execution.GetExecutionState(
        pb.GetExecutionStateRequest(execution_id=eid), metadata=api.metadata
    )
    return int(reply.public_state)


async def result_of(api: Api, eid: str) -> bytes:
    reply = await api.execution.GetExecutionResult(
        pb.GetExecutionResultRequest(execution_id=eid), metadata=api.metadata
    )
    return bytes(reply.result_payload)


def complete(
    api: Api, lease: t.LeaseHandle, payload: bytes = b"ok"
) -> Awaitable[wpb.CompleteExecutionResponse]:
    return api.worker.CompleteExecution(  # type: ignore[no-any-return]
        wpb.CompleteExecutionRequest(lease=lease, result_payload=payload), metadata=api.metadata
    )


def fail(
    api: Api, lease: t.LeaseHandle, category: str = "transient"
) -> Awaitable[wpb.FailExecutionResponse]:
    return api.worker.FailExecution(  # type: ignore[no-any-return]
        wpb.FailExecutionRequest(lease=lease, failure_reason="boom", failure_category=category),
        metadata=api.metadata,
    )


def renew(api: Api, lease: t.LeaseHandle) -> Awaitable[wpb.RenewLeaseResponse]:
    return api.worker.RenewLease(  # type: ignore[no-any-return]
        wpb.RenewLeaseRequest(lease=lease), metadata=api.metadata
    )


def with_epoch(lease: t.LeaseHandle, epoch: int) -> t.LeaseHandle:
    other = t.LeaseHandle()
    other.CopyFrom(lease)
    other.lease_epoch = epoch
    return other


async def eventually(probe: Callable[[], Awaitable[T]], what: str, within_s: float = 5.0) -> T:
    """Poll `probe` until it returns something truthy (bounded; for scanner effects)."""
    deadline = time.monotonic() + within_s
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def until_state(api: Api, eid: str, public: int) -> None:
    async def probe() -> bool:
        return await state(api, eid) == public

    await eventually(probe, f"{eid} to reach {t.PublicState.Name(public)}")


def keys(eid: str) -> ExecKeys:
    return ExecKeys(parse_execution_id(eid, 1 << 16))


async def core(api: Api, eid: str) -> dict[bytes, bytes]:
    return dict(await api.store.call("HGETALL", keys(eid).core))


def retry_policy(**retry: Any) -> t.ExecutionPolicy:
    return t.ExecutionPolicy(retry_policy=t.RetryPolicy(**retry))


# -- 1. happy path ------------------------------------------------------------------------------


async def test_claim_complete_result_roundtrip(api: Api) -> None:
    eid = await create(api, input_payload=b"\x00in\xff", tags={"app.k": "v"}, priority=3)
    task = await claim_one(api)
    h = task.lease
    assert h.execution_id == eid and h.lane_id == LANE
    assert (h.worker_id, h.worker_instance_id) == (WORKER, "w-1")
    assert h.attempt_index == 0 and h.lease_epoch == 1 and h.lease_ttl_ms == 30_000
    assert task.attempt_type == t.ATTEMPT_TYPE_INITIAL and not task.resumed
    assert task.payload == b"\x00in\xff" and task.execution_kind == "demo"
    assert dict(task.tags) == {"app.k": "v"} and task.priority == 3
    snap = await describe(api, eid)
    assert snap.public_state == t.PUBLIC_STATE_ACTIVE
    assert snap.current_attempt.attempt_index == 0
    assert snap.current_attempt.attempt_id == h.attempt_id
    assert snap.current_lease.lease_epoch == 1
    assert snap.current_lease.worker_instance_id == "w-1"
    assert snap.current_lease.expires_at == h.lease_expires_at
    assert snap.total_attempt_count == 1
    await expect_error(
        api.execution.GetExecutionResult(
            pb.GetExecutionResultRequest(execution_id=eid), metadata=api.metadata
        ),
        C.NOT_FOUND,
        "result_not_found",
    )

    every_byte = bytes(range(256))
    done = await complete(api, h, every_byte)
    assert done.completed.execution_id == eid and not done.replayed
    assert done.completed.public_state == t.PUBLIC_STATE_COMPLETED
    assert await result_of(api, eid) == every_byte
    info = await get(api, eid)
    assert info.public_state == t.PUBLIC_STATE_COMPLETED
    assert info.state_vector.terminal_outcome == t.TERMINAL_OUTCOME_SUCCESS
    assert info.HasField("completed_at") and info.HasField("started_at")
    snap = await describe(api, eid)
    assert not snap.HasField("current_lease")
    assert (await claim_next(api)).WhichOneof("outcome") == "no_work"


# -- 2. worker crash and reclaim ----------------------------------------------------------------


async def test_crashed_worker_is_reclaimed_and_fenced_out(api: Api) -> None:
    eid = await create(api)
    a = (await claim_one(api, "w-A", lease_ttl_ms=200)).lease

    async def reclaim() -> t.ClaimedTask | None:
        reply = await claim_next(api, "w-B")
        return reply.task if reply.WhichOneof("outcome") == "task" else None

    b_task = await eventually(reclaim, "worker B to reclaim the expired lease")
    b = b_task.lease
    assert b.execution_id == eid
    assert b_task.attempt_type == t.ATTEMPT_TYPE_RECLAIM
    assert b.attempt_index == 1 and b.lease_epoch == 2 and b.attempt_id != a.attempt_id
    assert b.worker_instance_id == "w-B"
    # the old instance no longer lists the execution among its leases
    tag = parse_execution_id(eid, 1 << 16).tag
    assert not await api.store.call("SISMEMBER", PartitionKeys(tag).worker_leases("w-A"), eid)
    assert await api.store.call("SISMEMBER", PartitionKeys(tag).worker_leases("w-B"), eid)
    snap = await describe(api, eid)
    assert snap.current_attempt.attempt_index == 1 and snap.current_lease.lease_epoch == 2
    assert snap.current_lease.worker_instance_id == "w-B" and snap.total_attempt_count == 2

    k = keys(eid)
    assert await api.store.call("HGET", k.attempt(0), "attempt_state") == b"interrupted_reclaimed"
    assert await api.store.call("HGET", k.attempt(1), "attempt_type") == b"reclaim"
    await expect_error(complete(api, a, b"from-A"), C.ABORTED, "stale_lease")
    await expect_error(renew(api, a), C.ABORTED, "stale_lease")
    assert (await complete(api, b, b"from-B")).completed.public_state == t.PUBLIC_STATE_COMPLETED
    assert await result_of(api, eid) == b"from-B"


async def test_lease_expiry_scanner_marks_then_reclaim(engine_api: Api) -> None:
    api = engine_api
    eid = await create(api)
    a = (await claim_one(api, "w-A", lease_ttl_ms=200)).lease

    async def marked() -> bool:
        info = await get(api, eid)
        return bool(
            info.state_vector.ownership_state == t.OWNERSHIP_STATE_LEASE_EXPIRED_RECLAIMABLE
        )

    await eventually(marked, "the lease expiry scanner to mark the lease")
    assert await state(api, eid) == t.PUBLIC_STATE_ACTIVE
    await expect_error(renew(api, a), C.ABORTED, "lease_expired")
    again = await api.execution.RevokeLease(
        pb.RevokeLeaseRequest(execution_id=eid), metadata=api.metadata
    )
    assert again.already_satisfied.reason == "already_expired"
    task = await claim_one(api, "w-B")
    assert task.lease.execution_id == eid and task.attempt_type == t.ATTEMPT_TYPE_RECLAIM
    assert task.lease.lease_epoch == 2
    await expect_error(complete(api, a), C.ABORTED, "stale_lease")


async def test_reclaim_limit_fails_the_execution(api: Api) -> None:
    eid = await create(api, policy=t.ExecutionPolicy(max_reclaim_count=1))
    await claim_one(api, "w-A", lease_ttl_ms=100)

    async def reclaim(instance: str) -> t.ClaimedTask | None:
        reply = await claim_next(api, instance, lease_ttl_ms=100)
        return reply.task if reply.WhichOneof("outcome") == "task" else None

    b = await eventually(lambda: reclaim("w-B"), "the first reclaim")
    assert b.attempt_type == t.ATTEMPT_TYPE_RECLAIM and b.lease.execution_id == eid

    async def failed() -> bool:
        assert await reclaim("w-C") is None  # the limit is reached: never handed out
        return await state(api, eid) == t.PUBLIC_STATE_FAILED

    await eventually(failed, "the reclaim limit to fail the execution")
    await expect_error(complete(api, b.lease), C.FAILED_PRECONDITION, "execution_not_active")


# -- 3. replay reconciliation (docs/lifecycle.md#replay-of-a-terminal-call)
# ----------------------------------------------------


async def test_terminal_calls_replay_after_a_lost_reply(api: Api) -> None:
    # complete twice
    eid = await create(api)
    h = (await claim_one(api)).lease
    assert not (await complete(api, h, b"r1")).replayed
    again = await complete(api, h, b"r1")
    assert again.replayed and again.completed.public_state == t.PUBLIC_STATE_COMPLETED
    assert await result_of(api, eid) == b"r1"
    # a holder cancel after that completion is not reconciled
    # (docs/lifecycle.md#replay-of-a-terminal-call)
    info = await expect_error(
        api.worker.CancelLeasedExecution(
            wpb.CancelLeasedExecutionRequest(lease=h, reason="late"), metadata=api.metadata
        ),
        C.FAILED_PRECONDITION,
        "execution_not_active",
    )
    assert info.metadata["terminal_outcome"] == "success"
    assert info.metadata["lifecycle_phase"] == "terminal"

    # terminal fail twice (no retry policy)
    eid = await create(api)
    h = (await claim_one(api)).lease
    first = await fail(api, h)
    assert first.WhichOneof("outcome") == "terminal_failed" and not first.replayed
    second = await fail(api, h)
    assert second.WhichOneof("outcome") == "terminal_failed" and second.replayed
    assert await state(api, eid) == t.PUBLIC_STATE_FAILED

    # fail with a retry scheduled twice: the stored delay_until comes back
    eid = await create(
        api, policy=retry_policy(max_retries=1, backoff=t.Backoff(type="fixed", delay_ms=60_000))
    )
    h = (await claim_one(api)).lease
    first = await fail(api, h)
    assert first.WhichOneof("outcome") == "retry_scheduled" and not first.replayed
    second = await fail(api, h)
    assert second.WhichOneof("outcome") == "retry_scheduled" and second.replayed
    assert second.retry_scheduled.delay_until == first.retry_scheduled.delay_until
    assert second.retry_scheduled.next_attempt_index == first.retry_scheduled.next_attempt_index
    assert first.retry_scheduled.next_attempt_index == 1
    assert await state(api, eid) == t.PUBLIC_STATE_DELAYED

    # a complete after a competing operator cancel: the error with its four detail fields
    eid = await create(api)
    h = (await claim_one(api)).lease
    await api.execution.CancelExecution(
        pb.CancelExecutionRequest(execution_id=eid, reason="operator"), metadata=api.metadata
    )
    info = await expect_error(complete(api, h), C.FAILED_PRECONDITION, "execution_not_active")
    assert info.metadata["terminal_outcome"] == "cancelled"
    assert info.metadata["lease_epoch"] == "1"
    assert info.metadata["lifecycle_phase"] == "terminal"
    assert info.metadata["attempt_id"] == h.attempt_id
    # ...and a fail after it is not reconciled either
    await expect_error(fail(api, h), C.FAILED_PRECONDITION, "execution_not_active")


# -- 4. retries with exponential backoff --------------------------------------------------------


async def test_retry_with_exponential_backoff_then_exhaustion(engine_api: Api) -> None:
    api = engine_api
    policy = retry_policy(
        max_retries=2, backoff=t.Backoff(type="exponential", initial_delay_ms=200, multiplier=2)
    )
    eid = await create(api, policy=policy)
    h = (await claim_one(api)).lease
    started = await server_time_ms(api.store)

    for n, backoff in ((1, 200), (2, 400)):
        reply = await fail(api, h)
        assert reply.WhichOneof("outcome") == "retry_scheduled", reply
        delay_until = reply.retry_scheduled.delay_until
        assert reply.retry_scheduled.next_attempt_index == n
        snap = await describe(api, eid)
        now = await server_time_ms(api.store)
        # delay_until = the fail's server time + backoff (the fail also stamped last_mutation_at)
        assert started + backoff <= delay_until <= now + backoff
        if now < delay_until:  # not yet promoted when the snapshot was read
            assert snap.public_state == t.PUBLIC_STATE_DELAYED
            assert snap.blocking_reason == t.BLOCKING_REASON_WAITING_FOR_RETRY_BACKOFF
            assert delay_until == snap.last_mutation_at + backoff
            assert not snap.HasField("current_lease")
        task = await claim_one(api, wait_ms=5_000)  # once the promoter made it eligible
        assert await server_time_ms(api.store) >= delay_until
        assert task.attempt_type == t.ATTEMPT_TYPE_RETRY
        assert task.lease.attempt_index == n and task.lease.lease_epoch == n + 1
        h = task.lease
        started = await server_time_ms(api.store)

    last = await fail(api, h)
    assert last.WhichOneof("outcome") == "terminal_failed" and not last.replayed
    info = await get(api, eid)
    assert info.public_state == t.PUBLIC_STATE_FAILED
    assert info.state_vector.terminal_outcome == t.TERMINAL_OUTCOME_FAILED
    assert (await describe(api, eid)).total_attempt_count == 3
    for i, kind in enumerate((b"initial", b"retry", b"retry")):
        attempt = keys(eid).attempt(i)
        assert await api.store.call("HGET", attempt, "attempt_state") == b"ended_failure"
        assert await api.store.call("HGET", attempt, "attempt_type") == kind


async def test_non_retryable_category_fails_at_once(api: Api) -> None:
    policy = retry_policy(max_retries=2, retryable_categories=["timeout"])
    eid = await create(api, policy=policy)
    h = (await claim_one(api)).lease
    assert (await fail(api, h, category="bad_input")).WhichOneof("outcome") == "terminal_failed"
    assert await state(api, eid) == t.PUBLIC_STATE_FAILED
    # a listed category retries
    eid = await create(api, policy=policy)
    h = (await claim_one(api)).lease
    assert (await fail(api, h, category="timeout")).WhichOneof("outcome") == "retry_scheduled"


async def test_retry_after_is_the_handlers_delay_within_the_budget(api: Api) -> None:
    def fail_after(h: t.LeaseHandle, ms: int, **kw: Any) -> Awaitable[wpb.FailExecutionResponse]:
        request = wpb.FailExecutionRequest(
            lease=h,
            failure_reason="rate limited",
            failure_category="throttled",
            retry_after_ms=ms,
            **kw,
        )
        return api.worker.FailExecution(request, metadata=api.metadata)  # type: ignore[no-any-return]

    # no stored policy: asking for a retry gets the default budget, with exactly this delay
    eid = await create(api)
    h = (await claim_one(api)).lease
    reply = await fail_after(h, 300)
    assert reply.WhichOneof("outcome") == "retry_scheduled"
    c = await core(api, eid)
    assert int(c[b"delay_until"]) - int(c[b"last_transition_at"]) == 300
    assert reply.retry_scheduled.delay_until == int(c[b"delay_until"])
    # a policy with no retries left still ends the execution
    eid = await create(api, policy=retry_policy(max_retries=0))
    h = (await claim_one(api)).lease
    assert (await fail_after(h, 300)).WhichOneof("outcome") == "terminal_failed"
    # both ways of choosing the retry policy at once is a bad request
    eid = await create(api)
    h = (await claim_one(api)).lease
    await expect_error(
        fail_after(h, 10, retry_policy_json="{}"), grpc.StatusCode.INVALID_ARGUMENT, "invalid_input"
    )
    assert await state(api, eid) == t.PUBLIC_STATE_ACTIVE


# -- 5. execution deadline and attempt timeout --------------------------------------------------


async def test_deadline_and_attempt_timeout_expire(engine_api: Api) -> None:
    api = engine_api
    now = await server_time_ms(api.store)
    # 1.5 s: the deadline must not pass before the claim below on a loaded machine
    by_deadline = await create(api, execution_deadline_at=now + 1500)
    by_timeout = await create(
        api, policy=t.ExecutionPolicy(timeout_policy=t.TimeoutPolicy(attempt_timeout_ms=300))
    )
    never_claimed = await create(api, lane_id="idle", execution_deadline_at=now - 1)
    holders = {}
    for _ in range(2):
        task = await claim_one(api)
        holders[task.lease.execution_id] = task.lease
    assert set(holders) == {by_deadline, by_timeout}
    for eid in (by_deadline, by_timeout, never_claimed):
        await until_state(api, eid, t.PUBLIC_STATE_EXPIRED)
    for eid, lease in holders.items():
        info = await expect_error(renew(api, lease), C.FAILED_PRECONDITION, "execution_not_active")
        assert info.metadata["terminal_outcome"] == "expired", eid
        await expect_error(complete(api, lease), C.FAILED_PRECONDITION, "execution_not_active")
    assert (await get(api, never_claimed)).state_vector.terminal_outcome == (
        t.TERMINAL_OUTCOME_EXPIRED
    )


# -- 6. cancel ----------------------------------------------------------------------------------


async def test_operator_and_holder_cancel(api: Api) -> None:
    eid = await create(api)
    h = (await claim_one(api)).lease
    reply = await api.execution.CancelExecution(
        pb.CancelExecutionRequest(execution_id=eid, reason="ops"), metadata=api.metadata
    )
    assert reply.cancelled.public_state == t.PUBLIC_STATE_CANCELLED
    info = await expect_error(renew(api, h), C.FAILED_PRECONDITION, "execution_not_active")
    assert info.metadata["terminal_outcome"] == "cancelled"
    assert await state(api, eid) == t.PUBLIC_STATE_CANCELLED
    assert not (await describe(api, eid)).HasField("current_lease")
    # cancelling a terminal execution
    info = await expect_error(
        api.execution.CancelExecution(
            pb.CancelExecutionRequest(execution_id=eid), metadata=api.metadata
        ),
        C.FAILED_PRECONDITION,
        "execution_not_active",
    )
    assert info.metadata["terminal_outcome"] == "cancelled"

    # the holder cancels its own execution; a stale holder is refused first
    eid = await create(api)
    h = (await claim_one(api)).lease
    await expect_error(
        api.worker.CancelLeasedExecution(
            wpb.CancelLeasedExecutionRequest(lease=with_epoch(h, 7), reason="x"),
            metadata=api.metadata,
        ),
        C.ABORTED,
        "stale_lease",
    )
    done = await api.worker.CancelLeasedExecution(
        wpb.CancelLeasedExecutionRequest(lease=h, reason="worker gave up"), metadata=api.metadata
    )
    assert done.cancelled.public_state == t.PUBLIC_STATE_CANCELLED and not done.replayed
    again = await api.worker.CancelLeasedExecution(
        wpb.CancelLeasedExecutionRequest(lease=h, reason="worker gave up"), metadata=api.metadata
    )
    assert again.replayed
    assert await state(api, eid) == t.PUBLIC_STATE_CANCELLED

    # an operator cancel of a waiting execution
    eid = await create(api)
    await api.execution.CancelExecution(
        pb.CancelExecutionRequest(execution_id=eid), metadata=api.metadata
    )
    assert await state(api, eid) == t.PUBLIC_STATE_CANCELLED
    assert (await claim_next(api)).WhichOneof("outcome") == "no_work"


# -- 7. revoke and reclaim ----------------------------------------------------------------------


async def test_revoke_then_reclaim_by_another_worker(api: Api) -> None:
    eid = await create(api)
    h = (await claim_one(api, "w-1")).lease
    await expect_error(
        api.execution.RevokeLease(
            pb.RevokeLeaseRequest(execution_id=eid, expected_lease_id=str(uuid.uuid4())),
            metadata=api.metadata,
        ),
        C.ABORTED,
        "stale_lease",
    )
    revoked = await api.execution.RevokeLease(
        pb.RevokeLeaseRequest(execution_id=eid, expected_lease_id=h.lease_id),
        metadata=api.metadata,
    )
    assert revoked.revoked.lease_id == h.lease_id and revoked.revoked.lease_epoch == 1
    await expect_error(renew(api, h), C.ABORTED, "lease_revoked")
    await expect_error(complete(api, h), C.ABORTED, "lease_revoked")
    again = await api.execution.RevokeLease(
        pb.RevokeLeaseRequest(execution_id=eid), metadata=api.metadata
    )
    assert again.already_satisfied.reason == "already_revoked"

    task = await claim_one(api, "w-2")
    assert task.lease.execution_id == eid and task.attempt_type == t.ATTEMPT_TYPE_RECLAIM
    assert task.lease.attempt_index == 1 and task.lease.lease_epoch == 2
    await expect_error(renew(api, h), C.ABORTED, "stale_lease")
    assert (await renew(api, task.lease)).renewed.expires_at >= task.lease.lease_expires_at
    await complete(api, task.lease, b"second")
    assert await result_of(api, eid) == b"second"

    # nobody holds a waiting execution
    waiting = await create(api)
    await expect_error(
        api.execution.RevokeLease(
            pb.RevokeLeaseRequest(execution_id=waiting), metadata=api.metadata
        ),
        C.FAILED_PRECONDITION,
        "no_active_lease",
    )


# -- 8. delay and waiting for children ----------------------------------------------------------


async def test_delay_releases_the_lease_until_promotion(engine_api: Api) -> None:
    api = engine_api
    eid = await create(api)
    h = (await claim_one(api)).lease
    delay_until = await server_time_ms(api.store) + 300
    reply = await api.worker.DelayExecution(
        wpb.DelayExecutionRequest(lease=h, delay_until=delay_until), metadata=api.metadata
    )
    assert reply.delayed.public_state == t.PUBLIC_STATE_DELAYED and not reply.replayed
    snap = await describe(api, eid)
    if await server_time_ms(api.store) < delay_until:
        assert snap.public_state == t.PUBLIC_STATE_DELAYED
        assert snap.blocking_reason == t.BLOCKING_REASON_WAITING_FOR_DELAY
        again = await api.worker.DelayExecution(
            wpb.DelayExecutionRequest(lease=h, delay_until=delay_until), metadata=api.metadata
        )
        assert again.replayed
    assert not snap.HasField("current_lease")
    await expect_error(renew(api, h), C.FAILED_PRECONDITION, "execution_not_active")
    await until_state(api, eid, t.PUBLIC_STATE_WAITING)
    assert await server_time_ms(api.store) >= delay_until
    # claimable again: the paused attempt resumes under a new lease (same attempt, epoch + 1)
    task = await claim_one(api, "w-2")
    assert task.lease.execution_id == eid and task.resumed
    assert task.lease.attempt_index == 0 and task.lease.attempt_id == h.attempt_id
    assert task.lease.lease_epoch == 2 and task.attempt_type == t.ATTEMPT_TYPE_INITIAL
    await expect_error(complete(api, h), C.ABORTED, "stale_lease")
    await complete(api, task.lease, b"after the delay")
    assert await result_of(api, eid) == b"after the delay"


async def test_move_to_waiting_children(api: Api) -> None:
    eid = await create(api)
    h = (await claim_one(api)).lease
    moved = await api.worker.MoveToWaitingChildren(
        wpb.MoveToWaitingChildrenRequest(lease=h), metadata=api.metadata
    )
    assert moved.moved.public_state == t.PUBLIC_STATE_WAITING_CHILDREN and not moved.replayed
    snap = await describe(api, eid)
    assert snap.public_state == t.PUBLIC_STATE_WAITING_CHILDREN
    assert snap.blocking_reason == t.BLOCKING_REASON_WAITING_FOR_CHILDREN
    assert not snap.HasField("current_lease")
    again = await api.worker.MoveToWaitingChildren(
        wpb.MoveToWaitingChildrenRequest(lease=h), metadata=api.metadata
    )
    assert again.replayed
    assert (await claim_next(api)).WhichOneof("outcome") == "no_work"


# -- 9. priority --------------------------------------------------------------------------------


async def test_priority_order_and_change_priority(api: Api) -> None:
    by_priority = {p: await create(api, priority=p) for p in (1, 9, 5)}
    order = [await claim_one(api) for _ in range(3)]
    assert [task.priority for task in order] == [9, 5, 1]
    assert [task.lease.execution_id for task in order] == [by_priority[p] for p in (9, 5, 1)]

    low = await create(api, priority=1)
    high = await create(api, priority=5)
    changed = await api.execution.ChangePriority(
        pb.ChangePriorityRequest(execution_id=low, new_priority=9), metadata=api.metadata
    )
    assert changed.changed.execution_id == low
    assert (await get(api, low)).priority == 9
    first = await claim_one(api)
    assert first.lease.execution_id == low
    await expect_error(
        api.execution.ChangePriority(
            pb.ChangePriorityRequest(execution_id=low, new_priority=1), metadata=api.metadata
        ),
        C.FAILED_PRECONDITION,
        "execution_not_eligible",
    )
    assert (await claim_one(api)).lease.execution_id == high


# -- 10. batches --------------------------------------------------------------------------------


async def test_batch_claim(api: Api) -> None:
    created = {await create(api) for _ in range(7)}
    first = await claim_next(api, max_tasks=5)
    assert first.WhichOneof("outcome") == "batch"
    assert len(first.batch.tasks) == 5
    second = await claim_next(api, max_tasks=5)
    assert second.WhichOneof("outcome") == "batch"
    assert len(second.batch.tasks) == 2
    claimed = [task.lease.execution_id for task in [*first.batch.tasks, *second.batch.tasks]]
    assert len(claimed) == len(set(claimed)) and set(claimed) == created
    assert all(task.lease.lease_epoch == 1 for task in first.batch.tasks)
    assert (await claim_next(api, max_tasks=5)).WhichOneof("outcome") == "no_work"


# -- 11. long poll ------------------------------------------------------------------------------


async def test_long_poll_returns_new_work(api: Api) -> None:
    waiter = asyncio.ensure_future(claim_next(api, wait_ms=5_000))
    await asyncio.sleep(0.2)  # let the claim park (the test holds either way)
    eid = await create(api)
    reply = await waiter
    assert reply.WhichOneof("outcome") == "task", reply
    assert reply.task.lease.execution_id == eid
    empty = await claim_next(api, wait_ms=300)
    assert empty.WhichOneof("outcome") == "no_work"


# -- 12. capability routing ---------------------------------------------------------------------


async def test_capability_routing_blocks_then_unblocks(engine_api: Api) -> None:
    api = engine_api
    policy = t.ExecutionPolicy(
        routing_requirements=t.RoutingRequirements(required_capabilities=["gpu"])
    )
    eid = await create(api, policy=policy)
    assert (await claim_next(api, "cpu-1", caps=())).WhichOneof("outcome") == "no_work"
    snap = await describe(api, eid)
    assert snap.blocking_reason == t.BLOCKING_REASON_WAITING_FOR_CAPABLE_WORKER
    assert snap.public_state == t.PUBLIC_STATE_WAITING
    assert (await get(api, eid)).state_vector.eligibility_state == (
        t.ELIGIBILITY_STATE_BLOCKED_BY_ROUTE
    )
    # a blocked execution is not offered again, even to a capable worker
    assert (await claim_next(api, "gpu-1", caps=("gpu",))).WhichOneof("outcome") == "no_work"
    # unblock passes run while no capable worker is registered: it stays blocked
    await asyncio.sleep(0.4)
    assert (await describe(api, eid)).blocking_reason == (
        t.BLOCKING_REASON_WAITING_FOR_CAPABLE_WORKER
    )

    await api.worker.RegisterWorker(
        wpb.RegisterWorkerRequest(
            worker_id=WORKER,
            worker_instance_id="gpu-1",
            capabilities=["gpu", "cuda"],
            lane_ids=[LANE],
            lease_ttl_ms=10_000,
        ),
        metadata=api.metadata,
    )

    async def unblocked() -> bool:
        return (await get(api, eid)).state_vector.eligibility_state == (
            t.ELIGIBILITY_STATE_ELIGIBLE_NOW
        )

    await eventually(unblocked, "the unblock scanner to re-admit the execution")
    task = await claim_one(api, "gpu-1", caps=("gpu", "cuda"))
    assert task.lease.execution_id == eid


# -- 13. two-step claim -------------------------------------------------------------------------


def claim_for_worker(api: Api, worker: str = WORKER, **kw: Any) -> Awaitable[Any]:
    kw.setdefault("lane_id", LANE)
    kw.setdefault("grant_ttl_ms", 5_000)
    kw.setdefault("worker_instance_id", f"{worker}-1")
    return api.worker.ClaimForWorker(
        wpb.ClaimForWorkerRequest(worker_id=worker, **kw), metadata=api.metadata
    )


def claim_from_grant(api: Api, grant: t.ClaimGrant, worker: str = WORKER) -> Awaitable[Any]:
    return api.worker.ClaimFromGrant(
        wpb.ClaimFromGrantRequest(
            worker_id=worker,
            worker_instance_id=f"{worker}-1",
            lane_id=LANE,
            grant=grant,
            lease_ttl_ms=30_000,
        ),
        metadata=api.metadata,
    )


async def test_two_step_grant_then_claim(api: Api) -> None:
    assert (await claim_for_worker(api)).WhichOneof("outcome") == "no_work"
    eid = await create(api)
    granted = await claim_for_worker(api)
    assert granted.WhichOneof("outcome") == "granted"
    grant = granted.granted.grant
    assert granted.granted.execution_id == grant.execution_id == eid
    assert grant.partition_key == parse_execution_id(eid, 1 << 16).tag
    assert grant.expires_at_ms > 0 and grant.grant_key
    # the grant does not take the execution out of eligible; a second grant is refused
    await expect_error(
        claim_for_worker(api, "other", execution_id=eid), C.ABORTED, "grant_already_exists"
    )
    claimed = (await claim_from_grant(api, grant)).claimed
    assert claimed.lease.execution_id == eid and claimed.attempt_type == t.ATTEMPT_TYPE_INITIAL
    assert claimed.lease.lease_epoch == 1 and claimed.lease.attempt_index == 0
    # single use: the execution is active now, so the claim check refuses first
    # (docs/lifecycle.md#claims)
    await expect_error(
        claim_from_grant(api, grant), C.FAILED_PRECONDITION, "execution_not_leaseable"
    )
    assert (await describe(api, eid)).current_lease.lease_epoch == 1

    # a grant for another worker id cannot be consumed; its owner can
    eid2 = await create(api)
    g2 = (await claim_for_worker(api, "w2", execution_id=eid2)).granted.grant
    await expect_error(claim_from_grant(api, g2, WORKER), C.ABORTED, "invalid_claim_grant")
    assert await state(api, eid2) == t.PUBLIC_STATE_WAITING
    assert (await claim_from_grant(api, g2, "w2")).claimed.lease.execution_id == eid2


# -- 14. replay ---------------------------------------------------------------------------------


async def test_replay_of_a_failed_execution(api: Api) -> None:
    eid = await create(api)
    h = (await claim_one(api)).lease
    await expect_error(
        api.execution.ReplayExecution(
            pb.ReplayExecutionRequest(execution_id=eid), metadata=api.metadata
        ),
        C.FAILED_PRECONDITION,
        "execution_not_terminal",
    )
    await fail(api, h)
    assert await state(api, eid) == t.PUBLIC_STATE_FAILED
    replayed = await api.execution.ReplayExecution(
        pb.ReplayExecutionRequest(execution_id=eid), metadata=api.metadata
    )
    assert replayed.replayed.public_state == t.PUBLIC_STATE_WAITING
    assert await state(api, eid) == t.PUBLIC_STATE_WAITING
    task = await claim_one(api)
    assert task.lease.execution_id == eid and task.attempt_type == t.ATTEMPT_TYPE_REPLAY
    assert task.lease.attempt_index == 1 and task.lease.lease_epoch == 2
    await expect_error(complete(api, h), C.ABORTED, "stale_lease")
    await complete(api, task.lease, b"replayed")
    assert await result_of(api, eid) == b"replayed"


# -- 15. watch ----------------------------------------------------------------------------------


async def test_watch_follows_the_lifecycle(api: Api) -> None:
    eid = await create(api)
    call = api.execution.WatchExecution(
        pb.WatchExecutionRequest(execution_id=eid), metadata=api.metadata
    )
    first = await asyncio.wait_for(call.read(), 5)
    assert first.public_state == t.PUBLIC_STATE_WAITING and first.execution.execution_id == eid
    h = (await claim_one(api)).lease
    second = await asyncio.wait_for(call.read(), 5)
    assert second.public_state == t.PUBLIC_STATE_ACTIVE and second.at >= first.at
    await complete(api, h)
    third = await asyncio.wait_for(call.read(), 5)
    assert third.public_state == t.PUBLIC_STATE_COMPLETED
    assert third.execution.state_vector.terminal_outcome == t.TERMINAL_OUTCOME_SUCCESS
    assert await asyncio.wait_for(call.read(), 5) is grpc.aio.EOF
    assert await call.code() == C.OK

    # an already-terminal execution: one message, then the end
    messages = [
        m
        async for m in api.execution.WatchExecution(
            pb.WatchExecutionRequest(execution_id=eid), metadata=api.metadata
        )
    ]
    assert [m.public_state for m in messages] == [t.PUBLIC_STATE_COMPLETED]

    missing = api.execution.WatchExecution(
        pb.WatchExecutionRequest(execution_id=f"{{fp:1}}:{uuid.uuid4()}"), metadata=api.metadata
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await missing.read()
    assert caught.value.code() == C.NOT_FOUND
    assert error_info(caught.value).reason == "execution_not_found"


# -- 16. progress and batch renewals ------------------------------------------------------------


async def test_progress_and_batch_renewals(api: Api) -> None:
    eid = await create(api)
    h = (await claim_one(api)).lease
    reply = await api.worker.UpdateProgress(
        wpb.UpdateProgressRequest(lease=h, progress_pct=40, progress_message="halfway"),
        metadata=api.metadata,
    )
    assert reply.WhichOneof("outcome") == "updated"
    stored = await core(api, eid)
    assert stored[b"progress_pct"] == b"40" and stored[b"progress_message"] == b"halfway"
    await api.worker.UpdateProgress(
        wpb.UpdateProgressRequest(
            execution_id=eid,
            lease_id=h.lease_id,
            lease_epoch=h.lease_epoch,
            attempt_id=h.attempt_id,
            progress_message="almost",
        ),
        metadata=api.metadata,
    )
    stored = await core(api, eid)
    assert stored[b"progress_pct"] == b"40" and stored[b"progress_message"] == b"almost"
    await expect_error(
        api.worker.UpdateProgress(
            wpb.UpdateProgressRequest(
                execution_id=eid,
                lease_id=h.lease_id,
                lease_epoch=h.lease_epoch + 1,
                attempt_id=h.attempt_id,
                progress_pct=90,
            ),
            metadata=api.metadata,
        ),
        C.ABORTED,
        "stale_lease",
    )
    await expect_error(
        api.worker.UpdateProgress(
            wpb.UpdateProgressRequest(lease=h, progress_pct=101), metadata=api.metadata
        ),
        C.INVALID_ARGUMENT,
        "invalid_input",
    )
    assert (await core(api, eid))[b"progress_pct"] == b"40"

    other = await create(api)
    h2 = (await claim_one(api)).lease
    assert h2.execution_id == other
    batch = await api.worker.RenewLeases(
        wpb.RenewLeasesRequest(
            renewals=[
                wpb.RenewLeaseRequest(lease=h, lease_ttl_ms=60_000),
                wpb.RenewLeaseRequest(lease=with_epoch(h2, 5)),
            ]
        ),
        metadata=api.metadata,
    )
    good, stale = batch.results
    assert good.execution_id == eid and good.WhichOneof("outcome") == "renewed"
    assert good.renewed.expires_at > h.lease_expires_at
    assert (await describe(api, eid)).current_lease.expires_at == good.renewed.expires_at
    assert stale.execution_id == other and stale.WhichOneof("outcome") == "error"
    assert stale.error.code == grpc.StatusCode.ABORTED.value[0]
    assert stale.error.reason == "stale_lease"
    assert (await describe(api, other)).current_lease.expires_at == h2.lease_expires_at
    # an empty batch is refused, as the proto documents
    await expect_error(
        api.worker.RenewLeases(wpb.RenewLeasesRequest(), metadata=api.metadata),
        C.INVALID_ARGUMENT,
        "invalid_input",
    )


# -- 17. bad input changes nothing --------------------------------------------------------------


async def test_bad_input_is_rejected_and_changes_nothing(api: Api) -> None:
    eid = await create(api)
    waiting = await create(api)
    h = (await claim_one(api)).lease
    assert h.execution_id == eid
    before = (await keyspace_size(api.store), await core(api, eid), await core(api, waiting))
    bad_eid = f"{{fp:{api.server.config.flow_partitions}}}:{uuid.uuid4()}"
    w = api.worker
    md = api.metadata

    def claim_req(**kw: Any) -> wpb.ClaimNextRequest:
        base: dict[str, Any] = {
            "worker_id": WORKER,
            "worker_instance_id": "w-1",
            "lane_ids": [LANE],
        }
        return wpb.ClaimNextRequest(**{**base, **kw})

    cases: list[tuple[Awaitable[Any], str]] = [
        # unfenced without operator_override
        (
            w.CompleteExecution(wpb.CompleteExecutionRequest(execution_id=eid), metadata=md),
            "fence_required",
        ),
        (
            w.FailExecution(wpb.FailExecutionRequest(execution_id=eid), metadata=md),
            "fence_required",
        ),
        (
            w.CompleteExecution(
                wpb.CompleteExecutionRequest(execution_id=eid, source=t.CANCEL_SOURCE_LEASE_HOLDER),
                metadata=md,
            ),
            "fence_required",
        ),
        (w.RenewLease(wpb.RenewLeaseRequest(execution_id=eid), metadata=md), "fence_required"),
        # partial fences
        (
            w.CompleteExecution(
                wpb.CompleteExecutionRequest(
                    execution_id=eid,
                    fence=t.LeaseFence(lease_id=h.lease_id, lease_epoch=h.lease_epoch),
                ),
                metadata=md,
            ),
            "partial_fence_triple",
        ),
        (
            w.RenewLease(
                wpb.RenewLeaseRequest(
                    execution_id=eid,
                    fence=t.LeaseFence(lease_id=h.lease_id, attempt_id=h.attempt_id),
                ),
                metadata=md,
            ),
            "partial_fence_triple",
        ),
        # execution ids outside the deployment's partitions, or malformed
        (
            w.CompleteExecution(
                wpb.CompleteExecutionRequest(
                    lease=t.LeaseHandle(
                        execution_id=bad_eid,
                        lease_id=h.lease_id,
                        lease_epoch=h.lease_epoch,
                        attempt_id=h.attempt_id,
                    )
                ),
                metadata=md,
            ),
            "invalid_input",
        ),
        (
            w.RenewLease(
                wpb.RenewLeaseRequest(
                    execution_id=bad_eid,
                    fence=t.LeaseFence(lease_id=h.lease_id, lease_epoch=1, attempt_id=h.attempt_id),
                ),
                metadata=md,
            ),
            "invalid_input",
        ),
        (
            w.ClaimFromGrant(
                wpb.ClaimFromGrantRequest(
                    worker_id=WORKER,
                    worker_instance_id="w-1",
                    lane_id=LANE,
                    grant=t.ClaimGrant(execution_id=bad_eid),
                ),
                metadata=md,
            ),
            "invalid_input",
        ),
        (
            w.ClaimForWorker(
                wpb.ClaimForWorkerRequest(
                    execution_id=bad_eid,
                    lane_id=LANE,
                    worker_id=WORKER,
                    worker_instance_id="w-1",
                    grant_ttl_ms=1000,
                ),
                metadata=md,
            ),
            "invalid_input",
        ),
        (
            api.execution.CancelExecution(
                pb.CancelExecutionRequest(execution_id=bad_eid), metadata=md
            ),
            "invalid_input",
        ),
        (
            api.execution.RevokeLease(
                pb.RevokeLeaseRequest(execution_id="{fp:1}:nope"), metadata=md
            ),
            "invalid_input",
        ),
        # lease handle and explicit fields disagree
        (
            w.CompleteExecution(
                wpb.CompleteExecutionRequest(execution_id=waiting, lease=h), metadata=md
            ),
            "invalid_input",
        ),
        # lanes with control characters
        (w.ClaimNext(claim_req(lane_ids=["L\x07"]), metadata=md), "invalid_input"),
        (w.ClaimNext(claim_req(lane_ids=[]), metadata=md), "invalid_input"),
        (
            w.ClaimForWorker(
                wpb.ClaimForWorkerRequest(
                    lane_id="L\n", worker_id=WORKER, worker_instance_id="w-1", grant_ttl_ms=1000
                ),
                metadata=md,
            ),
            "invalid_input",
        ),
        (
            w.ClaimFromGrant(
                wpb.ClaimFromGrantRequest(
                    worker_id=WORKER,
                    worker_instance_id="w-1",
                    lane_id="\x00",
                    grant=t.ClaimGrant(execution_id=waiting),
                ),
                metadata=md,
            ),
            "invalid_input",
        ),
        # grant TTL outside 1..60000 (ClaimNext documents 0 as the 10000 default)
        (w.ClaimNext(claim_req(grant_ttl_ms=60_001), metadata=md), "invalid_input"),
        (
            w.ClaimForWorker(
                wpb.ClaimForWorkerRequest(
                    lane_id=LANE, worker_id=WORKER, worker_instance_id="w-1", grant_ttl_ms=0
                ),
                metadata=md,
            ),
            "invalid_input",
        ),
        (
            w.ClaimForWorker(
                wpb.ClaimForWorkerRequest(
                    lane_id=LANE, worker_id=WORKER, worker_instance_id="w-1", grant_ttl_ms=60_001
                ),
                metadata=md,
            ),
            "invalid_input",
        ),
        # long poll over 30 s; bad worker identities
        (w.ClaimNext(claim_req(wait_ms=30_001), metadata=md), "invalid_input"),
        (w.ClaimNext(claim_req(worker_instance_id="w 1"), metadata=md), "invalid_input"),
        (w.ClaimNext(claim_req(worker_id=""), metadata=md), "invalid_input"),
        (w.ClaimNext(claim_req(capabilities=["g,pu"]), metadata=md), "invalid_capabilities"),
        (w.DelayExecution(wpb.DelayExecutionRequest(lease=h), metadata=md), "invalid_input"),
    ]
    for i, (call, reason) in enumerate(cases):
        try:
            await expect_error(call, C.INVALID_ARGUMENT, reason)
        except AssertionError as exc:
            raise AssertionError(f"case {i} ({reason}): {exc}") from exc
    after = (await keyspace_size(api.store), await core(api, eid), await core(api, waiting))
    assert after == before
    # the rightful holder is unaffected
    assert (await complete(api, h)).completed.public_state == t.PUBLIC_STATE_COMPLETED


async def test_operator_override_completes_without_a_fence(api: Api) -> None:
    eid = await create(api)
    await claim_one(api)
    done = await api.worker.CompleteExecution(
        wpb.CompleteExecutionRequest(
            execution_id=eid, source=t.CANCEL_SOURCE_OPERATOR_OVERRIDE, result_payload=b"op"
        ),
        metadata=api.metadata,
    )
    assert done.completed.public_state == t.PUBLIC_STATE_COMPLETED
    assert await result_of(api, eid) == b"op"
