"""Complete, fail (retry), cancel, delay, waiting-for-children, progress, expire and replay,
called directly (docs/lifecycle.md)."""

from __future__ import annotations

import asyncio
import json

import pytest

from flowfabric.server.valkey.functions import execution
from flowfabric.server.valkey.ids import ExecutionId
from flowfabric.server.valkey.keys import ExecKeys, PartitionKeys
from flowfabric.server.valkey.store import Store
from tests.lua.util import (
    INSTANCE,
    LANE,
    Lease,
    cancel,
    check_invariants,
    claim,
    claim_raw,
    complete,
    core_of,
    create,
    create_and_claim,
    ctx_of,
    delay,
    exec_key,
    expire,
    fail,
    fake_suspend,
    fcall,
    hash_of,
    history_events,
    issue_grant,
    lane_sets_of,
    listening,
    make_flow_member,
    move_to_children,
    new_eid,
    now_ms,
    open_stream,
    promote,
    renew,
    replay,
    revoke,
    snapshot,
)

NO_FENCE = ["", "", ""]


def retry_policy(**rp: object) -> str:
    return json.dumps({"retry_policy": rp})


async def lease_is_released(store: Store, eid: ExecutionId) -> None:
    k, p = ExecKeys(eid), PartitionKeys(eid.tag)
    assert await store.call("EXISTS", k.lease_current) == 0
    assert await store.call("SISMEMBER", p.worker_leases(INSTANCE), str(eid)) == 0
    assert await store.call("ZSCORE", p.attempt_timeout, str(eid)) is None
    c = await core_of(store, eid)
    assert c["current_lease_id"] == c["current_worker_instance_id"] == c["lease_expires_at"] == ""
    assert c["current_lease_epoch"] != "", "the epoch is never cleared"
    assert (await history_events(store, eid))[-1]["event"] == "released"


# -- complete_execution ---------------------------------------------------------------------------


async def test_complete(store: Store) -> None:
    lease = await create_and_claim(store, attempt_timeout_ms="60000")
    await open_stream(store, lease.eid, 0)
    payload = bytes(range(256))
    reply = await complete(store, lease.eid, lease.fence, payload=payload, encoding="bin")
    assert reply == [1, b"OK", b"completed"]
    c = await check_invariants(store, lease.eid)
    assert (c["public_state"], c["attempt_state"], c["result_encoding"]) == (
        "completed",
        "attempt_terminal",
        "bin",
    )
    assert c["completed_at"] == c["last_transition_at"]
    k = ExecKeys(lease.eid)
    assert await store.call("GET", k.result) == payload
    attempt = await hash_of(store, k.attempt(0))
    assert (attempt["attempt_state"], attempt["ended_at"]) == ("ended_success", c["completed_at"])
    assert await store.call("HGET", k.stream_meta(0), "closed_reason") == b"attempt_success"
    await lease_is_released(store, lease.eid)
    assert (await history_events(store, lease.eid))[-1]["reason"] == "completed"


async def test_complete_lost_reply_is_replayed(store: Store) -> None:
    lease = await create_and_claim(store)
    assert (await complete(store, lease.eid, lease.fence))[1] == b"OK"
    before = await snapshot(store, lease.eid)
    again = await complete(store, lease.eid, lease.fence)
    assert again == [1, b"ALREADY_SATISFIED", b"replayed", b"completed"]
    assert await snapshot(store, lease.eid) == before, "a replay writes nothing"


async def test_unfenced_complete(store: Store) -> None:
    lease = await create_and_claim(store)
    assert await complete(store, lease.eid, NO_FENCE) == [0, b"fence_required"]
    partial = [lease.lease_id, "", lease.attempt_id]
    assert await complete(store, lease.eid, partial) == [0, b"partial_fence_triple"]
    assert (await core_of(store, lease.eid))["public_state"] == "active"
    override = await complete(store, lease.eid, NO_FENCE, source="operator_override")
    assert override == [1, b"OK", b"completed"]
    await check_invariants(store, lease.eid)


async def test_unfenced_override_still_respects_revoke(store: Store) -> None:
    lease = await create_and_claim(store)
    await revoke(store, lease.eid)
    reply = await complete(store, lease.eid, NO_FENCE, source="operator_override")
    assert reply == [0, b"lease_revoked"]


