"""Signal delivery and buffering, called directly (docs/suspension.md#signal-delivery,
docs/suspension.md#buffering-on-pending-waitpoints, docs/suspension.md#watches)."""

from __future__ import annotations

import json
import uuid

from flowfabric.server.valkey.keys import ExecKeys, PartitionKeys, signal_key
from flowfabric.server.valkey.store import Store
from tests.lua.util import (
    LANE,
    Lease,
    check_invariants,
    complete,
    condition,
    core_of,
    create_pending,
    exec_key,
    flip_last,
    hash_of,
    keystore,
    leased,
    listening,
    new_eid,
    now_ms,
    rotate,
    send_signal,
    snapshot,
    suspended,
    wp_key,
)


def sig_channel(lease: Lease) -> str:
    return PartitionKeys(lease.eid.tag).signal_events


async def everything(store: Store, lease: Lease, wpid: str) -> dict:
    """Snapshot plus every signal-side object of one waitpoint (for "nothing changed")."""
    out = await snapshot(store, lease.eid)
    out["core"].pop(b"last_hmac_validation_failed_at", None)
    k = ExecKeys(lease.eid)
    out["wp"] = await store.call("HGETALL", wp_key(lease.eid, wpid))
    out["cond"] = await store.call("HGETALL", f"{wp_key(lease.eid, wpid)}:condition")
    out["stream"] = await store.call("XLEN", f"{wp_key(lease.eid, wpid)}:signals")
    out["signals"] = await store.call("ZCARD", k.signals)
    out["suspension"] = await store.call("HGETALL", k.suspension_current)
    return out


async def test_deliver_satisfies_and_resumes(store: Store) -> None:
    """docs/suspension.md#signal-delivery, with the events of the call."""
    lease, wpid, token = await suspended(store, condition("approval_result"))
    eid = lease.eid
    sig = str(uuid.uuid4())
    payload = bytes(range(256)) * 3  # binary-safe
    async with listening(store, sig_channel(lease), sharded=True) as events:
        reply = await send_signal(
            store, eid, wpid, token, name="approval_result", sig=sig, payload=payload
        )
        got = await events.drain()
    assert reply[:4] == [1, b"OK", sig.encode(), b"resume_condition_satisfied"]
    stream_id, accepted_at = reply[4].decode(), int(reply[5])
    c = await check_invariants(store, eid)
    assert (c["public_state"], c["eligibility_state"], c["attempt_state"]) == (
        "waiting",
        "eligible_now",
        "attempt_interrupted",
    )
    assert c["current_suspension_id"] == c["current_waitpoint_id"] == c["delay_until"] == ""
    p = PartitionKeys(eid.tag)
    assert await store.call("ZSCORE", p.lane(LANE, "suspended"), str(eid)) is None
    assert await store.call("ZSCORE", p.suspension_timeout, str(eid)) is None
    wp = await hash_of(store, wp_key(eid, wpid))
    assert (wp["state"], wp["close_reason"], wp["signal_count"], wp["matched_signal_count"]) == (
        "closed",
        "resumed",
        "1",
        "1",
    )
    assert wp["satisfied_at"] == wp["closed_at"] == wp["last_signal_at"] == str(accepted_at)
    cond = await hash_of(store, f"{wp_key(eid, wpid)}:condition")
    assert (cond["closed"], cond["closed_reason"], cond["matcher:0:signal_id"]) == (
        "1",
        "satisfied",
        sig,
    )
    s = await hash_of(store, exec_key(eid, "suspension:current"))
    assert (s["close_reason"], s["last_signal_at"]) == ("resumed", str(accepted_at))
    record = await hash_of(store, signal_key(eid.tag, sig))
    assert record == {
        "signal_id": sig,
        "target_execution_id": str(eid),
        "target_waitpoint_id": wpid,
        "target_scope": "waitpoint",
        "signal_name": "approval_result",
        "signal_category": "callback",
        "source_type": "webhook",
        "source_identity": "tester",
        "correlation_id": "corr-1",
        "idempotency_key": "",
        "created_at": str(accepted_at),
        "accepted_at": str(accepted_at),
        "matched_waitpoint_id": wpid,
        "payload_encoding": "json",
        "observed_effect": "resume_condition_satisfied",
        "stream_id": stream_id,
    }
    assert await store.call("GET", f"{signal_key(eid.tag, sig)}:payload") == payload
    entries = await store.call("XRANGE", f"{wp_key(eid, wpid)}:signals", "-", "+")
    assert [e[0].decode() for e in entries] == [stream_id]
    assert entries[0][1][b"matched"] == b"0"
    assert int(await store.call("ZSCORE", ExecKeys(eid).signals, sig)) == accepted_at
    assert [e["type"] for e in got] == ["signal_accepted", "execution_resumed", "waitpoint_closed"]
    accepted, resumed, closed = got
    assert accepted == {
        "type": "signal_accepted",
        "execution_id": str(eid),
        "waitpoint_id": wpid,
        "signal_id": sig,
        "signal_name": "approval_result",
        "signal_category": "callback",
        "source_type": "webhook",
        "source_identity": "tester",
        "correlation_id": "corr-1",
        "observed_effect": "resume_condition_satisfied",
        "stream_id": stream_id,
        "accepted_at": accepted_at,
        "at": accepted_at,
    }
    assert (resumed["public_state"], resumed["trigger"], resumed["signal_id"]) == (
        "waiting",
        "signal",
        sig,
    )
    assert (closed["waitpoint_id"], closed["close_reason"]) == (wpid, "resumed")
    raw = json.dumps(got)
    assert token not in raw and token.split(":")[1] not in raw


