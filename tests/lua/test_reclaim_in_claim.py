"""ff_claim_batch reclaims the lane's due leases on its partition before it leases any eligible
head (docs/lifecycle.md#lease-expiry-and-reclaim), and stops at max_reply_bytes
(docs/lifecycle.md#claim-reply-size)."""

from __future__ import annotations

import asyncio
import json

from flowfabric.server.valkey.ids import ExecutionId
from flowfabric.server.valkey.keys import ExecKeys, PartitionKeys
from flowfabric.server.valkey.store import Store
from tests.lua.test_claim_batch import PARTITION, batch_raw, created, rows
from tests.lua.util import (
    LANE,
    check_invariants,
    claim,
    core_of,
    hash_of,
    history_events,
    mark_expired,
    now_ms,
    renew,
    revoke,
    snapshot,
)

SHORT = 50  # ms: a lease that is due by the time the next call runs


async def due_lease(store: Store, caps: str = "", **over: object) -> ExecutionId:
    """An execution claimed by another worker with a lease that is already due."""
    eid = await created(store, **over)
    await claim(store, eid, worker="crashed", instance="crashed-1", ttl=SHORT, caps=caps)
    expiry = int((await core_of(store, eid))["lease_expires_at"])
    for _ in range(500):  # Valkey's clock, not ours, decides when the lease is due
        if await now_ms(store) > expiry:
            return eid
        await asyncio.sleep(0.01)
    raise AssertionError("the lease never became due")


async def test_a_due_lease_is_reclaimed_before_a_backlog_of_eligible_work(store: Store) -> None:
    backlog = [await created(store, priority="9") for _ in range(5)]
    eid = await due_lease(store, input_payload=b"keep me")
    got = rows(await batch_raw(store, 1))
    assert [r["execution_id"] for r in got] == [str(eid)], "the due lease goes first"
    [r] = got
    assert (r["attempt_type"], r["attempt_index"], r["lease_epoch"]) == ("reclaim", "1", "2")
    assert (r["payload"], r["resumed"]) == (b"keep me", "0")
    c = await check_invariants(store, eid)
    assert (c["ownership_state"], c["current_lease_id"]) == ("leased", r["lease_id"])
    assert c["lease_reclaim_count"] == "1"
    old_attempt = await hash_of(store, ExecKeys(eid).attempt(0))
    assert (old_attempt["attempt_state"], old_attempt["failure_reason"]) == (
        "interrupted_reclaimed", "lease_expired",
    )  # fmt: skip
    events = [e["event"] for e in await history_events(store, eid)]
    assert events[-2:] == ["expired", "reclaimed"], "marked expired, then reclaimed, one call"
    p = PartitionKeys.of(PARTITION)
    assert await store.call("SISMEMBER", p.worker_leases("crashed-1"), str(eid)) == 0
    for b in backlog:
        assert (await core_of(store, b))["lifecycle_phase"] == "runnable"
    # the same call fills the rest of max_tasks from the eligible heads
    more = rows(await batch_raw(store, 3))
    assert [r["attempt_type"] for r in more] == ["initial"] * 3


async def test_reclaims_and_eligible_heads_share_one_call(store: Store) -> None:
    head = await created(store)
    eid = await due_lease(store)
    got = rows(await batch_raw(store, 2))
    assert [(r["execution_id"], r["attempt_type"]) for r in got] == [
        (str(eid), "reclaim"), (str(head), "initial"),
    ]  # fmt: skip


async def test_a_claimed_row_carries_the_heads_eligible_wait(store: Store) -> None:
    """The claim-wait metric's figure (docs/observability.md#where-events-are-counted): an
    eligible head's row says how long it had been eligible (now - last_transition_at, read
    before the claim wrote it); a reclaim row carries none."""
    head = await created(store)
    eid = await due_lease(store)  # its lease is already due: the head has waited that long
    since = int((await core_of(store, head))["last_transition_at"])
    before = await now_ms(store)
    got = {r["execution_id"]: r for r in rows(await batch_raw(store, 2))}
    after = await now_ms(store)
    assert got[str(eid)]["claim_wait_ms"] == ""
    assert before - since <= int(got[str(head)]["claim_wait_ms"]) <= after - since


async def test_a_revoked_lease_is_reclaimed_at_once(store: Store) -> None:
    eid = await created(store)
    lease = await claim(store, eid, worker="other", instance="other-1", ttl=600_000)
    assert (await revoke(store, eid))[2] == b"revoked"
    [r] = rows(await batch_raw(store, 1))
    assert (r["execution_id"], r["attempt_type"]) == (str(eid), "reclaim")
    old = await hash_of(store, ExecKeys(eid).attempt(0))
    assert old["failure_reason"] == "lease_revoked" and lease.lease_id != r["lease_id"]
    await check_invariants(store, eid)


