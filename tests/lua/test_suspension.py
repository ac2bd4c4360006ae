"""Pending waitpoints, suspend, resume, close_waitpoint, suspension timeouts, the resume-signal
and waitpoint reads, and claim_resumed after a resume, called directly (docs/suspension.md)."""

from __future__ import annotations

import json
import uuid

import pytest

from flowfabric.server.valkey.functions import maintenance, scheduling
from flowfabric.server.valkey.keys import ExecKeys, PartitionKeys
from flowfabric.server.valkey.store import Store
from tests.lua.util import (
    INSTANCE,
    LANE,
    WORKER,
    Lease,
    cancel,
    check_invariants,
    close_wp,
    condition,
    core_of,
    create_pending,
    ctx_of,
    exec_key,
    expire,
    expire_suspension,
    fcall,
    flip_last,
    hash_of,
    history_events,
    issue_grant,
    lane_sets_of,
    leased,
    list_waitpoints,
    listening,
    make_flow_member,
    new_eid,
    now_ms,
    open_stream,
    promote,
    renew,
    resume,
    resume_signals,
    send_signal,
    snapshot,
    suspend,
    suspended,
    wp_key,
)

NO_TIMEOUT = 9999999999999


def sig_channel(lease: Lease) -> str:
    return PartitionKeys(lease.eid.tag).signal_events


async def claim_resumed(store: Store, lease: Lease) -> list:
    values = {
        "execution_id": str(lease.eid), "worker_id": WORKER, "worker_instance_id": INSTANCE,
        "lane_id": LANE, "lease_id": f"lease-{uuid.uuid4()}", "lease_ttl_ms": "30000",
        "current_attempt_index": "0", "remaining_attempt_timeout_ms": "",
    }  # fmt: skip
    return await fcall(store, scheduling.CLAIM_RESUMED, ctx_of(lease.eid), values)


# -- create_pending_waitpoint (docs/suspension.md#pending-waitpoints)
# ---------------------------------------------------------------


async def test_create_pending_waitpoint(store: Store) -> None:
    lease = await leased(store)
    eid, wpid = lease.eid, str(uuid.uuid4())
    before = await now_ms(store)
    async with listening(store, sig_channel(lease), sharded=True) as events:
        reply = await create_pending(store, lease, wpid=wpid)
        got = await events.drain()
    assert reply[:4] == [1, b"OK", wpid.encode(), f"wpk:{wpid}".encode()]
    token, expires = reply[4].decode(), int(reply[5])
    assert token.startswith("k1:") and len(token) == 43
    wp = await hash_of(store, wp_key(eid, wpid))
    assert wp["state"] == "pending" and wp["waitpoint_token"] == token
    assert wp["execution_id"] == str(eid) and wp["suspension_id"] == ""
    assert wp["expires_at"] == str(expires) and wp["signal_count"] == "0"
    assert before + 60_000 <= expires <= await now_ms(store) + 60_000
    p = PartitionKeys(eid.tag)
    assert int(await store.call("ZSCORE", p.pending_waitpoint_expiry, wpid)) == expires
    assert await store.call("SISMEMBER", ExecKeys(eid).waitpoints, wpid) == 1
    c = await check_invariants(store, eid)
    assert c["public_state"] == "active" and c["current_waitpoint_id"] == ""
    assert got == [
        {
            "type": "waitpoint_opened",
            "execution_id": str(eid),
            "waitpoint_id": wpid,
            "state": "pending",
            "at": got[0]["at"],
        }
    ]
    assert token not in json.dumps(got)
    # 2. same id again
    assert await create_pending(store, lease, wpid=wpid) == [0, b"waitpoint_already_exists"]


async def test_create_pending_rejections_write_nothing(store: Store) -> None:
    lease = await leased(store)
    eid = lease.eid
    before = await snapshot(store, eid)
    lid, epoch, aid = lease.fence
    cases = [
        ({"idx": 1}, [0, b"stale_lease"]),
        ({"fence": [lid, str(int(epoch) + 1), aid]}, [0, b"stale_lease"]),
        ({"fence": [lid, "", ""]}, [0, b"partial_fence_triple"]),
        ({"fence": ["", "", ""]}, [0, b"fence_required"]),
        ({"expires_in_ms": 0}, [0, b"invalid_input"]),
    ]
    for over, expected in cases:
        reply = await create_pending(store, lease, **over)  # type: ignore[arg-type]
        assert reply[:2] == expected, (over, reply)
    assert await snapshot(store, eid) == before
    assert await store.call("SCARD", ExecKeys(eid).waitpoints) == 0
    # expired lease: reported, not marked (no write)
    await store.call("HSET", ExecKeys(eid).core, "lease_expires_at", "1")
    assert (await create_pending(store, lease))[:2] == [0, b"lease_expired"]
    assert (await core_of(store, eid))["ownership_state"] == "leased"
    # 3. a suspended execution
    other, _, _ = await suspended(store)
    assert (await create_pending(store, other))[1] == b"execution_not_active"


# -- suspend_execution (docs/suspension.md#suspend)
# ----------------------------------------------------------------------