async def test_dedup_with_two_matchers(store: Store) -> None:
    """docs/suspension.md#signal-delivery: same key, new signal id -> DUPLICATE with the first
    id."""
    lease, wpid, token = await suspended(store, condition("sig_a", "sig_b"))
    eid = lease.eid
    first = str(uuid.uuid4())
    reply = await send_signal(store, eid, wpid, token, name="sig_a", sig=first, idem="dedup-key-1")
    assert reply[3] == b"appended_to_waitpoint"
    ttl = await store.call("PTTL", f"ff:sigdedup:{eid.tag}:{wpid}:dedup-key-1")
    assert 0 < ttl <= 86_400_000
    before = await everything(store, lease, wpid)
    async with listening(store, sig_channel(lease), sharded=True) as events:
        dup = await send_signal(store, eid, wpid, token, name="sig_a", idem="dedup-key-1")
        assert await events.drain() == []
    assert dup == [1, b"DUPLICATE", first.encode()]
    assert await everything(store, lease, wpid) == before
    assert (await core_of(store, eid))["public_state"] == "suspended"


async def test_retry_of_the_resuming_signal_is_a_duplicate(store: Store) -> None:
    lease, wpid, token = await suspended(store)
    sig = str(uuid.uuid4())
    assert (await send_signal(store, lease.eid, wpid, token, sig=sig, idem="hook-1"))[3] == (
        b"resume_condition_satisfied"
    )
    again = await send_signal(store, lease.eid, wpid, token, sig=sig, idem="hook-1")
    assert again == [1, b"DUPLICATE", sig.encode()]
    # without the key, the replay meets the closed waitpoint
    assert await send_signal(store, lease.eid, wpid, token) == [0, b"waitpoint_closed"]


async def test_dedup_ttl_zero_disables(store: Store) -> None:
    lease, wpid, token = await suspended(store, condition("a", "b"))
    for _ in range(2):
        reply = await send_signal(store, lease.eid, wpid, token, name="x", idem="k", ttl=0)
        assert reply[3] == b"no_op"
    assert await store.call("EXISTS", f"ff:sigdedup:{lease.eid.tag}:{wpid}:k") == 0


async def test_unmatched_signal_is_a_no_op(store: Store) -> None:
    """docs/suspension.md#signal-delivery."""
    lease, wpid, token = await suspended(store, condition("a"))
    sig = str(uuid.uuid4())
    reply = await send_signal(store, lease.eid, wpid, token, name="other", sig=sig)
    assert reply[3] == b"no_op"
    wp = await hash_of(store, wp_key(lease.eid, wpid))
    assert (wp["signal_count"], wp["matched_signal_count"]) == ("1", "0")
    record = await hash_of(store, signal_key(lease.eid.tag, sig))
    assert (record["observed_effect"], record["matched_waitpoint_id"]) == ("no_op", "")
    assert (await core_of(store, lease.eid))["public_state"] == "suspended"


