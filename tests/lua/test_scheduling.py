"""Grants, claims, delayed promotion and priority, called directly (docs/lifecycle.md#claims,
docs/lifecycle.md#priority-and-progress, docs/lifecycle.md#delay-and-promotion)."""

from __future__ import annotations

import asyncio
import json

import pytest

from flowfabric.server.valkey.errors import FlowFabricError
from flowfabric.server.valkey.functions import scheduling
from flowfabric.server.valkey.keys import ExecKeys, PartitionKeys
from flowfabric.server.valkey.store import Store
from tests.lua.util import (
    INSTANCE,
    LANE,
    WORKER,
    check_invariants,
    claim,
    claim_keys,
    claim_raw,
    core_of,
    create,
    ctx_of,
    delay,
    fail,
    fcall,
    hash_of,
    history_events,
    issue_grant,
    lane_sets_of,
    new_eid,
    now_ms,
    promote,
    snapshot,
)

FAST_RETRY = json.dumps({"retry_policy": {"max_retries": 3, "backoff": {"type": "fixed"}}})


async def created(store: Store, **over: object):
    eid = new_eid()
    assert (await create(store, eid, **over))[1] == b"OK"
    return eid


def caps_policy(*caps: str) -> str:
    return json.dumps({"routing_requirements": {"required_capabilities": list(caps)}})


# -- issue_claim_grant ----------------------------------------------------------------------------


async def test_grant_without_requirements(store: Store) -> None:
    eid = await created(store)
    reply = await issue_grant(store, eid, ttl=5000)
    assert reply[:3] == [1, b"OK", str(eid).encode()]
    grant = await hash_of(store, ExecKeys(eid).claim_grant)
    assert int(reply[3]) == int(grant["grant_expires_at"]) == int(grant["created_at"]) + 5000
    assert grant["worker_id"] == WORKER
    assert grant["worker_instance_id"] == INSTANCE
    assert grant["lane_id"] == LANE
    assert 0 < await store.call("PTTL", ExecKeys(eid).claim_grant) <= 5000
    assert await lane_sets_of(store, eid) == ["eligible"], "a grant never removes from eligible"


async def test_capability_mismatch_names_missing_tokens(store: Store) -> None:
    eid = await created(store, policy_json=caps_policy("gpu", "cuda", "avx"))
    reply = await issue_grant(store, eid, caps="cpu,cuda")
    assert reply == [0, b"capability_mismatch", b"avx,gpu"]
    assert (await core_of(store, eid))["last_capability_mismatch_at"] != ""
    assert await store.call("EXISTS", ExecKeys(eid).claim_grant) == 0
    single = await created(store, policy_json=caps_policy("gpu"))
    assert await issue_grant(store, single, caps="cpu") == [0, b"capability_mismatch", b"gpu"]
    assert (await issue_grant(store, single, caps="cpu,gpu"))[1] == b"OK"


async def test_second_grant_while_one_lives(store: Store) -> None:
    eid = await created(store)
    assert (await issue_grant(store, eid))[1] == b"OK"
    assert await issue_grant(store, eid, worker="w2") == [0, b"grant_already_exists"]


async def test_unused_grant_expires_and_a_new_one_succeeds(store: Store) -> None:
    eid = await created(store)
    assert (await issue_grant(store, eid, ttl=50))[1] == b"OK"
    await asyncio.sleep(0.12)
    assert await store.call("EXISTS", ExecKeys(eid).claim_grant) == 0
    assert await lane_sets_of(store, eid) == ["eligible"]
    assert (await issue_grant(store, eid, worker="w2"))[1] == b"OK"


async def test_grant_preconditions(store: Store) -> None:
    now = await now_ms(store)
    delayed = await created(store, delay_until=str(now + 60_000))
    assert await issue_grant(store, delayed) == [0, b"execution_not_eligible"]
    assert await issue_grant(store, new_eid()) == [0, b"execution_not_found"]
    stray = await created(store)
    await store.call("ZREM", PartitionKeys(stray.tag).lane(LANE, "eligible"), str(stray))
    assert await issue_grant(store, stray) == [0, b"execution_not_in_eligible_set"]


async def test_grant_worker_capability_limits(store: Store) -> None:
    eid = await created(store)
    many = ",".join(f"t{i:03d}" for i in range(257))
    assert await issue_grant(store, eid, caps=many) == [
        0,
        b"invalid_capabilities",
        b"worker:too_many_tokens",
    ]
    big = ",".join("x" * 100 + str(i) for i in range(41))
    assert await issue_grant(store, eid, caps=big) == [
        0,
        b"invalid_capabilities",
        b"worker:too_many_bytes",
    ]
    assert (await issue_grant(store, eid, caps=",,a,,"))[1] == b"OK", "empty tokens skipped"


