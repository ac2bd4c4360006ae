"""Suspension and waitpoints end to end over gRPC (docs/suspension.md, docs/suspension.md#suspend,
docs/suspension.md#suspension-timeouts, docs/suspension.md#decisions):
real server, real Valkey, both topologies. Scanner-driven behaviour uses `engine_api` (every
scanner at 100 ms); effects are awaited with bounded polling, never fixed sleeps."""

from __future__ import annotations

import logging

import grpc
import pytest

from flowfabric.server.engine.scanners import server_time_ms
from flowfabric.server.valkey.codec import hash_to_dict
from flowfabric.server.valkey.ids import parse_execution_id
from flowfabric.server.valkey.keys import ExecKeys, PartitionKeys
from flowfabric.v1 import execution_pb2 as epb
from flowfabric.v1 import signal_pb2 as spb
from flowfabric.v1 import types_pb2 as t
from flowfabric.v1 import worker_pb2 as wpb
from tests.api.suspend_util import (
    claim,
    core,
    deliver,
    eventually,
    new_id,
    started,
    state,
    suspend,
    suspended,
    wait_server_time_past,
    waitpoint,
)
from tests.api.util import expect_error, keyspace_size
from tests.conftest import Api

C = grpc.StatusCode


def pending_request(lease: t.LeaseHandle, **fields: object) -> wpb.CreatePendingWaitpointRequest:
    fields.setdefault("expires_in_ms", 60_000)
    return wpb.CreatePendingWaitpointRequest(lease=lease, **fields)  # type: ignore[arg-type]


async def create_pending(
    api: Api, lease: t.LeaseHandle, **fields: object
) -> wpb.CreatePendingWaitpointResponse.Created:
    reply = await api.worker.CreatePendingWaitpoint(
        pending_request(lease, **fields), metadata=api.metadata
    )
    return reply.created


async def list_waitpoints(
    api: Api, eid: str, **fields: object
) -> spb.ListPendingWaitpointsResponse:
    return await api.signal.ListPendingWaitpoints(  # type: ignore[no-any-return]
        spb.ListPendingWaitpointsRequest(execution_id=eid, **fields),  # type: ignore[arg-type]
        metadata=api.metadata,
    )


# -- scenario 22: suspend, list, deliver, re-claim, resume signals, complete -------------------


async def test_suspend_signal_resume_and_complete(api: Api) -> None:
    lease, s = await suspended(
        api, "review", timeout_behavior="fail", reason_code="waiting_for_approval"
    )
    eid = lease.execution_id
    assert s.waitpoint_token.startswith("k1:") and len(s.waitpoint_token) == 43
    assert s.waitpoint_key == f"wpk:{s.waitpoint_id}"
    assert await state(api, eid) == t.PUBLIC_STATE_SUSPENDED
    row = await core(api, eid)
    assert row["blocking_reason"] == "waiting_for_approval"
    assert row["current_waitpoint_id"] == s.waitpoint_id

    listed = await list_waitpoints(api, eid)
    assert len(listed.waitpoints) == 1
    info = listed.waitpoints[0]
    assert (info.waitpoint_id, info.state, info.waitpoint_token) == (
        s.waitpoint_id, "active", s.waitpoint_token,
    )  # fmt: skip
    assert list(info.required_signal_names) == ["review"]
    assert info.HasField("activated_at") and info.created_at > 0

    reply = await deliver(
        api, eid, s.waitpoint_id, s.waitpoint_token, "review", payload=b"approved by jane"
    )
    assert reply.accepted.effect == "resume_condition_satisfied"
    assert reply.accepted.signal_id
    assert await state(api, eid) == t.PUBLIC_STATE_WAITING
    assert (await list_waitpoints(api, eid)).waitpoints == []

    again = await claim(api, "w-2")
    assert again.lease.execution_id == eid
    assert again.lease.attempt_index == lease.attempt_index
    assert again.lease.lease_epoch > lease.lease_epoch
    signals = await api.worker.GetResumeSignals(
        wpb.GetResumeSignalsRequest(lease=again.lease), metadata=api.metadata
    )
    assert len(signals.signals) == 1
    got = signals.signals[0]
    assert (got.signal_name, got.payload, got.source_identity) == (
        "review", b"approved by jane", "jane",
    )  # fmt: skip
    assert got.signal_id == reply.accepted.signal_id
    assert got.observed_effect == "resume_condition_satisfied"
    done = await api.worker.CompleteExecution(
        wpb.CompleteExecutionRequest(lease=again.lease, result_payload=b"ok"),
        metadata=api.metadata,
    )
    assert done.completed.public_state == t.PUBLIC_STATE_COMPLETED