async def test_a_lease_marked_by_the_scanner_is_reclaimed(store: Store) -> None:
    eid = await due_lease(store)
    assert (await mark_expired(store, eid))[2] == b"marked_expired"
    [r] = rows(await batch_raw(store, 1))
    assert (r["execution_id"], r["attempt_type"]) == (str(eid), "reclaim")
    events = [e["event"] for e in await history_events(store, eid)]
    assert events.count("expired") == 1, "not marked twice"


async def test_a_renewed_lease_is_not_due(store: Store) -> None:
    eid = await created(store)
    lease = await claim(store, eid, worker="alive", instance="alive-1", ttl=300)
    assert (await renew(store, lease, ttl=600_000))[1] == b"OK"
    c = await check_invariants(store, eid)  # lane active re-scored at the renewed expiry
    await asyncio.sleep(0.35)
    assert rows(await batch_raw(store, 1)) == []
    assert (await core_of(store, eid))["current_lease_id"] == c["current_lease_id"]


async def test_a_stale_active_score_is_repaired_not_reclaimed(store: Store) -> None:
    """A lease renewed by an older version keeps its first expiry as its lane active score."""
    eid = await created(store)
    await claim(store, eid, worker="alive", instance="alive-1", ttl=600_000)
    active = PartitionKeys.of(PARTITION).lane(LANE, "active")
    await store.call("ZADD", active, 1, str(eid))
    before = await core_of(store, eid)
    assert rows(await batch_raw(store, 1)) == []
    assert await core_of(store, eid) == before
    await check_invariants(store, eid)  # the score is the lease expiry again


async def test_a_stale_active_entry_is_dropped(store: Store) -> None:
    eid = await created(store)
    active = PartitionKeys.of(PARTITION).lane(LANE, "active")
    await store.call("ZADD", active, 1, str(eid))  # runnable, yet in the active set
    [r] = rows(await batch_raw(store, 1))
    assert (r["execution_id"], r["attempt_type"]) == (str(eid), "initial"), "claimed as eligible"
    await check_invariants(store, eid)


async def test_a_due_lease_the_worker_cannot_run_is_left_for_a_capable_one(store: Store) -> None:
    policy = json.dumps({"routing_requirements": {"required_capabilities": ["gpu"]}})
    eid = await due_lease(store, caps="gpu", policy_json=policy)
    plain = await created(store)
    got = rows(await batch_raw(store, 2, caps="cpu"))
    assert [r["execution_id"] for r in got] == [str(plain)]
    c = await core_of(store, eid)
    assert (c["lifecycle_phase"], c["ownership_state"]) == ("active", "lease_expired_reclaimable")
    [r] = rows(await batch_raw(store, 1, caps="gpu"))
    assert (r["execution_id"], r["attempt_type"]) == (str(eid), "reclaim")


async def test_a_due_lease_under_another_grant_is_skipped(store: Store) -> None:
    eid = await due_lease(store)
    await store.call("HSET", ExecKeys(eid).claim_grant, "worker_id", "two-step")
    assert rows(await batch_raw(store, 1)) == []


async def test_the_reclaim_limit_fails_the_execution_and_leases_nothing(store: Store) -> None:
    eid = await due_lease(store, policy_json=json.dumps({"max_reclaim_count": 0}))
    head = await created(store)
    got = rows(await batch_raw(store, 1))
    assert [r["execution_id"] for r in got] == [str(head)]
    c = await check_invariants(store, eid)
    assert (c["terminal_outcome"], c["failure_reason"]) == ("failed", "max_reclaims_exceeded")


# -- reply size -----------------------------------------------------------------------------------

ROW_BYTES = 512


async def test_max_reply_bytes_stops_before_the_row_that_would_not_fit(store: Store) -> None:
    big = [await created(store, input_payload=b"x" * 10_000) for _ in range(3)]
    c = await core_of(store, big[0])  # all three carry the same fields
    fields = ("payload_encoding", "execution_kind", "namespace", "flow_id")
    cost = ROW_BYTES + 10_000 + sum(len(c.get(f, "").encode()) for f in fields)
    before = {str(e): await snapshot(store, e) for e in big}
    reply = await batch_raw(store, 3, max_reply_bytes=str(cost + cost // 2))
    [one] = rows(reply)  # whichever head comes first (same-millisecond creates tie on score)
    assert int(reply[4]) == cost, "reply_bytes counts the rows as documented"
    rest = [e for e in big if str(e) != one["execution_id"]]
    assert len(rest) == 2
    assert [await snapshot(store, e) for e in rest] == [before[str(e)] for e in rest], (
        "the rest untouched"
    )
    reply = await batch_raw(store, 3, max_reply_bytes="0")
    assert len(rows(reply)) == 2 and int(reply[4]) == 2 * cost, "0 = no cap"


async def test_max_reply_bytes_applies_to_reclaims_too(store: Store) -> None:
    eid = await due_lease(store, input_payload=b"y" * 5_000)
    before = await core_of(store, eid)
    assert rows(await batch_raw(store, 1, max_reply_bytes="600")) == []
    after = await core_of(store, eid)
    assert after["current_lease_id"] == before["current_lease_id"], "not reclaimed"