async def test_suspend_fresh(store: Store) -> None:
    lease = await leased(store, attempt_timeout_ms="60000")
    eid, wpid, sid = lease.eid, str(uuid.uuid4()), str(uuid.uuid4())
    async with listening(store, sig_channel(lease), sharded=True) as events:
        reply = await suspend(
            store,
            lease,
            condition("approval_result"),
            wpid=wpid,
            sid=sid,
            reason="waiting_for_approval",
        )
        got = await events.drain()
    assert reply[:5] == [1, b"OK", sid.encode(), wpid.encode(), f"wpk:{wpid}".encode()]
    token = reply[5].decode()
    c = await check_invariants(store, eid)
    assert (c["lifecycle_phase"], c["ownership_state"], c["eligibility_state"]) == (
        "suspended",
        "unowned",
        "not_applicable",
    )
    assert (c["blocking_reason"], c["attempt_state"], c["public_state"]) == (
        "waiting_for_approval",
        "attempt_interrupted",
        "suspended",
    )
    assert c["blocking_detail"] == f"suspended: waitpoint {wpid} awaiting waiting_for_approval"
    assert (c["current_suspension_id"], c["current_waitpoint_id"]) == (sid, wpid)
    assert c["current_lease_id"] == "" and c["current_lease_epoch"] == lease.epoch
    k, p = ExecKeys(eid), PartitionKeys(eid.tag)
    assert await store.call("EXISTS", k.lease_current) == 0
    assert await store.call("ZSCORE", p.attempt_timeout, str(eid)) is None
    assert await store.call("SISMEMBER", p.worker_leases(INSTANCE), str(eid)) == 0
    assert int(await store.call("ZSCORE", p.lane(LANE, "suspended"), str(eid))) == NO_TIMEOUT
    assert await store.call("ZSCORE", p.suspension_timeout, str(eid)) is None
    last = (await history_events(store, eid))[-1]
    assert (last["event"], last["reason"]) == ("released", "suspend")
    attempt = await hash_of(store, k.attempt(0))
    assert attempt["attempt_state"] == "suspended" and attempt["suspension_id"] == sid
    wp = await hash_of(store, wp_key(eid, wpid))
    assert (wp["state"], wp["suspension_id"], wp["waitpoint_token"]) == ("active", sid, token)
    assert wp["created_at"] == wp["activated_at"] and wp["expires_at"] == ""
    cond = await hash_of(store, f"{wp_key(eid, wpid)}:condition")
    assert cond == {
        "condition_type": "signal_set",
        "match_mode": "any",
        "minimum_signal_count": "1",
        "total_matchers": "1",
        "satisfied_count": "0",
        "closed": "0",
        "closed_at": "",
        "closed_reason": "",
        "updated_at": cond["updated_at"],
        "matcher:0:name": "approval_result",
        "matcher:0:satisfied": "0",
        "matcher:0:signal_id": "",
    }
    s = await hash_of(store, k.suspension_current)
    assert (s["suspension_id"], s["waitpoint_id"], s["attempt_index"]) == (sid, wpid, "0")
    assert (s["timeout_behavior"], s["timeout_at"], s["closed_at"]) == ("fail", "", "")
    assert s["continuation_metadata_pointer"] == "cont-ptr"
    assert json.loads(s["buffered_signal_summary_json"]) == {
        "total_count": 0,
        "matched_count": 0,
        "signal_names": [],
    }
    assert await store.call("SISMEMBER", k.waitpoints, wpid) == 1
    assert [e["type"] for e in got] == ["waitpoint_opened"]
    assert got[0]["state"] == "active" and token not in json.dumps(got)
    # the token validates: delivering the named signal resumes
    assert (await send_signal(store, eid, wpid, token, name="approval_result"))[3] == (
        b"resume_condition_satisfied"
    )
    # not idempotent: a retry gets execution_not_active
    assert (await suspend(store, lease))[1] == b"execution_not_active"


async def test_suspend_with_timeout_indexes_it(store: Store) -> None:
    lease = await leased(store)
    timeout = await now_ms(store) + 60_000
    reply = await suspend(store, lease, timeout_at=timeout, behavior="auto_resume")
    assert reply[:2] == [1, b"OK"]
    p = PartitionKeys(lease.eid.tag)
    assert int(await store.call("ZSCORE", p.lane(LANE, "suspended"), str(lease.eid))) == timeout
    assert int(await store.call("ZSCORE", p.suspension_timeout, str(lease.eid))) == timeout
    wp = await hash_of(store, wp_key(lease.eid, reply[3].decode()))
    assert wp["expires_at"] == str(timeout)


