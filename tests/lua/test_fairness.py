"""Tenant fairness within a lane (docs/lifecycle.md#tenant-fairness): the namespace sub-indexes
beside a lane's eligible set stay in step with it, and ff_claim_batch shares the heads of one
partition between namespaces by virtual time, weights optional."""

from __future__ import annotations

import json

import pytest

from flowfabric.server.valkey.errors import FlowFabricError
from flowfabric.server.valkey.functions import Claimer, Functions, execution
from flowfabric.server.valkey.functions.scheduling import Batch
from flowfabric.server.valkey.keys import PartitionKeys
from flowfabric.server.valkey.store import Store
from tests.conftest import flush
from tests.lua.test_admission import block, unblock
from tests.lua.test_claim_batch import caps_policy, minted
from tests.lua.util import (
    INSTANCE,
    LANE,
    WORKER,
    call_args,
    cancel,
    check_lane_namespaces,
    claim,
    create,
    create_args,
    ctx_of,
    delay,
    new_eid,
    now_ms,
    promote,
    replay,
)

PARTITION = 7  # new_eid's partition
TAG = PartitionKeys.of(PARTITION).tag
P = PartitionKeys(TAG)
TTL = 30_000
ROUND = 16  # tasks per claim round
WHO = Claimer(WORKER, INSTANCE, LANE)


async def create_many(
    store: Store, namespace: str, n: int, chunk: int = 500, **over: object
) -> list[str]:
    """`n` eligible executions of `namespace` on PARTITION, created with pipelined FCALLs.
    `over` values may be callables of the index (per-execution tags, priorities)."""
    eids: list[str] = []
    for start in range(0, n, chunk):
        pipe = store.pipeline()
        for i in range(start, min(n, start + chunk)):
            eid = new_eid(PARTITION)
            values = {k: (v(i) if callable(v) else v) for k, v in over.items()}
            args = create_args(eid, namespace=namespace, **values)
            keys, argv = call_args(execution.CREATE, ctx_of(eid, namespace=namespace), args)
            pipe.execute_command("FCALL", "ff_create_execution", len(keys), *keys, *argv)
            eids.append(str(eid))
        for reply in await store.run_pipeline(pipe):
            assert reply[:2] == [1, b"OK"], reply
    return eids


async def claim_round(
    fn: Functions, n: int = ROUND, weights: str = "", who: Claimer = WHO, scan: int | None = None
) -> Batch:
    return await fn.scheduling.claim_batch(
        PARTITION, who, TTL, minted(n), n + 16 if scan is None else scan, 0, weights
    )


async def namespace_vt(store: Store) -> dict[str, float]:
    raw = await store.call("ZRANGE", P.lane_namespaces(LANE), 0, -1, "WITHSCORES")
    return {m.decode(): float(s) for m, s in raw}


# -- the scenario of the issue --------------------------------------------------------------------


# Standalone only: every key is on one partition (one hash tag, one slot), so the Cluster adds
# nothing here but 10,000 slower creates; the other tests of this file run on both.
@pytest.mark.parametrize("valkey_url", ["standalone"], indirect=True)
async def test_b_starts_within_two_rounds_behind_a_10000_backlog(store: Store) -> None:
    # Half of A's work is spread over 5,000 tag values at the top priority: fairness is by
    # namespace, so neither changes B's turn.
    await create_many(
        store, "tenant-a", 10_000,
        tags_json=lambda i: json.dumps({"a.key": str(i)}) if i % 2 else "",
        priority=lambda i: "9000" if i % 2 else "0",
    )  # fmt: skip
    b = set(await create_many(store, "tenant-b", 10))
    await check_lane_namespaces(store, TAG)
    fn = Functions(store)
    started: list[int] = []
    for r in range(2):
        batch = await claim_round(fn)
        assert len(batch.claimed) == ROUND
        started += [r for row in batch.claimed if row.execution_id in b]
    assert len(started) == 10, f"B's executions started in rounds {started}"
    assert started.count(0) == 8, "the first round alternates A and B"
    await check_lane_namespaces(store, TAG)


async def test_b_waits_behind_a_without_a_second_namespace_in_the_lane(store: Store) -> None:
    """The baseline the fairness replaces: within one namespace the eligible order rules, so
    the later executions start after the whole backlog (a 200-long one here)."""
    a = await create_many(store, "tenant-a", 200)
    late = set(await create_many(store, "tenant-a", 10))
    fn = Functions(store)
    batch = await claim_round(fn)
    # (creates within one millisecond tie on score, so the order among them is the member's)
    assert {row.execution_id for row in batch.claimed} <= set(a)
    assert not late & {row.execution_id for row in batch.claimed}