async def test_suspend_retry_after_lost_reply_is_replayed(api: Api) -> None:
    lease = await started(api)
    sid, wp = new_id(), new_id()
    first = await suspend(api, lease, "go", suspension_id=sid, waitpoint_id=wp)
    again = await suspend(api, lease, "go", suspension_id=sid, waitpoint_id=wp)
    assert again.replayed and not first.replayed
    assert again.suspended == first.suspended
    # a different call with the same (now stale) lease is not a replay
    await expect_error(
        suspend(api, lease, "go", suspension_id=new_id(), waitpoint_id=new_id()),
        C.FAILED_PRECONDITION,
        "execution_not_active",
    )
    # nor is a retry without a caller-supplied suspension id
    await expect_error(suspend(api, lease, "go"), C.FAILED_PRECONDITION, "execution_not_active")


async def test_suspend_mints_ids_and_keeps_a_given_key(api: Api) -> None:
    lease = await started(api)
    reply = await suspend(api, lease, waitpoint_key="order-42/approval")
    s = reply.suspended
    assert s.suspension_id and s.waitpoint_id and s.waitpoint_key == "order-42/approval"
    listed = await list_waitpoints(api, lease.execution_id)
    assert list(listed.waitpoints[0].required_signal_names) == []  # wildcard
    any_name = await deliver(api, lease.execution_id, s.waitpoint_id, s.waitpoint_token, "x")
    assert any_name.accepted.effect == "resume_condition_satisfied"


# -- scenario 26: pending waitpoints ---------------------------------------------------------


async def test_pending_waitpoint_buffers_then_suspend_is_already_satisfied(api: Api) -> None:
    lease = await started(api)
    eid = lease.execution_id
    created = await create_pending(api, lease)
    assert created.waitpoint_token.startswith("k1:")
    listed = await list_waitpoints(api, eid)
    assert [(w.waitpoint_id, w.state) for w in listed.waitpoints] == [
        (created.waitpoint_id, "pending")
    ]
    assert not listed.waitpoints[0].HasField("activated_at")

    early = await deliver(
        api, eid, created.waitpoint_id, created.waitpoint_token, "callback_result",
        payload=b"early", idempotency_key="cb-1",
    )  # fmt: skip
    assert early.accepted.effect == "buffered_for_pending_waitpoint"
    repeat = await deliver(
        api, eid, created.waitpoint_id, created.waitpoint_token, "callback_result",
        idempotency_key="cb-1",
    )  # fmt: skip
    assert repeat.duplicate.existing_signal_id == early.accepted.signal_id
    assert await state(api, eid) == t.PUBLIC_STATE_ACTIVE

    reply = await suspend(
        api, lease, "callback_result", use_pending_waitpoint=True,
        waitpoint_id=created.waitpoint_id,
    )  # fmt: skip
    assert reply.WhichOneof("outcome") == "already_satisfied"
    assert reply.already_satisfied.waitpoint_token == created.waitpoint_token
    [matched] = reply.already_satisfied.signals
    assert (matched.signal_id, matched.signal_name, matched.payload) == (
        early.accepted.signal_id, "callback_result", b"early",
    )  # fmt: skip
    assert matched.observed_effect == "resume_condition_satisfied"
    assert await state(api, eid) == t.PUBLIC_STATE_ACTIVE  # lease kept
    assert (await waitpoint(api, eid, created.waitpoint_id))["state"] == "closed"
    done = await api.worker.CompleteExecution(
        wpb.CompleteExecutionRequest(lease=lease, result_payload=b"ok"), metadata=api.metadata
    )
    assert done.completed.public_state == t.PUBLIC_STATE_COMPLETED


async def test_pending_waitpoint_activation_keeps_its_token(api: Api) -> None:
    lease = await started(api)
    eid = lease.execution_id
    created = await create_pending(api, lease, waitpoint_key="k-a")
    assert created.waitpoint_key == "k-a"
    await deliver(api, eid, created.waitpoint_id, created.waitpoint_token, "a")
    reply = await suspend(
        api, lease, "a", "b", use_pending_waitpoint=True, waitpoint_id=created.waitpoint_id
    )
    assert reply.suspended.waitpoint_token == created.waitpoint_token
    assert reply.suspended.waitpoint_key == "k-a"
    assert await state(api, eid) == t.PUBLIC_STATE_SUSPENDED
    b = await deliver(api, eid, created.waitpoint_id, created.waitpoint_token, "b")
    assert b.accepted.effect == "resume_condition_satisfied"
    assert await state(api, eid) == t.PUBLIC_STATE_WAITING