@pytest.mark.parametrize(
    ("over", "code"),
    [
        ({"cond": "{not json"}, b"invalid_resume_condition"),
        ({"cond": "[1]"}, b"invalid_resume_condition"),
        ({"cond": condition(minimum=3)}, b"invalid_resume_condition"),
        ({"cond": condition("a", "b", mode="any", minimum=3)}, b"invalid_resume_condition"),
        ({"cond": condition("a", minimum=0)}, b"invalid_resume_condition"),
        ({"cond": json.dumps({"required_signal_names": "a"})}, b"invalid_resume_condition"),
        ({"cond": json.dumps({"required_signal_names": [1]})}, b"invalid_resume_condition"),
        ({"behavior": "explode"}, b"invalid_input"),
        ({"policy": "[oops"}, b"invalid_input"),
        ({"timeout_at": "soon"}, b"invalid_input"),
        ({"idx": 1}, b"invalid_lease_for_suspend"),
        ({"fence": ["lease-x", "", ""]}, b"partial_fence_triple"),
        ({"fence": ["", "", ""]}, b"fence_required"),
        ({"stale": True}, b"stale_lease"),
        ({"ks": "ff:noop:{fp:7}"}, b"invalid_keys_missing_hmac"),
    ],
)
async def test_suspend_rejections_write_nothing(store: Store, over: dict, code: bytes) -> None:
    lease = await leased(store)
    over = dict(over)
    if over.pop("stale", False):
        lid, epoch, aid = lease.fence
        over["fence"] = [lid, str(int(epoch) + 1), aid]
    before = await snapshot(store, lease.eid)
    wpid = str(uuid.uuid4())
    reply = await suspend(store, lease, wpid=wpid, **over)
    assert reply[:2] == [0, code]
    assert await snapshot(store, lease.eid) == before
    assert await store.call("EXISTS", wp_key(lease.eid, wpid)) == 0
    assert await store.call("EXISTS", exec_key(lease.eid, "suspension:current")) == 0


async def test_suspend_on_an_expired_lease_marks_it(store: Store) -> None:
    lease = await leased(store)
    await store.call("HSET", ExecKeys(lease.eid).core, "lease_expires_at", "1")
    assert (await suspend(store, lease))[:2] == [0, b"lease_expired"]
    c = await core_of(store, lease.eid)
    assert c["ownership_state"] == "lease_expired_reclaimable"
    assert (await history_events(store, lease.eid))[-1]["event"] == "expired"


async def test_suspend_fresh_refuses_a_live_waitpoint(store: Store) -> None:
    lease = await leased(store)
    wpid = str(uuid.uuid4())
    assert (await create_pending(store, lease, wpid=wpid))[:2] == [1, b"OK"]
    before = await snapshot(store, lease.eid)
    wp_before = await hash_of(store, wp_key(lease.eid, wpid))
    assert await suspend(store, lease, wpid=wpid) == [0, b"waitpoint_already_exists"]
    assert await snapshot(store, lease.eid) == before
    assert await hash_of(store, wp_key(lease.eid, wpid)) == wp_before


async def test_suspend_pending_path_rejections(store: Store) -> None:
    lease = await leased(store)
    eid = lease.eid
    assert (await suspend(store, lease, use_pending=True))[:2] == [0, b"waitpoint_not_found"]
    # another execution's pending waitpoint (same partition)
    other = await leased(store)
    foreign = (await create_pending(store, other))[2].decode()
    reply = await suspend(store, lease, wpid=foreign, use_pending=True)
    assert reply == [0, b"invalid_waitpoint_for_execution"]
    wpid = (await create_pending(store, lease))[2].decode()
    key = wp_key(eid, wpid)
    await store.call("HSET", key, "expires_at", "1")
    reply = await suspend(store, lease, wpid=wpid, use_pending=True)
    assert reply == [0, b"pending_waitpoint_expired"]
    await store.call("HSET", key, "expires_at", str(await now_ms(store) + 60_000))
    await store.call("HSET", key, "waitpoint_token", "")
    reply = await suspend(store, lease, wpid=wpid, use_pending=True)
    assert reply == [0, b"waitpoint_not_token_bound"]
    # docs/suspension.md#buffering-on-pending-waitpoints: closed by the expiry scanner -> not
    # pending
    await store.call("HSET", key, "waitpoint_token", "k1:" + "0" * 40)
    assert await close_wp(store, eid, wpid, "never_committed") == [1, b"OK", b"closed"]
    assert (await hash_of(store, key))["state"] == "expired"
    reply = await suspend(store, lease, wpid=wpid, use_pending=True)
    assert reply == [0, b"waitpoint_not_pending"]
    assert (await check_invariants(store, eid))["public_state"] == "active"