async def test_complete_events(store: Store) -> None:
    lease = await create_and_claim(store)
    await make_flow_member(store, lease.eid)
    await open_stream(store, lease.eid, 0)
    channel = PartitionKeys(lease.eid.tag).exec_events
    async with (
        listening(store, channel, sharded=True) as events,
        listening(store, "ff:dag:completions") as dag,
    ):
        assert (await complete(store, lease.eid, lease.fence))[1] == b"OK"
        got = await events.drain()
        completions = await dag.drain()
    # one event per call: the stream's close rides on the state change, which wakes its tails
    # too (they re-read the meta: docs/streams.md#close-markers)
    assert [(e["type"], e.get("public_state")) for e in got] == [("state_changed", "completed")]
    meta = ExecKeys(lease.eid).stream_meta(0)
    assert await store.call("HGET", meta, "closed_reason") == b"attempt_success"
    assert completions == [
        {"execution_id": str(lease.eid), "flow_id": "flow-1", "outcome": "success"}
    ]


# -- fail_execution -------------------------------------------------------------------------------


async def test_retry_with_exponential_backoff_then_terminal(store: Store) -> None:
    policy = retry_policy(
        max_retries=2, backoff={"type": "exponential", "initial_delay_ms": 1000, "multiplier": 2}
    )
    eid = new_eid()
    await create(store, eid, policy_json=policy)
    delayed = PartitionKeys(eid.tag).lane(LANE, "delayed")
    for n, expected in enumerate([1000, 2000]):
        lease = await claim(store, eid)
        await open_stream(store, eid, n)
        reply = await fail(store, eid, lease.fence, reason=f"err{n}")
        assert reply[:3] == [1, b"OK", b"retry_scheduled"]
        c = await check_invariants(store, eid)
        until = int(reply[3])
        assert until - int(c["last_transition_at"]) == expected
        assert await store.call("ZSCORE", delayed, str(eid)) == until
        assert reply[4] == str(n + 1).encode(), "next_attempt_index"
        assert (c["retry_count"], c["delay_until"], c["current_attempt_id"]) == (
            str(n + 1),
            str(until),
            "",
        )
        assert c["blocking_detail"] == f"retry backoff until {until} (attempt {n} failed: err{n})"
        assert (c["pending_retry_reason"], c["pending_previous_attempt_index"]) == (
            f"err{n}",
            str(n),
        )
        assert await store.call("HGET", ExecKeys(eid).stream_meta(n), "closed_reason") == (
            b"attempt_failure"
        )
        await lease_is_released(store, eid)
        assert (await promote(store, eid, until))[2] == b"promoted"
    lease = await claim(store, eid)
    assert await fail(store, eid, lease.fence) == [1, b"OK", b"terminal_failed"]
    c = await check_invariants(store, eid)
    assert (c["public_state"], c["failure_reason"]) == ("failed", "boom")
    for i in range(3):
        assert await store.call("HGET", ExecKeys(eid).attempt(i), "attempt_state") == (
            b"ended_failure"
        )


async def test_no_retry_policy_fails_at_once(store: Store) -> None:
    lease = await create_and_claim(store)
    assert await fail(store, lease.eid, lease.fence) == [1, b"OK", b"terminal_failed"]
    c = await check_invariants(store, lease.eid)
    assert c["public_state"] == "failed"
    await lease_is_released(store, lease.eid)
    attempt = await hash_of(store, ExecKeys(lease.eid).attempt(0))
    assert (attempt["failure_reason"], attempt["failure_category"]) == ("boom", "error")


async def fail_delay(store: Store, lease: Lease, **kw: str) -> int:
    reply = await fail(store, lease.eid, lease.fence, **kw)
    assert reply[2] == b"retry_scheduled", reply
    return int(reply[3]) - int((await core_of(store, lease.eid))["last_transition_at"])


async def test_fixed_backoff(store: Store) -> None:
    lease = await create_and_claim(
        store, policy_json=retry_policy(backoff={"type": "fixed", "delay_ms": 500})
    )
    assert await fail_delay(store, lease) == 500