async def test_expired_pending_waitpoint_before_the_scanner(api: Api) -> None:
    lease = await started(api)
    created = await create_pending(api, lease, expires_in_ms=1)
    expires = int((await waitpoint(api, lease.execution_id, created.waitpoint_id))["expires_at"])
    await wait_server_time_past(api, expires)
    await expect_error(
        suspend(api, lease, "x", use_pending_waitpoint=True, waitpoint_id=created.waitpoint_id),
        C.FAILED_PRECONDITION,
        "pending_waitpoint_expired",
    )


async def test_pending_waitpoint_expiry_scanner_closes_it(engine_api: Api) -> None:
    api = engine_api
    lease = await started(api)
    eid = lease.execution_id
    created = await create_pending(api, lease, expires_in_ms=200)
    wp = await eventually(
        lambda: waitpoint(api, eid, created.waitpoint_id),
        lambda w: w.get("state") == "expired",
        "pending waitpoint expiry",
    )
    assert wp["close_reason"] == "never_committed"
    tag = parse_execution_id(eid, 1 << 16).tag
    expiry_index = PartitionKeys(tag).pending_waitpoint_expiry
    assert await api.store.call("ZSCORE", expiry_index, created.waitpoint_id) is None
    assert (await list_waitpoints(api, eid)).waitpoints == []
    # never activated: not signalable (docs/suspension.md#decisions), unlike a waitpoint closed
    # after use
    await expect_error(
        deliver(api, eid, created.waitpoint_id, created.waitpoint_token, "x"),
        C.FAILED_PRECONDITION,
        "target_not_signalable",
    )
    await expect_error(
        suspend(api, lease, "x", use_pending_waitpoint=True, waitpoint_id=created.waitpoint_id),
        C.FAILED_PRECONDITION,
        "waitpoint_not_pending",
    )


async def test_expiry_scanner_drops_ghost_entries(engine_api: Api) -> None:
    api = engine_api
    index = PartitionKeys.of(3).pending_waitpoint_expiry
    ghost = new_id()
    await api.store.call("ZADD", index, 1, ghost)
    await eventually(
        lambda: api.store.call("ZSCORE", index, ghost), lambda s: s is None, "ghost entry removal"
    )


async def test_close_waitpoint_is_idempotent(api: Api) -> None:
    lease = await started(api)
    eid = lease.execution_id
    created = await create_pending(api, lease)

    def close(wp: str) -> object:
        return api.worker.CloseWaitpoint(
            wpb.CloseWaitpointRequest(execution_id=eid, waitpoint_id=wp), metadata=api.metadata
        )

    assert (await close(created.waitpoint_id)).WhichOneof("outcome") == "closed"  # type: ignore[attr-defined]
    first = await waitpoint(api, eid, created.waitpoint_id)
    assert (first["state"], first["close_reason"]) == ("closed", "proactive_close")
    await close(created.waitpoint_id)
    assert (await waitpoint(api, eid, created.waitpoint_id))["closed_at"] == first["closed_at"]
    await expect_error(close(new_id()), C.NOT_FOUND, "waitpoint_not_found")  # type: ignore[arg-type]
    await expect_error(
        deliver(api, eid, created.waitpoint_id, created.waitpoint_token, "x"),
        C.FAILED_PRECONDITION,
        "waitpoint_closed",
    )


# -- operator resume ---------------------------------------------------------------------------


def resume(api: Api, eid: str, **fields: object) -> object:
    return api.execution.ResumeExecution(
        epb.ResumeExecutionRequest(execution_id=eid, **fields),  # type: ignore[arg-type]
        metadata=api.metadata,
    )


async def test_operator_resume_then_no_resume_signals(api: Api) -> None:
    lease, s = await suspended(api, "approve")
    eid = lease.execution_id
    reply = await resume(api, eid)
    assert reply.resumed.public_state == t.PUBLIC_STATE_WAITING  # type: ignore[attr-defined]
    wp = await waitpoint(api, eid, s.waitpoint_id)
    assert (wp["state"], wp["close_reason"]) == ("closed", "operator_resume")
    await expect_error(resume(api, eid), C.FAILED_PRECONDITION, "execution_not_suspended")  # type: ignore[arg-type]
    # the old token is refused: the condition closed with the resume
    await expect_error(
        deliver(api, eid, s.waitpoint_id, s.waitpoint_token, "approve"),
        C.FAILED_PRECONDITION,
        "waitpoint_closed",
    )
    again = await claim(api, "w-2")
    assert again.lease.attempt_index == lease.attempt_index
    signals = await api.worker.GetResumeSignals(
        wpb.GetResumeSignalsRequest(execution_id=eid, attempt_index=again.lease.attempt_index),
        metadata=api.metadata,
    )
    assert list(signals.signals) == []