async def test_buffered_signal_satisfies_a_later_suspend(store: Store) -> None:
    """docs/suspension.md#suspend: AlreadySatisfied, the worker keeps its lease."""
    lease = await leased(store)
    eid = lease.eid
    reply = await create_pending(store, lease)
    wpid, token = reply[2].decode(), reply[4].decode()
    sig = str(uuid.uuid4())
    buffered = await send_signal(
        store, eid, wpid, token, name="callback_result", buffer=True, sig=sig
    )
    assert buffered[:4] == [1, b"OK", sig.encode(), b"buffered_for_pending_waitpoint"]
    sid = str(uuid.uuid4())
    async with listening(store, sig_channel(lease), sharded=True) as events:
        reply = await suspend(
            store, lease, condition("callback_result"), wpid=wpid, sid=sid, use_pending=True
        )
        got = await events.drain()
    assert reply == [
        1,
        b"ALREADY_SATISFIED",
        sid.encode(),
        wpid.encode(),
        f"wpk:{wpid}".encode(),
        token.encode(),
        sig.encode(),  # the satisfying signal
    ]
    c = await check_invariants(store, eid)
    assert (c["lifecycle_phase"], c["ownership_state"]) == ("active", "leased")
    assert c["current_suspension_id"] == ""
    assert (await renew(store, lease))[:2] == [1, b"OK"], "the lease is untouched"
    wp = await hash_of(store, wp_key(eid, wpid))
    assert (wp["state"], wp["close_reason"], wp["matched_signal_count"]) == (
        "closed",
        "resumed",
        "1",
    )
    assert wp["satisfied_at"] != "" and wp["signal_count"] == "1"
    cond = await hash_of(store, f"{wp_key(eid, wpid)}:condition")
    assert (cond["closed"], cond["closed_reason"], cond["matcher:0:signal_id"]) == (
        "1",
        "satisfied",
        sig,
    )
    signal = await hash_of(store, f"ff:signal:{eid.tag}:{sig}")
    assert signal["observed_effect"] == "resume_condition_satisfied"
    assert signal["matched_waitpoint_id"] == wpid
    p = PartitionKeys(eid.tag)
    assert await store.call("ZSCORE", p.pending_waitpoint_expiry, wpid) is None
    assert await store.call("EXISTS", exec_key(eid, "suspension:current")) == 0
    assert [(e["type"], e.get("close_reason")) for e in got] == [("waitpoint_closed", "resumed")]
    # replays of the token now meet a closed waitpoint
    again = await send_signal(store, eid, wpid, token, name="callback_result")
    assert again == [0, b"waitpoint_closed"]


async def test_partial_buffer_then_live_signal(store: Store) -> None:
    """docs/suspension.md#suspend: buffered `a` for [a, b] all -> suspended; `b` resumes; both
    returned."""
    lease = await leased(store)
    eid = lease.eid
    reply = await create_pending(store, lease)
    wpid, token = reply[2].decode(), reply[4].decode()
    sig_a = str(uuid.uuid4())
    await send_signal(store, eid, wpid, token, name="a", buffer=True, sig=sig_a, payload=b"A")
    await send_signal(store, eid, wpid, token, name="zzz", buffer=True)
    async with listening(store, sig_channel(lease), sharded=True) as events:
        reply = await suspend(store, lease, condition("a", "b"), wpid=wpid, use_pending=True)
        got = await events.drain()
    assert reply[:2] == [1, b"OK"] and reply[5].decode() == token
    assert [(e["type"], e["state"]) for e in got] == [("waitpoint_opened", "active")]
    wp = await hash_of(store, wp_key(eid, wpid))
    assert (wp["state"], wp["signal_count"], wp["matched_signal_count"]) == ("active", "2", "1")
    cond = await hash_of(store, f"{wp_key(eid, wpid)}:condition")
    assert (cond["matcher:0:satisfied"], cond["matcher:1:satisfied"]) == ("1", "0")
    assert cond["satisfied_count"] == "1"
    s = await hash_of(store, exec_key(eid, "suspension:current"))
    assert json.loads(s["buffered_signal_summary_json"]) == {
        "total_count": 2,
        "matched_count": 1,
        "signal_names": ["a", "zzz"],
    }
    assert await store.call("ZSCORE", PartitionKeys(eid.tag).pending_waitpoint_expiry, wpid) is None
    sig_b = str(uuid.uuid4())
    reply = await send_signal(store, eid, wpid, token, name="b", sig=sig_b, payload=b"B")
    assert reply[3] == b"resume_condition_satisfied"
    assert (await check_invariants(store, eid))["public_state"] == "waiting"
    signals = await resume_signals(store, eid)
    assert [(f["signal_id"], f["signal_name"], pl) for f, pl in signals] == [
        (sig_a, "a", b"A"),
        (sig_b, "b", b"B"),
    ]
    assert await resume_signals(store, eid, idx=1) == []


async def test_zero_matcher_conditions_are_never_satisfied(store: Store) -> None:
    for kind in ("operator_only", "timeout_only"):
        cond = json.dumps({"condition_type": kind, "required_signal_names": ["x"]})
        lease, wpid, token = await suspended(store, cond)
        cnd = await hash_of(store, f"{wp_key(lease.eid, wpid)}:condition")
        assert cnd["total_matchers"] == "0"
        reply = await send_signal(store, lease.eid, wpid, token, name="x")
        assert reply[3] == b"no_op"
        assert (await core_of(store, lease.eid))["public_state"] == "suspended"
        assert await resume(store, lease.eid) == [1, b"OK", b"waiting"]


async def test_empty_name_list_is_one_wildcard(store: Store) -> None:
    lease, wpid, token = await suspended(store, "")
    cond = await hash_of(store, f"{wp_key(lease.eid, wpid)}:condition")
    assert (cond["total_matchers"], cond["matcher:0:name"]) == ("1", "")
    reply = await send_signal(store, lease.eid, wpid, token, name="anything")
    assert reply[3] == b"resume_condition_satisfied"