async def test_exponential_backoff_is_capped(store: Store) -> None:
    backoff = {"type": "exponential", "initial_delay_ms": 1000, "max_delay_ms": 1500}
    eid = new_eid()
    await create(store, eid, policy_json=retry_policy(max_retries=5, backoff=backoff))
    delays = []
    for _ in range(4):
        lease = await claim(store, eid)
        delays.append(await fail_delay(store, lease))
        await promote(store, eid, await now_ms(store) + 10_000)
    assert delays == [1000, 1500, 1500, 1500], "retry_count 3 is capped at max_delay_ms"


async def test_default_retry_policy_values(store: Store) -> None:
    """A present retry_policy object defaults to 3 retries of exponential 1000 ms x 2."""
    eid = new_eid()
    await create(store, eid, policy_json=retry_policy())
    delays = []
    for _ in range(3):
        lease = await claim(store, eid)
        delays.append(await fail_delay(store, lease))
        await promote(store, eid, await now_ms(store) + 10_000)
    assert delays == [1000, 2000, 4000]
    lease = await claim(store, eid)
    assert (await fail(store, eid, lease.fence))[2] == b"terminal_failed"


async def test_retryable_categories(store: Store) -> None:
    policy = retry_policy(retryable_categories=["timeout"])
    listed = await create_and_claim(store, policy_json=policy)
    assert (await fail(store, listed.eid, listed.fence, category="timeout"))[2] == (
        b"retry_scheduled"
    )
    other = await create_and_claim(store, policy_json=policy)
    reply = await fail(store, other.eid, other.fence, category="bad_input")
    assert reply == [1, b"OK", b"terminal_failed"]


async def test_argument_retry_policy_overrides_the_stored_one(store: Store) -> None:
    lease = await create_and_claim(store)
    arg = json.dumps({"backoff": {"type": "fixed", "delay_ms": 250}})
    assert await fail_delay(store, lease, retry_policy_json=arg) == 250
    bad = await create_and_claim(store, policy_json=retry_policy())
    before = await core_of(store, bad.eid)
    reply = await fail(store, bad.eid, bad.fence, retry_policy_json="{not json")
    assert reply == [0, b"invalid_policy_json", b"malformed"]
    reply = await fail(store, bad.eid, bad.fence, retry_policy_json='{"max_retries": "two"}')
    assert reply == [
        0,
        b"invalid_policy_json",
        b"retry_policy.max_retries must be an integer 0..1000, got: two",
    ]
    assert await core_of(store, bad.eid) == before, "a refused policy changes nothing"


async def test_retry_lost_reply_is_replayed(store: Store) -> None:
    lease = await create_and_claim(store, policy_json=retry_policy())
    first = await fail(store, lease.eid, lease.fence)
    again = await fail(store, lease.eid, lease.fence)
    assert again == [1, b"ALREADY_SATISFIED", b"replayed", *first[2:]]
    assert (await core_of(store, lease.eid))["delay_until"] == first[3].decode()


async def test_terminal_fail_lost_reply_is_replayed(store: Store) -> None:
    lease = await create_and_claim(store)
    await fail(store, lease.eid, lease.fence)
    again = await fail(store, lease.eid, lease.fence)
    assert again == [1, b"ALREADY_SATISFIED", b"replayed", b"terminal_failed"]
    other = await fail(store, lease.eid, lease.fence, reason="another failure")
    assert other[:3] == [0, b"execution_not_active", b"failed"], "not this call's outcome"


async def test_fail_bad_epoch_changes_nothing(store: Store) -> None:
    lease = await create_and_claim(store)
    before = await snapshot(store, lease.eid)
    reply = await fail(store, lease.eid, [lease.lease_id, "one", lease.attempt_id])
    assert reply == [0, b"invalid_input", b"lease_epoch must be a number, got: one"]
    assert await snapshot(store, lease.eid) == before


# -- cancel_execution -----------------------------------------------------------------------------