async def test_token_failures_stamp_and_change_nothing_else(store: Store) -> None:
    """docs/suspension.md#signal-delivery, another execution's token (2b) and a missing token."""
    lease, wpid, token = await suspended(store)
    other, other_wp, other_token = await suspended(store)
    eid = lease.eid
    before = await everything(store, lease, wpid)
    before_other = await everything(store, other, other_wp)
    cases = [
        (wpid, flip_last(token), b"invalid_token"),
        (str(uuid.uuid4()), "k1:" + "0" * 40, b"invalid_token"),
        (other_wp, other_token, b"invalid_token"),
        (wpid, "", b"missing_token"),
    ]
    async with listening(store, sig_channel(lease), sharded=True) as events:
        for target, tok, code in cases:
            assert await send_signal(store, eid, target, tok) == [0, code]
            assert await send_signal(store, eid, target, tok, buffer=True) == [0, code]
            assert (await core_of(store, eid))["last_hmac_validation_failed_at"] != ""
            await store.call("HDEL", ExecKeys(eid).core, "last_hmac_validation_failed_at")
        assert await events.drain() == []
    assert await everything(store, lease, wpid) == before
    assert await everything(store, other, other_wp) == before_other
    assert "last_hmac_validation_failed_at" not in await core_of(store, other.eid)


async def test_token_past_rotation_grace_is_expired(store: Store) -> None:
    lease, wpid, token = await suspended(store)
    ks = keystore(lease.eid)
    await rotate(store, ks, "k2", "22" * 32, 600_000)
    await store.call("HSET", ks, "expires_at:k1", str(await now_ms(store) - 1))
    assert await send_signal(store, lease.eid, wpid, token) == [0, b"token_expired"]
    assert (await core_of(store, lease.eid))["public_state"] == "suspended"


async def test_resume_with_delay(store: Store) -> None:
    """docs/suspension.md#signal-delivery."""
    lease, wpid, token = await suspended(store)
    eid = lease.eid
    before = await now_ms(store)
    reply = await send_signal(store, eid, wpid, token, delay=5000)
    assert reply[3] == b"resume_condition_satisfied"
    c = await check_invariants(store, eid)
    assert (c["public_state"], c["blocking_reason"]) == ("delayed", "waiting_for_resume_delay")
    assert c["blocking_detail"] == "resume delay 5000ms after signal go"
    score = int(await store.call("ZSCORE", PartitionKeys(eid.tag).lane(LANE, "delayed"), str(eid)))
    assert before + 5000 <= score <= await now_ms(store) + 5000
    assert c["delay_until"] == str(score)


async def test_signal_limit(store: Store) -> None:
    """docs/suspension.md#signal-delivery: all accepted signals count, across waitpoints; nothing
    written."""
    lease, wpid, token = await suspended(store, condition("a", "b", "c"))
    await send_signal(store, lease.eid, wpid, token, name="a", limit=2)
    await send_signal(store, lease.eid, wpid, token, name="x", limit=2)
    before = await everything(store, lease, wpid)
    reply = await send_signal(store, lease.eid, wpid, token, name="b", limit=2)
    assert reply == [0, b"signal_limit_exceeded"]
    assert await everything(store, lease, wpid) == before
    assert (await send_signal(store, lease.eid, wpid, token, name="b", limit=0))[:2] == [1, b"OK"]


async def test_closed_condition_refuses(store: Store) -> None:
    """docs/suspension.md#signal-delivery."""
    lease, wpid, token = await suspended(store)
    await store.call("HSET", f"{wp_key(lease.eid, wpid)}:condition", "closed", "1")
    assert await send_signal(store, lease.eid, wpid, token) == [0, b"waitpoint_closed"]


async def test_deliver_state_checks(store: Store) -> None:
    lease = await leased(store)
    eid = lease.eid
    reply = await create_pending(store, lease)
    wpid, token = reply[2].decode(), reply[4].decode()
    assert await send_signal(store, eid, wpid, token) == [
        0,
        b"waitpoint_pending_use_buffer_script",
    ]
    assert (await send_signal(store, eid, wpid, token, idem="i", buffer=True))[:2] == [1, b"OK"]
    # a duplicate is recognised even before the state checks
    assert (await send_signal(store, eid, wpid, token, idem="i"))[1] == b"DUPLICATE"
    assert (await complete(store, eid, lease.fence))[:2] == [1, b"OK"]
    assert await send_signal(store, eid, wpid, token) == [0, b"target_not_signalable"]
    assert await send_signal(store, eid, wpid, token, buffer=True) == [
        0,
        b"target_not_signalable",
    ]
    missing = await send_signal(store, new_eid(), wpid, token)
    assert missing == [0, b"execution_not_found"]