async def test_greedy_matching_and_count_mode(store: Store) -> None:
    # 2 of ["a", "b", "c"] in count mode; a wildcard before a named matcher takes first
    lease, wpid, token = await suspended(store, condition("a", "b", "c", mode="count", minimum=2))
    assert (await send_signal(store, lease.eid, wpid, token, name="c"))[3] == (
        b"appended_to_waitpoint"
    )
    assert (await send_signal(store, lease.eid, wpid, token, name="c"))[3] == b"no_op"
    assert (await send_signal(store, lease.eid, wpid, token, name="a"))[3] == (
        b"resume_condition_satisfied"
    )
    lease, wpid, token = await suspended(store, condition("", "x", mode="all"))
    assert (await send_signal(store, lease.eid, wpid, token, name="x"))[3] == (
        b"appended_to_waitpoint"
    )
    cond = await hash_of(store, f"{wp_key(lease.eid, wpid)}:condition")
    assert (cond["matcher:0:satisfied"], cond["matcher:1:satisfied"]) == ("1", "0")


# -- resume_execution (docs/suspension.md#resume) and claim_resumed
# (docs/suspension.md#claiming-a-resumed-execution) ----------------------------------------------


async def test_operator_resume(store: Store) -> None:
    lease, wpid, token = await suspended(store, condition("a", "b"))
    eid = lease.eid
    await send_signal(store, eid, wpid, token, name="a")
    async with listening(store, sig_channel(lease), sharded=True) as events:
        assert await resume(store, eid, "operator") == [1, b"OK", b"waiting"]
        got = await events.drain()
    c = await check_invariants(store, eid)
    assert (c["lifecycle_phase"], c["eligibility_state"], c["blocking_reason"]) == (
        "runnable",
        "eligible_now",
        "waiting_for_worker",
    )
    assert c["attempt_state"] == "attempt_interrupted" and c["current_waitpoint_id"] == ""
    s = await hash_of(store, exec_key(eid, "suspension:current"))
    assert (s["close_reason"], s["closed_at"] != "") == ("operator_resume", True)
    wp = await hash_of(store, wp_key(eid, wpid))
    assert (wp["state"], wp["close_reason"]) == ("closed", "operator_resume")
    cond = await hash_of(store, f"{wp_key(eid, wpid)}:condition")
    assert (cond["closed"], cond["closed_reason"]) == ("1", "operator_resume")
    assert [(e["type"], e.get("trigger"), e.get("close_reason")) for e in got] == [
        ("execution_resumed", "operator", None),
        ("waitpoint_closed", None, "operator_resume"),
    ]
    # old tokens meet a closed waitpoint; a repeat is refused
    assert await send_signal(store, eid, wpid, token, name="b") == [0, b"waitpoint_closed"]
    assert await resume(store, eid) == [0, b"execution_not_suspended"]
    # docs/suspension.md#resume: after an operator resume and re-claim the resume-signal list is
    # empty
    assert (await issue_grant(store, eid))[:2] == [1, b"OK"]
    assert (await claim_resumed(store, lease))[:2] == [1, b"OK"]
    assert await resume_signals(store, eid) == []


async def test_resume_with_delay_then_promote_and_claim(store: Store) -> None:
    lease, _, _ = await suspended(store)
    eid = lease.eid
    before = await now_ms(store)
    assert await resume(store, eid, "operator", 10_000) == [1, b"OK", b"delayed"]
    c = await check_invariants(store, eid)
    assert (c["blocking_reason"], c["blocking_detail"]) == (
        "waiting_for_resume_delay",
        "resume delay 10000ms",
    )
    p = PartitionKeys(eid.tag)
    score = int(await store.call("ZSCORE", p.lane(LANE, "delayed"), str(eid)))
    assert before + 10_000 <= score <= await now_ms(store) + 10_000
    assert int(c["delay_until"]) == score
    assert (await promote(store, eid, score))[2] == b"promoted"
    assert (await check_invariants(store, eid))["attempt_state"] == "attempt_interrupted"
    assert (await issue_grant(store, eid))[:2] == [1, b"OK"]
    reply = await claim_resumed(store, lease)
    assert reply[5:8] == [lease.attempt_id.encode(), b"0", b"resumed"]


async def test_resume_delay_falls_back_to_the_policy(store: Store) -> None:
    lease, _, _ = await suspended(store, policy=json.dumps({"resume_delay_ms": 5000}))
    assert await resume(store, lease.eid, "operator") == [1, b"OK", b"delayed"]
    lease, _, _ = await suspended(store, policy=json.dumps({"resume_delay_ms": 5000}))
    assert await resume(store, lease.eid, "operator", 1) == [1, b"OK", b"delayed"]
    c = await core_of(store, lease.eid)
    assert c["blocking_detail"] == "resume delay 1ms"


async def test_resume_rejections(store: Store) -> None:
    lease = await leased(store)
    assert await resume(store, lease.eid) == [0, b"execution_not_suspended"]
    assert (await resume(store, lease.eid, "bogus"))[1] == b"invalid_input"
    assert (await resume(store, lease.eid, "operator", -1))[1] == b"invalid_input"
    cond = condition("a", allow_operator_override=False)
    lease, _, _ = await suspended(store, cond)
    before = await snapshot(store, lease.eid)
    assert await resume(store, lease.eid, "operator") == [0, b"resume_condition_not_met"]
    assert await snapshot(store, lease.eid) == before
    assert await resume(store, lease.eid, "auto_resume") == [1, b"OK", b"waiting"]
    s = await hash_of(store, exec_key(lease.eid, "suspension:current"))
    assert s["close_reason"] == "timed_out_auto_resume"