# -- weights --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("weights", "ratio"), [("", 1), (json.dumps({"tenant-a": 3}), 3)])
async def test_claims_split_by_weight(store: Store, weights: str, ratio: int) -> None:
    await create_many(store, "tenant-a", 400)
    await create_many(store, "tenant-b", 400)
    fn = Functions(store)
    got = {"tenant-a": 0, "tenant-b": 0}
    for _ in range(20):  # 320 claims
        for row in (await claim_round(fn, weights=weights)).claimed:
            got[row.namespace] += 1
    assert sum(got.values()) == 320
    # The lower virtual time goes first and a claim advances it by UNIT / weight, so the two
    # stay within one step of B's (UNIT): |a x UNIT/ratio - b x UNIT| <= UNIT.
    assert abs(got["tenant-a"] - ratio * got["tenant-b"]) <= ratio + 1, got
    await check_lane_namespaces(store, TAG)


@pytest.mark.parametrize(
    "weights", ["not json", json.dumps({"a": 0}), json.dumps({"a": 1001}), json.dumps({"a": 1.5}),
                json.dumps([3])],
)  # fmt: skip
async def test_bad_weights_are_refused_before_any_write(store: Store, weights: str) -> None:
    await create_many(store, "tenant-a", 3)
    await create_many(store, "tenant-b", 3)
    before = await store.call("ZRANGE", P.lane(LANE, "eligible"), 0, -1)
    vt = await namespace_vt(store)
    with pytest.raises(FlowFabricError) as err:
        await claim_round(Functions(store), 2, weights)
    assert err.value.code == "invalid_input"
    assert "tenant_weights" in err.value.details[0]
    assert await store.call("ZRANGE", P.lane(LANE, "eligible"), 0, -1) == before
    assert await namespace_vt(store) == vt


# -- virtual time ---------------------------------------------------------------------------------


async def test_a_joining_namespace_starts_at_the_lowest_virtual_time(store: Store) -> None:
    await create_many(store, "tenant-a", 40)
    await create_many(store, "tenant-b", 40)
    fn = Functions(store)
    await claim_round(fn, 15)  # 8 for A, 7 for B: A's virtual time is ahead
    vt = await namespace_vt(store)
    assert vt["tenant-a"] > vt["tenant-b"] > 0
    await create_many(store, "tenant-c", 40)
    joined = await namespace_vt(store)
    assert joined["tenant-c"] == vt["tenant-b"], "no burst for C, no wait either"
    batch = await claim_round(fn, 6)
    counts = {ns: sum(r.namespace == ns for r in batch.claimed) for ns in joined}
    # B and C at 7 steps, A at 8: B, C; then all three tied at 8, taken in the set's order at
    # the call's start (B, C, A); then B at 9 again
    assert counts == {"tenant-a": 1, "tenant-b": 3, "tenant-c": 2}, counts


async def test_a_single_namespace_keeps_eligible_order_and_its_virtual_time(store: Store) -> None:
    low = await create_many(store, "tenant-a", 5)
    high = await create_many(store, "tenant-a", 5, priority="10")
    fn = Functions(store)
    batch = await claim_round(fn, 8)
    got = [r.execution_id for r in batch.claimed]
    assert set(got[:5]) == set(high) and set(got[5:]) <= set(low), "priority first"
    assert await namespace_vt(store) == {"tenant-a": 0.0}, "the one-namespace path writes none"


async def test_skipped_heads_neither_hold_the_call_nor_loop(store: Store) -> None:
    # A's heads need a capability this worker lacks; the call charges A for each one it looks
    # at, so B's heads are reached, and the scan bound ends the call
    await create_many(store, "tenant-a", 100, policy_json=caps_policy("gpu"))
    b = set(await create_many(store, "tenant-b", 10))
    batch = await claim_round(Functions(store), ROUND, scan=32)
    assert {r.execution_id for r in batch.claimed} == b
    assert len(batch.mismatched) == 32 - 10, "every head examined once, within max_scanned"
    assert len(set(batch.mismatched)) == len(batch.mismatched)


async def test_heads_for_admission_are_interleaved_and_charged(store: Store) -> None:
    """A's heads carry a quota (reported for admission, not leased): they take turns with B's
    and are charged like claims, so B's heads are all reached and A's lead does not grow."""
    await create_many(store, "tenant-a", 30, quota_policy_id="q-1")
    b = set(await create_many(store, "tenant-b", 5))
    batch = await claim_round(Functions(store), 8, scan=20)
    assert {r.execution_id for r in batch.claimed} == b
    assert len(batch.needs_admission) == 20 - 5, "every head examined once, within max_scanned"
    vt = await namespace_vt(store)
    assert vt == {"tenant-a": 15 * 1_000_000}, "B left with its last head; A charged per head"


async def test_a_row_that_does_not_fit_ends_the_call_uncharged(store: Store) -> None:
    await create_many(store, "tenant-a", 3, input_payload=b"a" * 1_500_000)
    await create_many(store, "tenant-b", 3, input_payload=b"b" * 1_500_000)
    fn = Functions(store)
    batch = await fn.scheduling.claim_batch(PARTITION, WHO, TTL, minted(4), 8, 2 << 20)
    assert len(batch.claimed) == 1, "one 1.5 MB row fits in 2 MiB, the second does not"
    first = batch.claimed[0].namespace
    vt = await namespace_vt(store)
    assert vt[first] == 1_000_000 and sum(vt.values()) == 1_000_000, vt
    await check_lane_namespaces(store, TAG)