async def test_input_validation(store: Store) -> None:
    lease, wpid, token = await suspended(store)
    for over in ({"delay": "x"}, {"limit": -1}, {"maxlen": 0}, {"ttl": "1.5"}, {"name": ""}):
        reply = await send_signal(store, lease.eid, wpid, token, **over)  # type: ignore[arg-type]
        assert reply[:2] == [0, b"invalid_input"], over
    assert (await core_of(store, lease.eid))["public_state"] == "suspended"


# -- buffer_signal_for_pending_waitpoint (docs/suspension.md#buffering-on-pending-waitpoints)
# ----------------------------------------------------


async def test_buffer(store: Store) -> None:
    """docs/suspension.md#buffering-on-pending-waitpoints and the event."""
    lease = await leased(store)
    eid = lease.eid
    reply = await create_pending(store, lease)
    wpid, token = reply[2].decode(), reply[4].decode()
    sig = str(uuid.uuid4())
    async with listening(store, sig_channel(lease), sharded=True) as events:
        reply = await send_signal(
            store, eid, wpid, token, name="wpt_signal", buffer=True, sig=sig, idem="k"
        )
        got = await events.drain()
    assert reply[:4] == [1, b"OK", sig.encode(), b"buffered_for_pending_waitpoint"]
    assert await store.call("XLEN", f"{wp_key(eid, wpid)}:signals") == 1
    wp = await hash_of(store, wp_key(eid, wpid))
    assert (wp["state"], wp["signal_count"], wp["last_signal_at"]) == (
        "pending",
        "1",
        reply[5].decode(),
    )
    assert await store.call("EXISTS", f"{wp_key(eid, wpid)}:condition") == 0
    record = await hash_of(store, signal_key(eid.tag, sig))
    assert record["observed_effect"] == "buffered_for_pending_waitpoint"
    assert (await check_invariants(store, eid))["public_state"] == "active"
    assert [(e["type"], e["observed_effect"]) for e in got] == [
        ("signal_buffered", "buffered_for_pending_waitpoint")
    ]
    # 4. same idempotency key -> DUPLICATE, still one entry
    again = await send_signal(store, eid, wpid, token, name="wpt_signal", buffer=True, idem="k")
    assert again == [1, b"DUPLICATE", sig.encode()]
    assert await store.call("XLEN", f"{wp_key(eid, wpid)}:signals") == 1
    # 2. a forged token
    forged = "k9:" + "0" * 40
    assert await send_signal(store, eid, wpid, forged, buffer=True) == [0, b"invalid_token"]


async def test_buffer_state_checks(store: Store) -> None:
    lease, wpid, token = await suspended(store)
    assert await send_signal(store, lease.eid, wpid, token, buffer=True) == [
        0,
        b"waitpoint_not_pending",
    ]
    lease = await leased(store)
    reply = await create_pending(store, lease)
    wpid, token = reply[2].decode(), reply[4].decode()
    await send_signal(store, lease.eid, wpid, token, buffer=True, limit=1)
    assert await send_signal(store, lease.eid, wpid, token, buffer=True, limit=1) == [
        0,
        b"signal_limit_exceeded",
    ]
    # 3. closed
    await store.call("HSET", wp_key(lease.eid, wpid), "state", "closed")
    assert await send_signal(store, lease.eid, wpid, token, buffer=True) == [
        0,
        b"waitpoint_closed",
    ]


async def test_waitpoint_stream_is_trimmed_the_zset_is_not(store: Store) -> None:
    lease, wpid, token = await suspended(store, condition("never"))
    for _ in range(250):
        reply = await send_signal(store, lease.eid, wpid, token, name="x", maxlen=10, limit=0)
        assert reply[3] == b"no_op"
    assert await store.call("XLEN", f"{wp_key(lease.eid, wpid)}:signals") < 250
    assert await store.call("ZCARD", ExecKeys(lease.eid).signals) == 250
    assert (await hash_of(store, wp_key(lease.eid, wpid)))["signal_count"] == "250"