async def test_cancel_eligible(store: Store) -> None:
    eid = new_eid()
    await create(store, eid)
    assert await cancel(store, eid, reason="no longer needed") == [
        1,
        b"OK",
        b"cancelled",
        b"runnable",
    ]
    c = await check_invariants(store, eid)
    assert (c["public_state"], c["cancelled_by"], c["cancellation_reason"]) == (
        "cancelled",
        "operator_override",
        "no longer needed",
    )
    assert c["attempt_state"] == "none", "Spec: no attempt was ever created"
    assert await lane_sets_of(store, eid) == ["terminal"]
    again = await cancel(store, eid)
    assert again == [0, b"execution_not_active", b"cancelled", b"0", b"terminal", b""]


async def test_cancel_by_the_holder(store: Store) -> None:
    lease = await create_and_claim(store)
    await open_stream(store, lease.eid, 0)
    reply = await cancel(store, lease.eid, source="lease_holder", fence=lease.fence)
    assert reply == [1, b"OK", b"cancelled", b"active"]
    c = await check_invariants(store, lease.eid)
    assert c["cancelled_by"] == "lease_holder"
    attempt = await hash_of(store, ExecKeys(lease.eid).attempt(0))
    assert (attempt["attempt_state"], attempt["failure_reason"]) == (
        "ended_cancelled",
        "cancelled: stop",
    )
    closed = await store.call("HGET", ExecKeys(lease.eid).stream_meta(0), "closed_reason")
    assert closed == b"attempt_cancelled"
    await lease_is_released(store, lease.eid)
    again = await cancel(store, lease.eid, source="lease_holder", fence=lease.fence)
    assert again == [1, b"ALREADY_SATISFIED", b"replayed", b"cancelled"]
    override = await cancel(store, lease.eid, fence=lease.fence)
    assert override == [
        0,
        b"execution_not_active",
        b"cancelled",
        lease.epoch.encode(),
        b"terminal",
        lease.attempt_id.encode(),
    ], "an operator_override cancel is never a replay"


async def test_holder_cancel_fence_rules(store: Store) -> None:
    lease = await create_and_claim(store)
    before = await snapshot(store, lease.eid)
    old = [lease.lease_id, "0", lease.attempt_id]
    assert await cancel(store, lease.eid, source="lease_holder", fence=old) == [0, b"stale_lease"]
    other = [lease.lease_id, "", "other-attempt"]
    assert await cancel(store, lease.eid, source="lease_holder", fence=other) == [
        0,
        b"stale_lease",
    ]
    assert await cancel(store, lease.eid, source="lease_holder") == [0, b"fence_required"]
    assert await snapshot(store, lease.eid) == before


async def test_holder_cancel_of_a_lost_lease(store: Store) -> None:
    lease = await create_and_claim(store, ttl=100)
    await asyncio.sleep(0.2)
    reply = await cancel(store, lease.eid, source="lease_holder", fence=lease.fence)
    assert reply == [0, b"lease_expired"]
    assert (await core_of(store, lease.eid))["ownership_state"] == "leased", "cancel never marks"
    await revoke(store, lease.eid)
    reply = await cancel(store, lease.eid, source="lease_holder", fence=lease.fence)
    assert reply == [0, b"lease_revoked"]
    reply = await cancel(store, lease.eid)
    assert reply == [1, b"OK", b"cancelled", b"active"], "an override cancels a revoked lease"
    await check_invariants(store, lease.eid)


async def test_cancel_suspended(store: Store) -> None:
    lease = await create_and_claim(store)
    now = await now_ms(store)
    wp = await fake_suspend(store, lease, now + 60_000)
    await check_invariants(store, lease.eid)
    assert await cancel(store, lease.eid) == [1, b"OK", b"cancelled", b"suspended"]
    c = await check_invariants(store, lease.eid)
    assert c["current_waitpoint_id"] == c["current_suspension_id"] == ""
    suspension = await hash_of(store, exec_key(lease.eid, "suspension:current"))
    assert suspension["close_reason"] == "cancelled"
    waitpoint = await hash_of(store, f"ff:wp:{lease.eid.tag}:{wp}")
    assert (waitpoint["state"], waitpoint["close_reason"]) == ("closed", "cancelled")
    condition = await hash_of(store, f"ff:wp:{lease.eid.tag}:{wp}:condition")
    assert (condition["closed"], condition["closed_reason"]) == ("1", "cancelled")
    p = PartitionKeys(lease.eid.tag)
    assert await store.call("ZSCORE", p.suspension_timeout, str(lease.eid)) is None
    assert await store.call("HGET", ExecKeys(lease.eid).attempt(0), "attempt_state") == (
        b"ended_cancelled"
    )