async def test_grant_bad_ttl_changes_nothing(store: Store) -> None:
    eid = await created(store)
    before = await snapshot(store, eid)
    reply = await issue_grant(store, eid, ttl="soon")
    assert reply == [0, b"invalid_input", b"grant_ttl_ms must be a number, got: soon"]
    assert (await issue_grant(store, eid, ttl=0))[:2] == [0, b"invalid_input"]
    assert await snapshot(store, eid) == before


# -- claim_execution ------------------------------------------------------------------------------


async def test_fresh_claim(store: Store) -> None:
    eid = await created(store)
    lease = await claim(store, eid, ttl=30_000)
    assert (lease.epoch, lease.attempt_index, lease.attempt_type) == ("1", 0, "initial")
    c = await check_invariants(store, eid)
    assert (c["lifecycle_phase"], c["ownership_state"], c["public_state"]) == (
        "active",
        "leased",
        "active",
    )
    assert c["current_attempt_id"] == lease.attempt_id
    assert c["current_lease_id"] == lease.lease_id
    assert c["total_attempt_count"] == "1"
    assert c["started_at"] == c["lease_acquired_at"]
    assert int(c["lease_expires_at"]) == lease.expires_at == int(c["lease_acquired_at"]) + 30_000
    assert int(c["lease_renewal_deadline"]) == int(c["lease_acquired_at"]) + 20_000
    k, p = ExecKeys(eid), PartitionKeys(eid.tag)
    assert await store.call("SISMEMBER", p.worker_leases(INSTANCE), str(eid)) == 1
    assert await store.call("ZSCORE", p.lease_expiry, str(eid)) == lease.expires_at
    assert await store.call("EXISTS", k.claim_grant) == 0
    attempt = await hash_of(store, k.attempt(0))
    assert attempt["attempt_state"] == "started"
    assert attempt["attempt_type"] == "initial"
    assert attempt["lease_epoch"] == "1"
    # no copies of what the core and the attempt hash hold (bench/README.md#leaner-transitions)
    for gone in (k.attempt_usage(0), k.attempts, k.lease_current):
        assert await store.call("EXISTS", gone) == 0
    c = await core_of(store, eid)
    assert c["current_lease_id"] == lease.lease_id
    assert c["lease_expires_at"] == str(lease.expires_at)
    assert c["attempt_timeout_at"] == "0"
    events = await history_events(store, eid)
    assert [e["event"] for e in events] == ["acquired"]
    assert events[0]["lease_epoch"] == "1"


async def test_claim_with_another_workers_grant_changes_nothing(store: Store) -> None:
    eid = await created(store)
    assert (await issue_grant(store, eid, worker="w2", instance="w2-i1"))[1] == b"OK"
    before = await snapshot(store, eid, ("w2-i1",))
    assert await claim_raw(store, eid) == [0, b"invalid_claim_grant"]
    assert await snapshot(store, eid, ("w2-i1",)) == before


async def test_claim_without_grant(store: Store) -> None:
    eid = await created(store)
    assert await claim_raw(store, eid) == [0, b"invalid_claim_grant"]


async def test_retry_claim_creates_retry_attempt(store: Store) -> None:
    eid = await created(store, policy_json=FAST_RETRY)
    first = await claim(store, eid)
    started_at = (await core_of(store, eid))["started_at"]
    reply = await fail(store, eid, first.fence, reason="flaky")
    assert reply[2] == b"retry_scheduled"
    c = await check_invariants(store, eid)
    assert c["attempt_state"] == "pending_retry_attempt"
    assert await promote(store, eid, int(reply[3])) == [1, b"OK", b"promoted"]
    c = await check_invariants(store, eid)
    assert (c["public_state"], c["attempt_state"]) == ("waiting", "pending_retry_attempt")
    assert await claim_raw(store, eid) == [0, b"invalid_claim_grant"], "grants are single-use"
    second = await claim(store, eid)
    assert (second.attempt_index, second.attempt_type, second.epoch) == (1, "retry", "2")
    attempt = await hash_of(store, ExecKeys(eid).attempt(1))
    assert attempt["previous_attempt_index"] == "0"
    assert attempt["retry_reason"] == "flaky"
    c = await check_invariants(store, eid)
    assert c["started_at"] == started_at
    assert c["pending_retry_reason"] == c["pending_previous_attempt_index"] == ""