async def test_a_namespace_listed_without_eligible_work_is_dropped(store: Store) -> None:
    await create_many(store, "tenant-a", 3)
    await store.call("ZADD", P.lane_namespaces(LANE), 0, "ghost")
    batch = await claim_round(Functions(store), 3)
    assert len(batch.claimed) == 3
    assert await namespace_vt(store) == {}


# -- the namespace side follows every eligible write ----------------------------------------------


async def test_every_transition_keeps_the_namespace_side_in_step(store: Store) -> None:
    """Create, claim, block, unblock, delay, promote, change priority, cancel, replay: after each,
    the union of the sub-indexes is the eligible set and the namespace set lists exactly the
    namespaces with eligible work. (Suspend and resume: tests/lua/test_suspension.py, through
    check_invariants; flows: the flow tests.)"""
    fn = Functions(store)
    a1, a2, b1 = new_eid(), new_eid(), new_eid()
    for eid, ns in ((a1, "tenant-a"), (a2, "tenant-a"), (b1, "tenant-b")):
        ctx_ns = create_args(eid, namespace=ns)
        keys, argv = call_args(execution.CREATE, ctx_of(eid, namespace=ns), ctx_ns)
        assert (await store.fcall("ff_create_execution", keys, argv))[1] == b"OK"
    await check_lane_namespaces(store, TAG)
    assert await block(store, a1, "waiting_for_quota") == [1, b"OK", b"blocked"]
    await check_lane_namespaces(store, TAG)
    assert await unblock(store, a1) == [1, b"OK", b"unblocked"]
    await check_lane_namespaces(store, TAG)
    await fn.scheduling.change_priority(a2, 50)
    await check_lane_namespaces(store, TAG)
    lease = await claim(store, b1)
    await check_lane_namespaces(store, TAG)
    assert await namespace_vt(store) == {"tenant-a": 0.0}, "B left with its last head"
    now = await now_ms(store)
    assert (await delay(store, b1, lease.fence, now - 1))[1] == b"OK"
    await check_lane_namespaces(store, TAG)
    assert (await promote(store, b1, now))[2] == b"promoted"
    await check_lane_namespaces(store, TAG)
    assert (await cancel(store, a1))[1] == b"OK"
    await check_lane_namespaces(store, TAG)
    assert (await replay(store, a1))[1] == b"OK"
    await check_lane_namespaces(store, TAG)
    assert len((await claim_round(fn, 3)).claimed) == 3
    await check_lane_namespaces(store, TAG)
    assert await namespace_vt(store) == {}


@pytest.mark.parametrize("drift", ["missing", "stray"])
async def test_reconciler_and_repair_bring_the_namespace_side_back(
    store: Store, drift: str
) -> None:
    """An execution made eligible by an older version (no sub-index entry), or a sub-index entry
    left behind by a claimed one: the index reconciler and the repair sweep both fix it and say
    so."""
    fn = Functions(store)
    for repair in ("reconcile", "repair"):
        await flush(store)
        eid = new_eid()
        assert (await create(store, eid))[1] == b"OK"
        sub = P.lane_namespace(LANE, "ns")
        if drift == "missing":
            await store.call("ZREM", sub, str(eid))
            await store.call("ZREM", P.lane_namespaces(LANE), "ns")
        else:
            await claim(store, eid)
            await store.call("ZADD", sub, 1, str(eid))
            await store.call("ZADD", P.lane_namespaces(LANE), 0, "ns")
        if repair == "reconcile":
            got = await fn.maintenance.reconcile_indexes(eid)
            assert got.outcome == "repaired", got
            side = got.added if drift == "missing" else got.removed
            assert side.split(",") == ["eligible:ns"], got
        else:
            rep = await fn.maintenance.repair_execution(eid, 0)
            assert rep.outcome == "clamped" and rep.fields.split(",") == ["eligible:ns"], rep
        await check_lane_namespaces(store, TAG)
        assert await store.call("ZCARD", sub) == (1 if drift == "missing" else 0)


async def test_two_namespaces_on_cluster_stay_on_one_slot(store: Store) -> None:
    """Every key the fair pass touches carries the partition's tag (the Cluster topology runs
    this too): the namespaces' sub-indexes and the namespace set hash to the eligible set's
    slot."""
    await create_many(store, "tenant-a", 4)
    await create_many(store, "tenant-b", 4)
    keys = [P.lane(LANE, "eligible"), P.lane_namespaces(LANE),
            P.lane_namespace(LANE, "tenant-a"), P.lane_namespace(LANE, "tenant-b")]  # fmt: skip
    assert {k.split("}")[0] for k in keys} == {"ff:idx:" + TAG[:-1]}
    assert len((await claim_round(Functions(store), 8)).claimed) == 8