async def test_cancel_of_a_paused_attempt_ends_it(store: Store) -> None:
    lease = await create_and_claim(store)
    await open_stream(store, lease.eid, 0)
    await delay(store, lease.eid, lease.fence, await now_ms(store) + 60_000)
    assert await cancel(store, lease.eid) == [1, b"OK", b"cancelled", b"runnable"]
    await check_invariants(store, lease.eid)
    k = ExecKeys(lease.eid)
    assert await store.call("HGET", k.attempt(0), "attempt_state") == b"ended_cancelled"
    assert await store.call("HGET", k.stream_meta(0), "closed_reason") == b"attempt_cancelled"


async def test_cancel_publish_except_flow_cascade(store: Store) -> None:
    first, second = new_eid(), new_eid()
    for eid in (first, second):
        await create(store, eid)
        await make_flow_member(store, eid)
    async with listening(store, "ff:dag:completions") as dag:
        await cancel(store, first)
        await cancel(store, second, source="flow_cascade")
        got = await dag.drain()
    assert got == [{"execution_id": str(first), "flow_id": "flow-1", "outcome": "cancelled"}]


# -- delay_execution / move_to_waiting_children ----------------------------------------------------


async def test_delay(store: Store) -> None:
    lease = await create_and_claim(store, attempt_timeout_ms="60000")
    until = await now_ms(store) + 10_000
    assert await delay(store, lease.eid, lease.fence, until) == [1, b"OK", str(until).encode()]
    c = await check_invariants(store, lease.eid)
    assert (c["public_state"], c["attempt_state"], c["delay_until"]) == (
        "delayed",
        "attempt_interrupted",
        str(until),
    )
    assert c["blocking_detail"] == f"delayed until {until}"
    assert c["current_attempt_id"] == lease.attempt_id, "the attempt is paused, not ended"
    attempt = await hash_of(store, ExecKeys(lease.eid).attempt(0))
    assert (attempt["attempt_state"], attempt["suspension_id"]) == ("suspended", "worker_delay")
    await lease_is_released(store, lease.eid)
    score = await store.call(
        "ZSCORE", PartitionKeys(lease.eid.tag).lane(LANE, "delayed"), str(lease.eid)
    )
    assert score == until
    # A lost reply is replayed: still delayed by this fence until the same time.
    again = await delay(store, lease.eid, lease.fence, until)
    assert again == [1, b"ALREADY_SATISFIED", b"replayed", str(until).encode()]
    other = await delay(store, lease.eid, lease.fence, until + 1)
    assert other[:2] == [0, b"execution_not_active"], "another delay_until is not this call"


async def test_graceful_shutdown_delay_hands_work_over(store: Store) -> None:
    lease = await create_and_claim(store)
    now = await now_ms(store)
    await delay(store, lease.eid, lease.fence, now + 1)
    assert await promote(store, lease.eid, now + 1) == [1, b"OK", b"promoted"]
    c = await check_invariants(store, lease.eid)
    assert (c["public_state"], c["attempt_state"]) == ("waiting", "attempt_interrupted")
    assert (await issue_grant(store, lease.eid, worker="w2", instance="w2-i1"))[1] == b"OK"
    reply = await claim_raw(store, lease.eid, worker="w2", instance="w2-i1")
    assert reply == [0, b"use_claim_resumed_execution"]


async def test_delay_bad_input_changes_nothing(store: Store) -> None:
    lease = await create_and_claim(store)
    before = await snapshot(store, lease.eid)
    reply = await delay(store, lease.eid, lease.fence, "tomorrow")
    assert reply == [0, b"invalid_input", b"delay_until must be a number, got: tomorrow"]
    assert await snapshot(store, lease.eid) == before