async def test_operator_resume_with_a_delay(api: Api) -> None:
    lease, _ = await suspended(api, "approve")
    eid = lease.execution_id
    before = await server_time_ms(api.store)
    reply = await resume(api, eid, resume_delay_ms=10_000)
    assert reply.resumed.public_state == t.PUBLIC_STATE_DELAYED  # type: ignore[attr-defined]
    tag = parse_execution_id(eid, 1 << 16).tag
    score = await api.store.call("ZSCORE", PartitionKeys(tag).lane("L", "delayed"), eid)
    assert float(score) >= before + 10_000
    await expect_error(resume(api, eid, trigger_type="bogus"), C.INVALID_ARGUMENT, "invalid_input")  # type: ignore[arg-type]


# -- scenario 25: timeouts and cancel --------------------------------------------------------


@pytest.mark.parametrize(
    ("behavior", "public", "reason"),
    [
        ("fail", t.PUBLIC_STATE_FAILED, "timed_out_fail"),
        ("auto_resume", t.PUBLIC_STATE_WAITING, "timed_out_auto_resume"),
        ("cancel", t.PUBLIC_STATE_CANCELLED, "timed_out_cancel"),
        ("expire", t.PUBLIC_STATE_EXPIRED, "timed_out_expire"),
    ],
)
async def test_suspension_timeout_behaviours(
    engine_api: Api, behavior: str, public: int, reason: str
) -> None:
    api = engine_api
    now = await server_time_ms(api.store)
    lease, s = await suspended(api, "never", timeout_at=now - 1, timeout_behavior=behavior)
    eid = lease.execution_id
    await eventually(lambda: state(api, eid), lambda st: st == public, f"timeout {behavior}")
    wp = await waitpoint(api, eid, s.waitpoint_id)
    assert (wp["state"], wp["close_reason"]) == ("closed", reason)
    tag = parse_execution_id(eid, 1 << 16).tag
    assert await api.store.call("ZSCORE", PartitionKeys(tag).suspension_timeout, eid) is None


async def test_relative_timeout_uses_the_server_clock(api: Api) -> None:
    before = await server_time_ms(api.store)
    lease, _ = await suspended(api, "never", timeout_in_ms=60_000)
    after = await server_time_ms(api.store)
    eid = lease.execution_id
    tag = parse_execution_id(eid, 1 << 16).tag
    score = await api.store.call("ZSCORE", PartitionKeys(tag).suspension_timeout, eid)
    assert before + 60_000 <= float(score) <= after + 60_000
    # both forms at once is refused and changes nothing
    other = await started(api)
    await expect_error(
        suspend(api, other, "x", timeout_at=before + 1, timeout_in_ms=1),
        C.INVALID_ARGUMENT,
        "invalid_input",
    )
    assert await state(api, other.execution_id) == t.PUBLIC_STATE_ACTIVE


async def test_escalate_keeps_it_suspended_for_an_operator(engine_api: Api) -> None:
    api = engine_api
    now = await server_time_ms(api.store)
    lease, _ = await suspended(api, "never", timeout_at=now - 1, timeout_behavior="escalate")
    eid = lease.execution_id
    row = await eventually(
        lambda: core(api, eid),
        lambda c: c.get("blocking_reason") == "paused_by_operator",
        "escalation",
    )
    assert row["public_state"] == "suspended"
    reply = await resume(api, eid)
    assert reply.resumed.public_state == t.PUBLIC_STATE_WAITING  # type: ignore[attr-defined]


async def test_cancel_a_suspended_execution(api: Api) -> None:
    lease, s = await suspended(api, "approve")
    eid = lease.execution_id
    await api.execution.CancelExecution(
        epb.CancelExecutionRequest(execution_id=eid, reason="no longer needed"),
        metadata=api.metadata,
    )
    assert await state(api, eid) == t.PUBLIC_STATE_CANCELLED
    wp = await waitpoint(api, eid, s.waitpoint_id)
    assert wp["state"] == "closed"
    ek = ExecKeys(parse_execution_id(eid, 1 << 16))
    record = hash_to_dict(await api.store.call("HGETALL", ek.suspension_current))
    assert record["close_reason"] == "cancelled"
    attempt = hash_to_dict(await api.store.call("HGETALL", ek.attempt(lease.attempt_index)))
    assert attempt["attempt_state"] == "ended_cancelled"
    await expect_error(
        deliver(api, eid, s.waitpoint_id, s.waitpoint_token, "approve"),
        C.FAILED_PRECONDITION,
        "target_not_signalable",
    )


