"""Renew, expiry marking, revoke and reclaim, called directly (docs/lifecycle.md)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import pytest

from flowfabric.server.valkey.codec import hash_to_dict
from flowfabric.server.valkey.functions import lease as lease_fns
from flowfabric.server.valkey.ids import ExecutionId
from flowfabric.server.valkey.keys import ExecKeys, PartitionKeys
from flowfabric.server.valkey.store import Store
from tests.lua.util import (
    INSTANCE,
    LANE,
    Lease,
    check_invariants,
    complete,
    core_of,
    create,
    create_and_claim,
    ctx_of,
    delay,
    fail,
    fcall,
    grant_values,
    hash_of,
    history_events,
    lease_from_core,
    mark_expired,
    move_to_children,
    new_eid,
    now_ms,
    open_stream,
    renew,
    revoke,
    snapshot,
)

SHORT = 100  # ms: a lease that is allowed to lapse
LAPSE = 0.2  # s: comfortably past SHORT


async def lapsed(store: Store, **create_over: object) -> Lease:
    lease = await create_and_claim(store, ttl=SHORT, **create_over)
    await asyncio.sleep(LAPSE)
    return lease


# -- renew_lease ----------------------------------------------------------------------------------


async def test_renew_moves_expiry_forward(store: Store) -> None:
    lease = await create_and_claim(store, ttl=10_000)
    reply = await renew(store, lease, ttl=60_000)
    assert reply[:2] == [1, b"OK"]
    expires = int(reply[2])
    assert expires > lease.expires_at
    c = await check_invariants(store, lease.eid)
    assert c["lease_expires_at"] == str(expires)
    assert c["current_lease_epoch"] == "1"
    assert int(c["lease_renewal_deadline"]) == int(c["lease_last_renewed_at"]) + 40_000
    p, k = PartitionKeys(lease.eid.tag), ExecKeys(lease.eid)
    assert await store.call("ZSCORE", p.lease_expiry, str(lease.eid)) == expires
    # the lease lives on the core mirror only (docs/lifecycle.md#leases-and-fencing)
    assert await store.call("EXISTS", k.lease_current) == 0
    assert [e["event"] for e in await history_events(store, lease.eid)] == ["acquired"]


async def test_renew_after_revoke(store: Store) -> None:
    lease = await create_and_claim(store)
    assert (await revoke(store, lease.eid))[2] == b"revoked"
    assert await renew(store, lease) == [0, b"lease_revoked"]


async def test_renew_after_expiry_marks_it(store: Store) -> None:
    lease = await lapsed(store)
    assert await renew(store, lease) == [0, b"lease_expired"]
    c = await check_invariants(store, lease.eid)
    assert c["ownership_state"] == "lease_expired_reclaimable"


async def test_renew_fence_checks(store: Store) -> None:
    lease = await create_and_claim(store)
    before = await snapshot(store, lease.eid)
    assert await renew(store, lease, idx=1) == [0, b"stale_lease"]
    assert await renew(store, lease, fence=["", "", ""]) == [0, b"fence_required"]
    assert await renew(store, lease, fence=[lease.lease_id, "", ""]) == [
        0,
        b"partial_fence_triple",
    ]
    assert await renew(store, lease, ttl=0) == [
        0,
        b"invalid_input",
        b"lease_ttl_ms must be 1..3600000, got: 0",
    ]
    assert await renew(store, lease, idx="x") == [
        0,
        b"invalid_input",
        b"attempt_index must be a number, got: x",
    ]
    assert await snapshot(store, lease.eid) == before


# -- the fence error order of docs/lifecycle.md#leases-and-fencing, on every fenced write path
# -------------------------

Op = Callable[[Store, Lease, list[str]], Awaitable[list]]


async def _complete(store: Store, lease: Lease, fence: list[str]) -> list:
    return await complete(store, lease.eid, fence)


async def _fail(store: Store, lease: Lease, fence: list[str]) -> list:
    return await fail(store, lease.eid, fence)


async def _delay(store: Store, lease: Lease, fence: list[str]) -> list:
    return await delay(store, lease.eid, fence, await now_ms(store) + 10_000)


async def _move(store: Store, lease: Lease, fence: list[str]) -> list:
    return await move_to_children(store, lease.eid, fence)


async def _renew(store: Store, lease: Lease, fence: list[str]) -> list:
    return await renew(store, lease, fence=fence)


OPS = {"complete": _complete, "fail": _fail, "delay": _delay, "move": _move, "renew": _renew}


def stale(lease: Lease) -> list[str]:
    return [lease.lease_id, str(int(lease.epoch) + 7), lease.attempt_id]


@pytest.mark.parametrize("op", OPS)
async def test_fence_order_not_active_first(store: Store, op: str) -> None:
    lease = await create_and_claim(store)
    assert (await complete(store, lease.eid, lease.fence))[1] == b"OK"
    reply = await OPS[op](store, lease, stale(lease))
    assert reply == [
        0,
        b"execution_not_active",
        b"success",
        b"1",
        b"terminal",
        lease.attempt_id.encode(),
    ]


@pytest.mark.parametrize("op", OPS)
async def test_fence_order_revoked_before_expired(store: Store, op: str) -> None:
    lease = await create_and_claim(store, ttl=SHORT)
    assert (await revoke(store, lease.eid))[2] == b"revoked"
    await asyncio.sleep(LAPSE)
    before = await snapshot(store, lease.eid)
    assert await OPS[op](store, lease, stale(lease)) == [0, b"lease_revoked"]
    assert await snapshot(store, lease.eid) == before


@pytest.mark.parametrize("op", OPS)
async def test_fence_order_expired_before_stale_and_mark_kept(store: Store, op: str) -> None:
    lease = await create_and_claim(store, ttl=SHORT)
    k = ExecKeys(lease.eid)
    await open_stream(store, lease.eid, 0)
    await asyncio.sleep(LAPSE)
    assert await OPS[op](store, lease, stale(lease)) == [0, b"lease_expired"]
    c = await check_invariants(store, lease.eid)
    assert (c["ownership_state"], c["attempt_state"]) == (
        "lease_expired_reclaimable",
        "attempt_interrupted",
    )
    assert c["blocking_reason"] == "waiting_for_worker"
    assert c["lease_expired_at"] != ""
    assert [e["event"] for e in await history_events(store, lease.eid)] == ["acquired", "expired"]
    assert await store.call("HGET", k.stream_meta(0), "closed_reason") == b"lease_expired"
    # Marked once: a second call answers the same without a second event.
    assert await OPS[op](store, lease, lease.fence) == [0, b"lease_expired"]
    assert len(await history_events(store, lease.eid)) == 2


@pytest.mark.parametrize("op", OPS)
async def test_fence_order_stale_last_changes_nothing(store: Store, op: str) -> None:
    lease = await create_and_claim(store)
    before = await snapshot(store, lease.eid)
    assert await OPS[op](store, lease, stale(lease)) == [0, b"stale_lease"]
    other = [lease.lease_id, lease.epoch, "another-attempt"]
    assert await OPS[op](store, lease, other) == [0, b"stale_lease"]
    assert await snapshot(store, lease.eid) == before


# -- mark_lease_expired_if_due --------------------------------------------------------------------


async def test_mark_expired_once(store: Store) -> None:
    lease = await create_and_claim(store, ttl=SHORT)
    await open_stream(store, lease.eid, 0)
    await asyncio.sleep(LAPSE)
    assert await mark_expired(store, lease.eid) == [1, b"OK", b"marked_expired"]
    c = await check_invariants(store, lease.eid)
    assert c["ownership_state"] == "lease_expired_reclaimable"
    assert c["public_state"] == "active"
    p = PartitionKeys(lease.eid.tag)
    assert await store.call("ZSCORE", p.lease_expiry, str(lease.eid)) is not None
    meta = await hash_of(store, ExecKeys(lease.eid).stream_meta(0))
    assert meta["closed_reason"] == "lease_expired"
    assert meta["closed_at"] == c["lease_expired_at"]
    assert await mark_expired(store, lease.eid) == [1, b"ALREADY_SATISFIED", b"already_expired"]
    events = [e["event"] for e in await history_events(store, lease.eid)]
    assert events == ["acquired", "expired"]


async def test_mark_not_yet_expired_after_renew(store: Store) -> None:
    lease = await create_and_claim(store, ttl=SHORT)
    assert (await renew(store, lease, ttl=30_000))[1] == b"OK"
    await asyncio.sleep(LAPSE)
    before = await snapshot(store, lease.eid)
    reply = await mark_expired(store, lease.eid)
    assert reply == [1, b"ALREADY_SATISFIED", b"not_yet_expired"]
    assert await snapshot(store, lease.eid) == before


async def test_mark_cleans_entries_of_inactive_executions(store: Store) -> None:
    lease = await create_and_claim(store)
    assert (await complete(store, lease.eid, lease.fence))[1] == b"OK"
    p = PartitionKeys(lease.eid.tag)
    await store.call("ZADD", p.lease_expiry, 1, str(lease.eid))
    assert await mark_expired(store, lease.eid) == [1, b"ALREADY_SATISFIED", b"not_active"]
    assert await store.call("ZSCORE", p.lease_expiry, str(lease.eid)) is None
    gone = new_eid()
    await store.call("ZADD", p.lease_expiry, 1, str(gone))
    reply = await mark_expired(store, gone)
    assert reply == [1, b"ALREADY_SATISFIED", b"execution_not_found"]
    assert await store.call("ZSCORE", p.lease_expiry, str(gone)) is None


async def test_mark_revoked(store: Store) -> None:
    lease = await create_and_claim(store)
    await revoke(store, lease.eid)
    assert await mark_expired(store, lease.eid) == [1, b"ALREADY_SATISFIED", b"already_revoked"]


# -- revoke_lease ---------------------------------------------------------------------------------


async def test_revoke(store: Store) -> None:
    lease = await create_and_claim(store)
    reply = await revoke(store, lease.eid, reason="drain")
    assert reply == [1, b"OK", b"revoked", lease.lease_id.encode(), b"1"]
    c = await check_invariants(store, lease.eid)
    assert (c["ownership_state"], c["attempt_state"]) == ("lease_revoked", "attempt_interrupted")
    assert c["blocking_detail"] == "lease revoked: drain"
    assert c["lease_revoke_reason"] == "drain"
    assert c["current_lease_id"] == lease.lease_id, "identity kept to answer the old owner"
    p, k = PartitionKeys(lease.eid.tag), ExecKeys(lease.eid)
    assert await store.call("EXISTS", k.lease_current) == 0
    assert await store.call("SISMEMBER", p.worker_leases(INSTANCE), str(lease.eid)) == 0
    score = await store.call("ZSCORE", p.lease_expiry, str(lease.eid))
    assert score == int(c["lease_revoked_at"]), "Spec: revoked leases stay discoverable"
    assert await lane_active(store, lease.eid)
    assert await store.call("HGET", k.attempt(0), "attempt_state") == b"started"
    assert (await history_events(store, lease.eid))[-1]["event"] == "revoked"
    assert await complete(store, lease.eid, lease.fence) == [0, b"lease_revoked"]
    again = await revoke(store, lease.eid)
    assert again == [1, b"ALREADY_SATISFIED", b"already_revoked"]


async def lane_active(store: Store, eid: ExecutionId) -> bool:
    key = PartitionKeys(eid.tag).lane(LANE, "active")
    return await store.call("ZSCORE", key, str(eid)) is not None


async def test_revoke_default_reason_and_mismatches(store: Store) -> None:
    lease = await create_and_claim(store)
    before = await snapshot(store, lease.eid)
    reply = await revoke(store, lease.eid, expected="other")
    assert reply == [0, b"stale_lease", f"expected other but current is {lease.lease_id}".encode()]
    assert await snapshot(store, lease.eid) == before
    assert (await revoke(store, lease.eid, expected=lease.lease_id))[2] == b"revoked"
    assert (await core_of(store, lease.eid))["lease_revoke_reason"] == "operator_revoke"


async def test_revoke_runnable_and_expired(store: Store) -> None:
    eid = new_eid()
    await create(store, eid)
    assert await revoke(store, eid) == [0, b"execution_not_active", b"none", b"0", b"runnable", b""]
    assert await revoke(store, new_eid()) == [0, b"execution_not_found"]
    lease = await lapsed(store)
    await mark_expired(store, lease.eid)
    assert await revoke(store, lease.eid) == [1, b"ALREADY_SATISFIED", b"already_expired"]


# -- issue_reclaim_grant / reclaim_execution ---------------------------------------------------


async def reclaim_grant(
    store: Store, eid: ExecutionId, worker: str = "w2", caps: str = "", ttl: object = 10_000
) -> list:
    values = grant_values(eid, worker, f"{worker}-i1", ttl, caps)
    return await fcall(store, lease_fns.RECLAIM_GRANT, ctx_of(eid), values)


async def reclaim(
    store: Store,
    eid: ExecutionId,
    worker: str = "w2",
    ttl: object = 30_000,
    policy: str = "",
) -> list:
    new = int((await core_of(store, eid))["total_attempt_count"])
    instance = f"{worker}-i1"
    values = {
        "execution_id": str(eid), "worker_id": worker, "worker_instance_id": instance,
        "lane_id": LANE, "lease_id": f"lease-r{new}", "lease_ttl_ms": ttl,
        "attempt_id": f"att-r{new}", "attempt_policy_json": policy,
    }  # fmt: skip
    ctx = ctx_of(eid, worker_instance_id=instance)
    return await fcall(store, lease_fns.RECLAIM, ctx, values)


async def test_reclaim_grant_only_for_lost_leases(store: Store) -> None:
    healthy = await create_and_claim(store)
    assert await reclaim_grant(store, healthy.eid) == [0, b"execution_not_reclaimable"]
    lease = await lapsed(store)
    await mark_expired(store, lease.eid)
    reply = await reclaim_grant(store, lease.eid)
    assert reply[:3] == [1, b"OK", str(lease.eid).encode()]
    grant = await hash_of(store, ExecKeys(lease.eid).claim_grant)
    assert grant["grant_expires_at"] == reply[3].decode()
    assert await reclaim_grant(store, lease.eid) == [0, b"grant_already_exists"]
    p = PartitionKeys(lease.eid.tag)
    assert await store.call("ZSCORE", p.lease_expiry, str(lease.eid)) is not None


async def test_reclaim_grant_capability_mismatch(store: Store) -> None:
    policy = json.dumps({"routing_requirements": {"required_capabilities": ["gpu"]}})
    lease = await create_and_claim(store, caps="gpu", policy_json=policy)
    await revoke(store, lease.eid)
    assert await reclaim_grant(store, lease.eid, caps="cpu") == [0, b"capability_mismatch", b"gpu"]
    assert (await core_of(store, lease.eid))["last_capability_mismatch_at"] != ""
    assert await store.call("EXISTS", ExecKeys(lease.eid).claim_grant) == 0


async def test_reclaim_after_expiry(store: Store) -> None:
    policy = json.dumps({"timeout_policy": {"attempt_timeout_ms": 9000}})
    lease = await lapsed(store, policy_json=policy)
    await open_stream(store, lease.eid, 0)
    await mark_expired(store, lease.eid)
    assert (await reclaim_grant(store, lease.eid))[1] == b"OK"
    reply = await reclaim(store, lease.eid)
    assert reply[:2] == [1, b"OK"]
    new = Lease.from_reply(lease.eid, reply, "w2-i1")
    assert (new.epoch, new.attempt_index, new.attempt_type) == ("2", 1, "reclaim")
    c = await check_invariants(store, lease.eid)
    assert (c["ownership_state"], c["current_worker_id"], c["lease_reclaim_count"]) == (
        "leased",
        "w2",
        "1",
    )
    assert c["lease_expired_at"] == ""
    k, p = ExecKeys(lease.eid), PartitionKeys(lease.eid.tag)
    old = await hash_of(store, k.attempt(0))
    assert (old["attempt_state"], old["failure_reason"]) == (
        "interrupted_reclaimed",
        "lease_expired",
    )
    attempt = await hash_of(store, k.attempt(1))
    assert (attempt["attempt_type"], attempt["reclaim_reason"]) == ("reclaim", "lease_expired")
    assert attempt["previous_attempt_index"] == "0"
    assert await store.call("HGET", k.stream_meta(0), "closed_reason") == b"reclaimed"
    assert await store.call("SISMEMBER", p.worker_leases(INSTANCE), str(lease.eid)) == 0
    assert await store.call("SISMEMBER", p.worker_leases("w2-i1"), str(lease.eid)) == 1
    assert await store.call("EXISTS", k.claim_grant) == 0
    timeout = await store.call("ZSCORE", p.attempt_timeout, str(lease.eid))
    assert timeout == int(c["lease_acquired_at"]) + 9000, "Spec: re-armed from the policy"
    events = await history_events(store, lease.eid)
    assert events[-1]["event"] == "reclaimed"
    assert events[-1]["new_lease_epoch"] == "2"
    assert events[-1]["old_lease_epoch"] == "1"
    # The old owner is fenced out; the new one completes.
    assert await complete(store, lease.eid, lease.fence) == [0, b"stale_lease"]
    assert (await complete(store, lease.eid, new.fence))[1] == b"OK"
    await check_invariants(store, lease.eid)


async def test_reclaim_after_revoke(store: Store) -> None:
    lease = await create_and_claim(
        store, input_payload=b"in", payload_encoding="bin", priority="4",
        tags_json=json.dumps({"app.a": "1"}),
    )  # fmt: skip
    await revoke(store, lease.eid)
    await reclaim_grant(store, lease.eid)
    reply = await reclaim(store, lease.eid)
    assert reply[1] == b"OK"
    # after the lease, what the worker needs (as in a batch claim row)
    assert reply[8:14] == [b"in", b"bin", b"k", b"ns", b"4", b""]
    assert hash_to_dict(reply[14]) == {"app.a": "1"}
    attempt = await hash_of(store, ExecKeys(lease.eid).attempt(1))
    assert attempt["reclaim_reason"] == "lease_revoked"
    c = await check_invariants(store, lease.eid)
    assert c["lease_revoked_at"] == c["lease_revoke_reason"] == ""
    current = await lease_from_core(store, lease.eid)
    assert (await renew(store, current))[1] == b"OK", "a stale revoke marker must not fail renew"


async def test_reclaim_limit_fails_terminally(store: Store) -> None:
    lease = await create_and_claim(store, policy_json=json.dumps({"max_reclaim_count": 1}))
    await revoke(store, lease.eid)
    await reclaim_grant(store, lease.eid)
    assert (await reclaim(store, lease.eid))[1] == b"OK"
    await revoke(store, lease.eid)
    await open_stream(store, lease.eid, 1)
    assert await reclaim(store, lease.eid) == [1, b"OK", b"max_reclaims_exceeded"]
    c = await check_invariants(store, lease.eid)
    assert (c["public_state"], c["failure_reason"]) == ("failed", "max_reclaims_exceeded")
    k = ExecKeys(lease.eid)
    assert await store.call("HGET", k.attempt(1), "attempt_state") == b"interrupted_reclaimed"
    assert await store.call("HGET", k.stream_meta(1), "closed_reason") == b"reclaimed"
    assert await store.call("EXISTS", k.lease_current) == 0


async def test_reclaim_rejections(store: Store) -> None:
    healthy = await create_and_claim(store)
    assert await reclaim(store, healthy.eid) == [0, b"execution_not_reclaimable"]
    lease = await create_and_claim(store)
    await revoke(store, lease.eid)
    assert await reclaim(store, lease.eid) == [0, b"invalid_claim_grant"]
    await reclaim_grant(store, lease.eid, worker="w3")
    before = await snapshot(store, lease.eid, ("w2-i1", "w3-i1"))
    assert await reclaim(store, lease.eid) == [0, b"invalid_claim_grant"]
    assert await reclaim(store, lease.eid, ttl="x") == [
        0,
        b"invalid_input",
        b"lease_ttl_ms must be a number, got: x",
    ]
    assert await snapshot(store, lease.eid, ("w2-i1", "w3-i1")) == before