async def test_move_to_waiting_children(store: Store) -> None:
    lease = await create_and_claim(store)
    assert await move_to_children(store, lease.eid, lease.fence) == [1, b"OK"]
    c = await check_invariants(store, lease.eid)
    assert (c["public_state"], c["blocking_reason"], c["attempt_state"]) == (
        "waiting_children",
        "waiting_for_children",
        "attempt_interrupted",
    )
    assert c["blocking_detail"] == "waiting for child executions to complete"
    blocked = PartitionKeys(lease.eid.tag).lane(LANE, "blocked:dependencies")
    assert await store.call("ZSCORE", blocked, str(lease.eid)) == int(c["created_at"])
    attempt = await hash_of(store, ExecKeys(lease.eid).attempt(0))
    assert (attempt["attempt_state"], attempt["suspension_id"]) == ("suspended", "waiting_children")
    await lease_is_released(store, lease.eid)
    assert (await history_events(store, lease.eid))[-1]["reason"] == "waiting_children"


async def test_move_with_an_expired_lease(store: Store) -> None:
    lease = await create_and_claim(store, ttl=100)
    await asyncio.sleep(0.2)
    assert await move_to_children(store, lease.eid, lease.fence) == [0, b"lease_expired"]
    c = await check_invariants(store, lease.eid)
    assert c["ownership_state"] == "lease_expired_reclaimable"


# -- update_progress ------------------------------------------------------------------------------


async def progress(
    store: Store, lease: Lease, pct: str = "", msg: str = "", epoch: str = ""
) -> list:
    values = {
        "execution_id": str(lease.eid), "lease_id": lease.lease_id,
        "lease_epoch": epoch or lease.epoch, "progress_pct": pct, "progress_message": msg,
    }  # fmt: skip
    return await fcall(store, execution.PROGRESS, ctx_of(lease.eid), values)


async def test_progress(store: Store) -> None:
    lease = await create_and_claim(store)
    assert await progress(store, lease, "40", "halfway") == [1, b"OK"]
    c = await core_of(store, lease.eid)
    assert (c["progress_pct"], c["progress_message"]) == ("40", "halfway")
    assert c["progress_updated_at"] != ""
    assert await progress(store, lease, msg="almost") == [1, b"OK"]
    c = await core_of(store, lease.eid)
    assert (c["progress_pct"], c["progress_message"]) == ("40", "almost")
    before = await snapshot(store, lease.eid)
    assert await progress(store, lease, "101") == [
        0,
        b"invalid_input",
        b"progress_pct must be between 0 and 100, got: 101",
    ]
    assert await progress(store, lease, "5", epoch="2") == [0, b"stale_lease"]
    assert await snapshot(store, lease.eid) == before
    await complete(store, lease.eid, lease.fence)
    reply = await progress(store, lease, "50")
    assert reply[:2] == [0, b"execution_not_active"]


async def test_progress_on_an_expired_lease_does_not_mark(store: Store) -> None:
    lease = await create_and_claim(store, ttl=100)
    await asyncio.sleep(0.2)
    assert await progress(store, lease, "10") == [0, b"lease_expired"]
    assert (await core_of(store, lease.eid))["ownership_state"] == "leased"


# -- expire_execution -----------------------------------------------------------------------------


async def test_expire_active_attempt_timeout(store: Store) -> None:
    lease = await create_and_claim(store, attempt_timeout_ms="100")
    await open_stream(store, lease.eid, 0)
    await asyncio.sleep(0.2)
    assert (await renew(store, lease))[1] == b"OK", "renewing does not outrun the attempt timeout"
    assert await expire(store, lease.eid) == [1, b"OK", b"expired", b"active"]
    c = await check_invariants(store, lease.eid)
    assert (c["public_state"], c["failure_reason"]) == ("expired", "attempt_timeout")
    attempt = await hash_of(store, ExecKeys(lease.eid).attempt(0))
    assert (attempt["attempt_state"], attempt["failure_reason"]) == (
        "ended_failure",
        "attempt_timeout",
    )
    closed = await store.call("HGET", ExecKeys(lease.eid).stream_meta(0), "closed_reason")
    assert closed == b"expired"
    await lease_is_released(store, lease.eid)
    assert (await history_events(store, lease.eid))[-1]["reason"] == "expired:attempt_timeout"