# -- errors and validation -----------------------------------------------------------------------


async def test_suspend_errors(api: Api) -> None:
    lease = await started(api)
    wp = new_id()
    created = await api.worker.CreatePendingWaitpoint(
        pending_request(lease, waitpoint_id=wp), metadata=api.metadata
    )
    assert created.created.waitpoint_id == wp
    await expect_error(
        api.worker.CreatePendingWaitpoint(
            pending_request(lease, waitpoint_id=wp), metadata=api.metadata
        ),
        C.ALREADY_EXISTS,
        "waitpoint_already_exists",
    )
    await expect_error(
        suspend(api, lease, "x", waitpoint_id=wp), C.ALREADY_EXISTS, "waitpoint_already_exists"
    )
    stale = t.LeaseHandle()
    stale.CopyFrom(lease)
    stale.lease_epoch += 1
    await expect_error(suspend(api, stale, "x"), C.ABORTED, "stale_lease")
    await expect_error(
        suspend(api, lease, "x", use_pending_waitpoint=True, waitpoint_id=new_id()),
        C.NOT_FOUND,
        "waitpoint_not_found",
    )
    fence_only_id = wpb.SuspendRequest(
        execution_id=lease.execution_id, fence=t.LeaseFence(lease_id=lease.lease_id)
    )
    await expect_error(
        api.worker.Suspend(fence_only_id, metadata=api.metadata),
        C.INVALID_ARGUMENT,
        "partial_fence_triple",
    )
    assert await state(api, lease.execution_id) == t.PUBLIC_STATE_ACTIVE


async def test_bad_input_is_rejected_and_changes_nothing(api: Api) -> None:
    lease = await started(api)
    size = await keyspace_size(api.store)
    bad_suspends = [
        ({"waitpoint_key": "k" * 257}, C.INVALID_ARGUMENT, "invalid_waitpoint_key"),
        ({"waitpoint_id": "not-a-uuid"}, C.INVALID_ARGUMENT, "invalid_input"),
        ({"use_pending_waitpoint": True}, C.INVALID_ARGUMENT, "invalid_input"),
        ({"requested_by": "martian"}, C.INVALID_ARGUMENT, "invalid_input"),
        ({"resume_condition_json": "{not json"}, C.INVALID_ARGUMENT, "invalid_resume_condition"),
        ({"timeout_behavior": "explode"}, C.INVALID_ARGUMENT, "invalid_input"),
    ]
    for fields, code, reason in bad_suspends:
        fields.setdefault("resume_condition_json", "{}")
        await expect_error(
            api.worker.Suspend(wpb.SuspendRequest(lease=lease, **fields), metadata=api.metadata),
            code,
            reason,
        )
    bad_pending = [
        ({"expires_in_ms": 0}, "invalid_input"),
        ({"waitpoint_key": "k" * 257}, "invalid_waitpoint_key"),
        ({"waitpoint_id": "WP"}, "invalid_input"),
    ]
    for fields, reason in bad_pending:
        request = pending_request(lease, **fields)
        await expect_error(
            api.worker.CreatePendingWaitpoint(request, metadata=api.metadata),
            C.INVALID_ARGUMENT,
            reason,
        )
    await expect_error(
        api.worker.CloseWaitpoint(
            wpb.CloseWaitpointRequest(execution_id=lease.execution_id, waitpoint_id="x"),
            metadata=api.metadata,
        ),
        C.INVALID_ARGUMENT,
        "invalid_input",
    )
    assert await keyspace_size(api.store) == size
    assert await state(api, lease.execution_id) == t.PUBLIC_STATE_ACTIVE


async def test_lost_keystore_is_reinstalled_on_use(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    """A keyspace reset loses the keystore; the next mint re-runs the boot install
    (docs/architecture.md#durability-and-outages) and says so, without printing the secret."""
    lease = await started(api)
    tag = parse_execution_id(lease.execution_id, 1 << 16).tag
    await api.store.call("DEL", PartitionKeys(tag).hmac_keystore)
    with caplog.at_level(logging.DEBUG, logger="flowfabric"):
        reply = await suspend(api, lease, "x")
    assert reply.suspended.waitpoint_token.startswith("k1:")
    assert "keyspace reset detected" in caplog.text
    assert api.server.config.waitpoint_hmac_secret not in caplog.text
    stored = hash_to_dict(await api.store.call("HGETALL", PartitionKeys(tag).hmac_keystore))
    assert stored["current_kid"] == "k1"