async def test_paused_attempt_needs_claim_resumed_and_keeps_the_grant(store: Store) -> None:
    eid = await created(store)
    lease = await claim(store, eid)
    now = await now_ms(store)
    assert (await delay(store, eid, lease.fence, now - 1))[1] == b"OK"
    assert (await promote(store, eid, now))[2] == b"promoted"
    assert (await issue_grant(store, eid))[1] == b"OK"
    assert await claim_raw(store, eid) == [0, b"use_claim_resumed_execution"]
    assert await store.call("EXISTS", ExecKeys(eid).claim_grant) == 1


async def test_claim_of_an_active_execution(store: Store) -> None:
    eid = await created(store)
    await claim(store, eid)
    assert await claim_raw(store, eid) == [0, b"execution_not_leaseable"]


async def test_claim_state_conflicts(store: Store) -> None:
    eid = await created(store)
    assert (await issue_grant(store, eid))[1] == b"OK"
    core = ExecKeys(eid).core
    await store.call("HSET", core, "ownership_state", "leased")
    assert await claim_raw(store, eid) == [0, b"lease_conflict"]
    await store.call("HSET", core, "ownership_state", "unowned", "attempt_state", "running_attempt")
    assert await claim_raw(store, eid) == [0, b"active_attempt_exists"]


async def test_attempt_timeout_from_argument_policy_or_none(store: Store) -> None:
    p = PartitionKeys(new_eid().tag)
    eid = await created(store)
    await claim(store, eid, attempt_timeout_ms="5000")
    c = await core_of(store, eid)
    assert (
        await store.call("ZSCORE", p.attempt_timeout, str(eid))
        == int(c["lease_acquired_at"]) + 5000
    )

    policy = json.dumps({"timeout_policy": {"attempt_timeout_ms": 7000}})
    from_policy = await created(store, policy_json=policy)
    await claim(store, from_policy)
    c = await core_of(store, from_policy)
    score = await store.call("ZSCORE", p.attempt_timeout, str(from_policy))
    assert score == int(c["lease_acquired_at"]) + 7000

    disabled = await created(store, policy_json=policy)
    await claim(store, disabled, attempt_timeout_ms="0")
    assert await store.call("ZSCORE", p.attempt_timeout, str(disabled)) is None


async def test_attempt_policy_snapshot_and_deadline(store: Store) -> None:
    eid = await created(store)
    policy = json.dumps({"max_tokens": 5, "model": "m", "nested": {"a": [1, 2]}})
    now = await now_ms(store)
    await claim(store, eid, attempt_policy_json=policy, deadline=str(now + 90_000))
    snap = await hash_of(store, ExecKeys(eid).attempt_policy(0))
    assert snap["max_tokens"] == "5"
    assert snap["model"] == "m"
    assert json.loads(snap["nested"]) == {"a": [1, 2]}
    score = await store.call("ZSCORE", PartitionKeys(eid.tag).execution_deadline, str(eid))
    assert score == now + 90_000


@pytest.mark.parametrize(
    ("over", "detail"),
    [
        ({"ttl": "x"}, b"lease_ttl_ms must be a number, got: x"),
        ({"renew_before": "y"}, b"renew_before_ms must be a number, got: y"),
        ({"attempt_timeout_ms": "z"}, b"attempt_timeout_ms must be a number, got: z"),
        ({"attempt_policy_json": "[1"}, b"attempt_policy_json must be a JSON object"),
        ({"instance": ""}, b"worker_instance_id must not be empty"),
    ],
)
async def test_claim_bad_input_changes_nothing(store: Store, over: dict, detail: bytes) -> None:
    eid = await created(store)
    assert (await issue_grant(store, eid))[1] == b"OK"
    before = await snapshot(store, eid)
    assert await claim_raw(store, eid, **over) == [0, b"invalid_input", detail]
    assert await snapshot(store, eid) == before


async def test_claim_ignores_routing_only_keys(store: Store) -> None:
    """KEYS marked (*) may be placeholders: the function builds them from the tag and core."""
    eid = await created(store)
    assert (await issue_grant(store, eid))[1] == b"OK"
    p = PartitionKeys(eid.tag)
    keys = claim_keys(eid, "someone-else")
    for i in (2, 4, 5, 6, 7, 11):
        keys[i] = p.noop
    values = {
        "execution_id": str(eid), "worker_id": WORKER, "worker_instance_id": INSTANCE,
        "lane_id": LANE, "capability_hash": "", "lease_id": "L", "lease_ttl_ms": 30000,
        "renew_before_ms": 20000, "attempt_id": "A", "attempt_policy_json": "{}",
    }  # fmt: skip
    reply = await fcall(store, scheduling.CLAIM, ctx_of(eid), values, keys=keys)
    assert reply[:4] == [1, b"OK", b"L", b"1"]
    await check_invariants(store, eid)
    assert await store.call("EXISTS", ExecKeys(eid).attempt(0)) == 1
    assert await store.call("EXISTS", p.noop) == 0