async def test_claim_resumed_after_a_signal_resume(store: Store) -> None:
    """docs/suspension.md#claiming-a-resumed-execution: same attempt, epoch + 1, the resume signal
    with its payload."""
    lease, wpid, token = await suspended(store, condition("approval"))
    eid = lease.eid
    sig = str(uuid.uuid4())
    payload = b"approved by jane"
    reply = await send_signal(store, eid, wpid, token, name="approval", sig=sig, payload=payload)
    assert reply[3] == b"resume_condition_satisfied"
    assert (await issue_grant(store, eid))[:2] == [1, b"OK"]
    reply = await claim_resumed(store, lease)
    assert reply[:2] == [1, b"OK"]
    assert int(reply[3]) == int(lease.epoch) + 1
    assert reply[5:8] == [lease.attempt_id.encode(), b"0", b"resumed"]
    c = await check_invariants(store, eid)
    assert (c["public_state"], c["attempt_state"]) == ("active", "running_attempt")
    attempt = await hash_of(store, ExecKeys(eid).attempt(0))
    assert attempt["attempt_state"] == "started" and attempt["suspension_id"] == ""
    [(fields, body)] = await resume_signals(store, eid)
    assert (fields["signal_id"], fields["signal_name"], fields["source_identity"]) == (
        sig,
        "approval",
        "tester",
    )
    assert body == payload
    # a second suspension of the same attempt works and archives the first waitpoint
    again = await suspend(store, Lease.from_reply(eid, reply, INSTANCE))
    assert again[:2] == [1, b"OK"]
    assert await store.call("SISMEMBER", ExecKeys(eid).waitpoints, wpid) == 1
    assert await resume_signals(store, eid) == []


async def test_already_suspended_record(store: Store) -> None:
    lease, _, _ = await suspended(store)
    await resume(store, lease.eid)
    await issue_grant(store, lease.eid)
    claimed = Lease.from_reply(lease.eid, await claim_resumed(store, lease), INSTANCE)
    await store.call("HSET", exec_key(lease.eid, "suspension:current"), "closed_at", "")
    before = await snapshot(store, lease.eid)
    assert await suspend(store, claimed) == [0, b"already_suspended"]
    assert await snapshot(store, lease.eid) == before


# -- close_waitpoint (docs/suspension.md#closing-waitpoints)
# ------------------------------------------------------------------------


async def test_close_waitpoint(store: Store) -> None:
    lease = await leased(store)
    eid = lease.eid
    reply = await create_pending(store, lease)
    wpid, token = reply[2].decode(), reply[4].decode()
    p = PartitionKeys(eid.tag)
    async with listening(store, sig_channel(lease), sharded=True) as events:
        assert await close_wp(store, eid, wpid) == [1, b"OK", b"closed"]
        got = await events.drain()
    wp = await hash_of(store, wp_key(eid, wpid))
    assert (wp["state"], wp["close_reason"]) == ("closed", "proactive_close")
    assert await store.call("ZSCORE", p.pending_waitpoint_expiry, wpid) is None
    assert [(e["type"], e["close_reason"]) for e in got] == [
        ("waitpoint_closed", "proactive_close")
    ]
    # 2. idempotent, closed_at unchanged
    assert await close_wp(store, eid, wpid) == [1, b"OK", b"already_closed"]
    assert (await hash_of(store, wp_key(eid, wpid)))["closed_at"] == wp["closed_at"]
    # 4. buffering with its valid token
    assert await send_signal(store, eid, wpid, token, buffer=True) == [0, b"waitpoint_closed"]
    # 3. unknown id; a ghost index entry is removed
    ghost = str(uuid.uuid4())
    await store.call("ZADD", p.pending_waitpoint_expiry, 1, ghost)
    assert await close_wp(store, eid, ghost) == [0, b"waitpoint_not_found"]
    assert await store.call("ZSCORE", p.pending_waitpoint_expiry, ghost) is None
    # another execution's waitpoint is not found
    other = await leased(store)
    foreign = (await create_pending(store, other))[2].decode()
    assert await close_wp(store, eid, foreign) == [0, b"waitpoint_not_found"]
    assert (await hash_of(store, wp_key(eid, foreign)))["state"] == "pending"


async def test_close_active_waitpoint_closes_its_condition(store: Store) -> None:
    lease, wpid, token = await suspended(store)
    assert await close_wp(store, lease.eid, wpid, "operator_close") == [1, b"OK", b"closed"]
    cond = await hash_of(store, f"{wp_key(lease.eid, wpid)}:condition")
    assert (cond["closed"], cond["closed_reason"]) == ("1", "operator_close")
    assert await send_signal(store, lease.eid, wpid, token) == [0, b"waitpoint_closed"]
    assert (await core_of(store, lease.eid))["public_state"] == "suspended"


# -- expire_suspension (docs/suspension.md#suspension-timeouts)
# ----------------------------------------------------------------------


async def timed_out(store: Store, behavior: str) -> tuple[Lease, str]:
    lease = await leased(store)
    await open_stream(store, lease.eid, 0)
    past = await now_ms(store) - 1000
    reply = await suspend(store, lease, timeout_at=past, behavior=behavior)
    assert reply[:2] == [1, b"OK"], reply
    return lease, reply[3].decode()