async def test_expire_eligible_past_its_deadline(store: Store) -> None:
    eid = new_eid()
    await create(store, eid, execution_deadline_at=str(await now_ms(store) - 1))
    reply = await expire(store, eid, "execution_deadline")
    assert reply == [1, b"OK", b"expired", b"runnable"]
    c = await check_invariants(store, eid)
    assert (c["public_state"], c["attempt_state"]) == ("expired", "none")
    assert await lane_sets_of(store, eid) == ["terminal"]
    p = PartitionKeys(eid.tag)
    assert await store.call("ZSCORE", p.execution_deadline, str(eid)) is None


async def test_expire_suspended(store: Store) -> None:
    lease = await create_and_claim(store)
    now = await now_ms(store)
    wp = await fake_suspend(store, lease, now + 60_000)
    p = PartitionKeys(lease.eid.tag)
    await store.call("ZADD", p.execution_deadline, now - 1, str(lease.eid))
    reply = await expire(store, lease.eid, "execution_deadline")
    assert reply == [1, b"OK", b"expired", b"suspended"]
    await check_invariants(store, lease.eid)
    suspension = await hash_of(store, exec_key(lease.eid, "suspension:current"))
    assert suspension["close_reason"] == "expired:execution_deadline"
    assert (await hash_of(store, f"ff:wp:{lease.eid.tag}:{wp}"))["state"] == "closed"
    assert await store.call("ZSCORE", p.suspension_timeout, str(lease.eid)) is None
    assert await store.call("ZSCORE", p.lane(LANE, "suspended"), str(lease.eid)) is None


async def test_expire_cleanup_and_not_due(store: Store) -> None:
    lease = await create_and_claim(store)
    await complete(store, lease.eid, lease.fence)
    p = PartitionKeys(lease.eid.tag)
    await store.call("ZADD", p.attempt_timeout, 1, str(lease.eid))
    assert await expire(store, lease.eid) == [1, b"OK", b"already_terminal"]
    assert await store.call("ZSCORE", p.attempt_timeout, str(lease.eid)) is None
    gone = new_eid()
    await store.call("ZADD", p.execution_deadline, 1, str(gone))
    assert await expire(store, gone, "execution_deadline") == [1, b"OK", b"not_found_cleaned"]
    assert await store.call("ZSCORE", p.execution_deadline, str(gone)) is None

    live = await create_and_claim(store, attempt_timeout_ms="60000")
    before = await snapshot(store, live.eid)
    assert await expire(store, live.eid) == [1, b"ALREADY_SATISFIED", b"not_due"]
    assert await expire(store, live.eid, "execution_deadline") == [
        1,
        b"ALREADY_SATISFIED",
        b"not_due",
    ]
    reply = await expire(store, live.eid, "boredom")
    assert reply[:2] == [0, b"invalid_input"]
    assert await snapshot(store, live.eid) == before


# -- replay_execution -----------------------------------------------------------------------------


async def test_replay_completed(store: Store) -> None:
    policy = retry_policy(backoff={"type": "fixed", "delay_ms": 1})
    lease = await create_and_claim(store, policy_json=policy)
    retried = await fail(store, lease.eid, lease.fence)
    await promote(store, lease.eid, int(retried[3]))
    second = await claim(store, lease.eid)
    await complete(store, lease.eid, second.fence, payload=b"done")
    assert await replay(store, lease.eid) == [1, b"OK", b"waiting"]
    c = await check_invariants(store, lease.eid)
    assert (c["attempt_state"], c["replay_count"], c["retry_count"], c["completed_at"]) == (
        "pending_replay_attempt",
        "1",
        "0",
        "",
    )
    assert c["failure_reason"] == ""
    assert c["pending_previous_attempt_index"] == "1"
    assert await store.call("EXISTS", ExecKeys(lease.eid).result) == 0
    events = await history_events(store, lease.eid)
    assert (events[-1]["event"], events[-1]["replay_type"]) == ("replay_initiated", "normal")
    third = await claim(store, lease.eid)
    assert (third.attempt_index, third.attempt_type, third.epoch) == (2, "replay", "3")
    attempt = await hash_of(store, ExecKeys(lease.eid).attempt(2))
    assert attempt["replayed_from_attempt_index"] == "1"
    assert await complete(store, lease.eid, second.fence) == [0, b"stale_lease"]
    assert (await complete(store, lease.eid, third.fence))[1] == b"OK"