# -- promote_delayed ------------------------------------------------------------------------------


async def test_promote_due_and_not_due(store: Store) -> None:
    now = await now_ms(store)
    eid = await created(store, priority="3", delay_until=str(now + 60_000))
    assert await promote(store, eid, now) == [1, b"OK", b"not_yet_due"]
    assert await lane_sets_of(store, eid) == ["delayed"]
    assert await promote(store, eid, now + 60_000) == [1, b"OK", b"promoted"]
    c = await check_invariants(store, eid)
    assert (c["public_state"], c["attempt_state"], c["delay_until"]) == (
        "waiting",
        "pending_first_attempt",
        "",
    )
    score = await store.call("ZSCORE", PartitionKeys(eid.tag).lane(LANE, "eligible"), str(eid))
    assert score == int(c["created_at"]) - 3 * 10**12
    assert c["last_transition_at"] == str(now + 60_000), "the promoter's clock is the caller's"


async def test_promote_cleans_stale_entries(store: Store) -> None:
    now = await now_ms(store)
    delayed = PartitionKeys(new_eid().tag).lane(LANE, "delayed")
    gone = new_eid()
    await store.call("ZADD", delayed, 1, str(gone))
    assert await promote(store, gone, now) == [1, b"OK", b"not_found_cleaned"]
    cancelled = await created(store, delay_until=str(now + 60_000))
    await store.call("HSET", ExecKeys(cancelled).core, "lifecycle_phase", "terminal")
    assert await promote(store, cancelled, now) == [1, b"OK", b"not_runnable_cleaned"]
    assert await store.call("ZSCORE", delayed, str(cancelled)) is None
    waiting = await created(store)
    await store.call("ZADD", delayed, 1, str(waiting))
    assert await promote(store, waiting, now) == [1, b"OK", b"not_delayed_cleaned"]
    assert await lane_sets_of(store, waiting) == ["eligible"]
    assert (await promote(store, waiting, "later"))[:2] == [0, b"invalid_input"]


async def test_retry_promotion_keeps_pending_retry(store: Store) -> None:
    eid = await created(store, policy_json=FAST_RETRY)
    lease = await claim(store, eid)
    reply = await fail(store, eid, lease.fence)
    assert await promote(store, eid, int(reply[3])) == [1, b"OK", b"promoted"]
    c = await check_invariants(store, eid)
    assert c["attempt_state"] == "pending_retry_attempt"


# -- change_priority ------------------------------------------------------------------------------


async def change_priority(store: Store, eid, value: object) -> list:
    values = {"execution_id": str(eid), "new_priority": value}
    return await fcall(store, scheduling.CHANGE_PRIORITY, ctx_of(eid), values)


async def test_raised_priority_becomes_the_head(store: Store) -> None:
    old = await created(store)
    await asyncio.sleep(0.005)  # created_at breaks priority ties; make it differ
    young = await created(store)
    eligible = PartitionKeys(old.tag).lane(LANE, "eligible")
    assert await store.call("ZRANGE", eligible, 0, 0) == [str(old).encode()]
    assert await change_priority(store, young, 10) == [1, b"OK", b"0", b"10"]
    assert await store.call("ZRANGE", eligible, 0, 0) == [str(young).encode()]
    assert (await core_of(store, young))["priority"] == "10"


async def test_priority_of_delayed_clamped_and_bad_input(store: Store) -> None:
    now = await now_ms(store)
    delayed = await created(store, delay_until=str(now + 60_000))
    assert await change_priority(store, delayed, 5) == [0, b"execution_not_eligible"]
    eid = await created(store)
    assert await change_priority(store, eid, 99999) == [1, b"OK", b"0", b"9000"]
    before = await snapshot(store, eid)
    reply = await change_priority(store, eid, "high")
    assert reply == [0, b"invalid_input", b"new_priority must be a number, got: high"]
    assert await snapshot(store, eid) == before
    assert await change_priority(store, new_eid(), 1) == [0, b"execution_not_found"]


async def test_mismatched_execution_id_is_a_malformed_call(store: Store) -> None:
    eid, other = await created(store), new_eid()
    before = await snapshot(store, eid)
    with pytest.raises(FlowFabricError, match="is not the execution of KEYS"):
        await fcall(
            store,
            scheduling.CHANGE_PRIORITY,
            ctx_of(eid),
            {"execution_id": str(other), "new_priority": 5},
        )
    assert await snapshot(store, eid) == before