@pytest.mark.parametrize(
    ("behavior", "public", "attempt", "outcome"),
    [
        ("fail", "failed", "ended_failure", "failed"),
        ("cancel", "cancelled", "ended_cancelled", "cancelled"),
        ("expire", "expired", "ended_failure", "expired"),
    ],
)
async def test_timeout_terminal(
    store: Store, behavior: str, public: str, attempt: str, outcome: str
) -> None:
    lease, wpid = await timed_out(store, behavior)
    eid = lease.eid
    await make_flow_member(store, eid)
    async with (
        listening(store, sig_channel(lease), sharded=True) as events,
        listening(store, "ff:dag:completions") as dag,
    ):
        assert await expire_suspension(store, eid) == [1, b"OK", behavior.encode(), public.encode()]
        got = await events.drain()
        done = await dag.drain()
    c = await check_invariants(store, eid)
    assert (c["public_state"], c["failure_reason"]) == (public, f"suspension_timeout:{behavior}")
    assert c["current_suspension_id"] == c["current_waitpoint_id"] == ""
    if behavior == "cancel":
        assert c["cancellation_reason"] == "suspension_timeout"
    a = await hash_of(store, ExecKeys(eid).attempt(0))
    assert (a["attempt_state"], a["suspended_at"], a["suspension_id"]) == (attempt, "", "")
    meta = await hash_of(store, ExecKeys(eid).stream_meta(0))
    assert meta["closed_reason"] == "suspension_timeout"
    reason = f"timed_out_{behavior}"
    assert (await hash_of(store, wp_key(eid, wpid)))["close_reason"] == reason
    assert (await hash_of(store, f"{wp_key(eid, wpid)}:condition"))["closed"] == "1"
    assert (await hash_of(store, exec_key(eid, "suspension:current")))["close_reason"] == reason
    assert await store.call("ZSCORE", PartitionKeys(eid.tag).suspension_timeout, str(eid)) is None
    assert [e["type"] for e in got] == ["waitpoint_closed", "suspension_timed_out"]
    assert (got[1]["behavior"], got[1]["public_state"]) == (behavior, public)
    assert done == [{"execution_id": str(eid), "flow_id": "flow-1", "outcome": outcome}]
    # a late duplicate scan is harmless
    assert await expire_suspension(store, eid) == [
        1,
        b"ALREADY_SATISFIED",
        b"not_suspended_cleaned",
    ]


async def test_timeout_auto_resume(store: Store) -> None:
    for behavior in ("auto_resume", "auto_resume_with_timeout_signal"):
        lease, wpid = await timed_out(store, behavior)
        eid = lease.eid
        assert await expire_suspension(store, eid) == [1, b"OK", b"auto_resume", b"waiting"]
        c = await check_invariants(store, eid)
        assert (c["eligibility_state"], c["attempt_state"]) == (
            "eligible_now",
            "attempt_interrupted",
        )
        a = await hash_of(store, ExecKeys(eid).attempt(0))
        assert a["attempt_state"] == "suspended"
        wp = await hash_of(store, wp_key(eid, wpid))
        assert wp["close_reason"] == "timed_out_auto_resume"
        assert await resume_signals(store, eid) == []


async def test_timeout_escalate(store: Store) -> None:
    lease, wpid = await timed_out(store, "escalate")
    eid = lease.eid
    s_before = await hash_of(store, exec_key(eid, "suspension:current"))
    assert await expire_suspension(store, eid) == [1, b"OK", b"escalate", b"suspended"]
    c = await check_invariants(store, eid)
    assert c["blocking_reason"] == "paused_by_operator"
    assert c["blocking_detail"] == f"suspension escalated: timeout at {s_before['timeout_at']}"
    s = await hash_of(store, exec_key(eid, "suspension:current"))
    assert (s["reason_code"], s["timeout_at"], s["timeout_behavior"]) == (
        "waiting_for_operator_review",
        "",
        "",
    )
    assert await store.call("ZSCORE", PartitionKeys(eid.tag).suspension_timeout, str(eid)) is None
    assert (await hash_of(store, wp_key(eid, wpid)))["state"] == "active"
    reply = await expire_suspension(store, eid)
    assert reply == [1, b"ALREADY_SATISFIED", b"not_yet_due"]


async def test_timeout_revalidation(store: Store) -> None:
    p = PartitionKeys("{fp:7}")
    # 4. not yet due: nothing changes
    lease = await leased(store)
    await suspend(store, lease, timeout_at=await now_ms(store) + 60_000)
    before = await snapshot(store, lease.eid)
    assert await expire_suspension(store, lease.eid) == [1, b"ALREADY_SATISFIED", b"not_yet_due"]
    assert await snapshot(store, lease.eid) == before
    # 5. already resumed -> the entry is cleaned
    await resume(store, lease.eid)
    await store.call("ZADD", p.suspension_timeout, 1, str(lease.eid))
    reply = await expire_suspension(store, lease.eid)
    assert reply == [1, b"ALREADY_SATISFIED", b"not_suspended_cleaned"]
    assert await store.call("ZSCORE", p.suspension_timeout, str(lease.eid)) is None
    # no timeout stored: the entry is cleaned
    lease, _, _ = await suspended(store)
    await store.call("ZADD", p.suspension_timeout, 1, str(lease.eid))
    assert await expire_suspension(store, lease.eid) == [1, b"ALREADY_SATISFIED", b"not_yet_due"]
    assert await store.call("ZSCORE", p.suspension_timeout, str(lease.eid)) is None
    # unknown stored behaviour falls back to fail
    lease, _ = await timed_out(store, "fail")
    await store.call("HSET", exec_key(lease.eid, "suspension:current"), "timeout_behavior", "?")
    assert await expire_suspension(store, lease.eid) == [1, b"OK", b"fail", b"failed"]