async def test_replay_preconditions(store: Store) -> None:
    lease = await create_and_claim(store, policy_json=json.dumps({"max_replay_count": 1}))
    assert await replay(store, lease.eid) == [0, b"execution_not_terminal"]
    await complete(store, lease.eid, lease.fence)
    assert (await replay(store, lease.eid))[1] == b"OK"
    await cancel(store, lease.eid)
    assert await replay(store, lease.eid) == [0, b"max_replays_exhausted"]
    assert await replay(store, new_eid()) == [0, b"execution_not_found"]


async def skipped_member(store: Store, edges: dict[str, str]) -> ExecutionId:
    """A flow member the flows area skipped (edge states given); not built yet, so staged."""
    eid = new_eid()
    await create(store, eid)
    await make_flow_member(store, eid)
    k, p = ExecKeys(eid), PartitionKeys(eid.tag)
    vector = {
        "lifecycle_phase": "terminal",
        "eligibility_state": "not_applicable",
        "blocking_reason": "none",
        "blocking_detail": "",
        "terminal_outcome": "skipped",
        "attempt_state": "none",
        "public_state": "skipped",
        "completed_at": str(await now_ms(store)),
    }
    await store.call("HSET", k.core, *(x for kv in vector.items() for x in kv))
    await store.call("ZREM", p.lane(LANE, "eligible"), str(eid))
    await store.call("ZREM", p.lane_namespace(LANE, "ns"), str(eid))  # and its namespace side
    await store.call("ZREM", p.lane_namespaces(LANE), "ns")
    await store.call("ZADD", p.lane(LANE, "terminal"), 1, str(eid))
    for edge, state in edges.items():
        await store.call(
            "HSET", exec_key(eid, f"dep:{edge}"), "state", state, "last_resolved_at", "1"
        )
    impossible = sum(state == "impossible" for state in edges.values())
    await store.call(
        "HSET",
        exec_key(eid, "deps:meta"),
        "unsatisfied_required_count",
        "0",
        "impossible_required_count",
        str(impossible),
    )
    return eid


async def test_replay_skipped_flow_member(store: Store) -> None:
    eid = await skipped_member(store, {"e1": "impossible", "e2": "satisfied"})
    assert await replay(store, eid, ("e1", "e2")) == [1, b"OK", b"waiting_children"]
    c = await check_invariants(store, eid)
    assert c["blocking_detail"] == "1 dep(s) unsatisfied after replay"
    assert c["attempt_state"] == "pending_replay_attempt"
    edge = await hash_of(store, exec_key(eid, "dep:e1"))
    assert (edge["state"], edge["last_resolved_at"]) == ("unsatisfied", "")
    assert (await hash_of(store, exec_key(eid, "dep:e2")))["state"] == "satisfied"
    assert await store.call("SMEMBERS", exec_key(eid, "deps:unresolved")) == {b"e1"}
    meta = await hash_of(store, exec_key(eid, "deps:meta"))
    assert (meta["unsatisfied_required_count"], meta["impossible_required_count"]) == ("1", "0")
    blocked = PartitionKeys(eid.tag).lane(LANE, "blocked:dependencies")
    assert await store.call("ZSCORE", blocked, str(eid)) == int(c["created_at"])
    events = await history_events(store, eid)
    assert events[-1]["replay_type"] == "skipped_flow_member"


async def test_replay_skipped_member_without_open_edges_is_normal(store: Store) -> None:
    eid = await skipped_member(store, {"e1": "satisfied"})
    assert await replay(store, eid, ("e1",)) == [1, b"OK", b"waiting"]
    await check_invariants(store, eid)


@pytest.mark.parametrize("terminal", ["complete", "fail", "cancel"])
async def test_terminal_transitions_leave_one_lane_set(store: Store, terminal: str) -> None:
    lease = await create_and_claim(store)
    if terminal == "complete":
        await complete(store, lease.eid, lease.fence)
    elif terminal == "fail":
        await fail(store, lease.eid, lease.fence)
    else:
        await cancel(store, lease.eid)
    assert await lane_sets_of(store, lease.eid) == ["terminal"]
    await check_invariants(store, lease.eid)