# -- cancel / expire of a suspended execution ------------------------------------------------------


async def test_cancel_and_expire_of_a_suspended_execution_close_the_waitpoint(
    store: Store,
) -> None:
    lease, wpid, token = await suspended(store)
    async with listening(store, sig_channel(lease), sharded=True) as events:
        assert (await cancel(store, lease.eid))[:3] == [1, b"OK", b"cancelled"]
        got = await events.drain()
    assert [(e["type"], e["waitpoint_id"], e["close_reason"]) for e in got] == [
        ("waitpoint_closed", wpid, "cancelled")
    ]
    assert await send_signal(store, lease.eid, wpid, token) == [0, b"target_not_signalable"]
    lease, wpid, _ = await suspended(store)
    await store.call("ZADD", PartitionKeys(lease.eid.tag).execution_deadline, 1, str(lease.eid))
    async with listening(store, sig_channel(lease), sharded=True) as events:
        assert (await expire(store, lease.eid, "execution_deadline"))[2] == b"expired"
        got = await events.drain()
    assert [(e["type"], e["close_reason"]) for e in got] == [("waitpoint_closed", "expired")]


# -- list_waitpoints (docs/suspension.md#listing-pending-waitpoints)
# ------------------------------------------------------------------------


async def test_list_waitpoints(store: Store) -> None:
    lease = await leased(store)
    eid = lease.eid
    assert await list_waitpoints(store, eid) == [1, b"OK", b"0"]
    pending = await create_pending(store, lease)
    closed = await create_pending(store, lease)
    await close_wp(store, eid, closed[2].decode())
    listed = await list_waitpoints(store, eid)
    assert listed[2] == b"1"
    assert listed[3][:4] == [pending[2], pending[3], b"pending", pending[4]]
    assert listed[3][7] == b"[]"
    reply = await suspend(store, lease, condition("pwp_signal", "", "b"))
    listed = await list_waitpoints(store, eid)
    assert listed[2] == b"2"
    ids = [e[0] for e in listed[3:]]
    assert ids == sorted(ids)
    entry = next(e for e in listed[3:] if e[0] == reply[3])
    assert (entry[2], entry[3]) == (b"active", reply[5])
    assert entry[5] != b"" and json.loads(entry[7]) == ["pwp_signal", "b"]
    # a flipped listed token does not deliver
    wpid = reply[3].decode()
    assert await send_signal(store, eid, wpid, flip_last(reply[5].decode())) == [
        0,
        b"invalid_token",
    ]
    await resume(store, eid)
    listed = await list_waitpoints(store, eid)
    assert listed[2] == b"1", "the resumed waitpoint is closed; the pending one remains"
    missing = await list_waitpoints(store, new_eid())
    assert missing == [0, b"execution_not_found"]


async def test_lane_membership_after_suspend(store: Store) -> None:
    lease, _, _ = await suspended(store)
    assert await lane_sets_of(store, lease.eid) == ["suspended"]


async def test_reconciler_restores_the_suspended_score(store: Store) -> None:
    lease, _, _ = await suspended(store)
    timed = await leased(store)
    timeout = await now_ms(store) + 60_000
    assert (await suspend(store, timed, timeout_at=timeout))[:2] == [1, b"OK"]
    p = PartitionKeys(lease.eid.tag)
    for lz, score in ((lease, NO_TIMEOUT), (timed, timeout)):
        await store.call("ZREM", p.lane(LANE, "suspended"), str(lz.eid))
        values = {"execution_id": str(lz.eid)}
        reply = await fcall(store, maintenance.RECONCILE, ctx_of(lz.eid), values)
        assert reply == [1, b"OK", b"repaired", b"suspended", b""]
        assert int(await store.call("ZSCORE", p.lane(LANE, "suspended"), str(lz.eid))) == score


async def test_expired_pending_waitpoint_is_not_signalable(store: Store) -> None:
    """Never activated (docs/suspension.md#decisions): deliver -> target_not_signalable; buffer ->
    closed."""
    lease = await leased(store)
    reply = await create_pending(store, lease)
    wpid, token = reply[2].decode(), reply[4].decode()
    assert await close_wp(store, lease.eid, wpid, "never_committed") == [1, b"OK", b"closed"]
    before = await hash_of(store, wp_key(lease.eid, wpid))
    assert await send_signal(store, lease.eid, wpid, token) == [0, b"target_not_signalable"]
    assert await send_signal(store, lease.eid, wpid, token, buffer=True) == [
        0,
        b"waitpoint_closed",
    ]
    assert await hash_of(store, wp_key(lease.eid, wpid)) == before
    assert (await check_invariants(store, lease.eid))["public_state"] == "active"
