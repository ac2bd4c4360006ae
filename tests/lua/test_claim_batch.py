"""ff_claim_batch: one claimer leases several heads of one lane's eligible set on one partition in
one call, with the checks and writes of grant + claim (or grant + resumed claim)."""

from __future__ import annotations

import json
import uuid

import pytest

from flowfabric.server.valkey.errors import FlowFabricError
from flowfabric.server.valkey.functions import Claimer, Functions, scheduling
from flowfabric.server.valkey.functions.core import KeyCtx
from flowfabric.server.valkey.ids import ExecutionId
from flowfabric.server.valkey.keys import ExecKeys, PartitionKeys
from flowfabric.server.valkey.store import Store
from tests.lua.util import (
    INSTANCE,
    LANE,
    WORKER,
    check_invariants,
    claim,
    core_of,
    create,
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

PARTITION = 7  # new_eid's partition
TTL = 30_000
ROW = (
    "execution_id", "lease_id", "lease_epoch", "lease_expires_at", "attempt_id",
    "attempt_index", "attempt_type", "resumed", "payload", "payload_encoding", "execution_kind",
    "namespace", "priority", "flow_id", "tags", "trace_context", "claim_wait_ms",
)  # fmt: skip


def batch_keys(partition: int = PARTITION, lane: str = LANE) -> list[str]:
    p = PartitionKeys.of(partition)
    return [p.lane(lane, "eligible"), p.lease_expiry, p.attempt_timeout, p.execution_deadline]


def minted(n: int) -> list[tuple[str, str]]:
    return [(f"lease-{uuid.uuid4()}", f"attempt-{uuid.uuid4()}") for _ in range(n)]


async def batch_raw(
    store: Store,
    n: int,
    caps: str = "",
    scan: int | None = None,
    ids: list[tuple[str, str]] | None = None,
    keys: list[str] | None = None,
    **over: object,
) -> list:
    args: dict[str, object] = {
        "worker_id": WORKER,
        "worker_instance_id": INSTANCE,
        "lane_id": LANE,
        "capability_hash": "caphash",
        "worker_capabilities_csv": caps,
        "lease_ttl_ms": str(TTL),
        "renew_before_ms": str(TTL * 2 // 3),
        "max_tasks": str(n),
        "max_scanned": str(n + 8 if scan is None else scan),
        "max_reply_bytes": "0",
    }
    assert not set(over) - set(args), over
    args.update(over)
    pairs = ids if ids is not None else minted(n)
    flat = [v for pair in pairs for v in pair]
    args["lease_and_attempt_ids"] = flat
    ctx = KeyCtx(tag=PartitionKeys.of(PARTITION).tag, lane=LANE)
    return await fcall(store, scheduling.CLAIM_BATCH, ctx, args, keys=keys or batch_keys())


def rows(reply: list) -> list[dict]:
    """The claimed rows as dicts (tags as a dict), decoded."""
    assert reply[:2] == [1, b"OK"], reply
    out = []
    for raw in reply[2]:
        row = dict(zip(ROW, raw, strict=True))
        tags = row.pop("tags")
        row = {k: (v if k == "payload" else v.decode()) for k, v in row.items()}
        row["tags"] = {tags[i].decode(): tags[i + 1].decode() for i in range(0, len(tags), 2)}
        out.append(row)
    return out


async def created(store: Store, **over: object) -> ExecutionId:
    eid = new_eid()
    assert (await create(store, eid, **over))[1] == b"OK"
    return eid


def caps_policy(*caps: str) -> str:
    return json.dumps({"routing_requirements": {"required_capabilities": list(caps)}})


async def paused_and_promoted(store: Store, eid: ExecutionId) -> str:
    """Claim, self-delay and promote `eid`: eligible again with its attempt interrupted."""
    lease = await claim(store, eid)
    now = await now_ms(store)
    assert (await delay(store, eid, lease.fence, now - 1))[1] == b"OK"
    assert (await promote(store, eid, now))[2] == b"promoted"
    return lease.attempt_id


# -- claiming -------------------------------------------------------------------------------------


async def test_claims_heads_in_priority_order_up_to_max_tasks(store: Store) -> None:
    prios = [0, 5, 1, 9, 0]
    eids = [
        await created(
            store, priority=str(pr), input_payload=f"in-{pr}".encode() + b"\x00\xff",
            payload_encoding="raw", execution_kind=f"kind-{i}", tags_json='{"app.k": "v"}',
        )
        for i, pr in enumerate(prios)
    ]  # fmt: skip
    ids = minted(3)
    got = rows(await batch_raw(store, 3, ids=ids))
    assert [r["execution_id"] for r in got] == [str(eids[3]), str(eids[1]), str(eids[2])]
    assert [(r["lease_id"], r["attempt_id"]) for r in got] == ids, "pairs used in order"
    for r, i in zip(got, (3, 1, 2), strict=True):
        assert r["payload"] == f"in-{prios[i]}".encode() + b"\x00\xff"
        assert (r["payload_encoding"], r["execution_kind"], r["namespace"]) == (
            "raw", f"kind-{i}", "ns",
        )  # fmt: skip
        assert (r["priority"], r["flow_id"], r["tags"]) == (str(prios[i]), "", {"app.k": "v"})
        assert (r["lease_epoch"], r["attempt_index"], r["attempt_type"], r["resumed"]) == (
            "1", "0", "initial", "0",
        )  # fmt: skip
        c = await check_invariants(store, eids[i])
        assert (c["lifecycle_phase"], c["current_lease_id"]) == ("active", r["lease_id"])
        assert int(c["lease_expires_at"]) == int(r["lease_expires_at"])
        assert c["current_worker_instance_id"] == INSTANCE
    for i in (0, 4):
        assert await lane_sets_of(store, eids[i]) == ["eligible"]
    rest = rows(await batch_raw(store, 5))
    assert [r["execution_id"] for r in rest] == [str(eids[0]), str(eids[4])], "oldest first"
    assert rows(await batch_raw(store, 2)) == [], "nothing left"


async def test_capability_mismatch_reported_and_not_claimed(store: Store) -> None:
    gpu = await created(store, priority="5", policy_json=caps_policy("gpu"))
    plain = await created(store)
    before = await snapshot(store, gpu)
    reply = await batch_raw(store, 2, caps="cpu")
    assert [r["execution_id"] for r in rows(reply)] == [str(plain)]
    assert reply[3] == [str(gpu).encode()]
    after = await snapshot(store, gpu)
    stamp = after["core"].pop(b"last_capability_mismatch_at")
    before["core"].pop(b"last_capability_mismatch_at", None)
    assert stamp != b"" and after == before, "only the mismatch stamp, as the grant writes"
    reply = await batch_raw(store, 2, caps="cpu,gpu")
    assert ([r["execution_id"] for r in rows(reply)], reply[3]) == ([str(gpu)], [])


async def test_resumed_execution_keeps_its_attempt(store: Store) -> None:
    eid = await created(store)
    attempt_id = await paused_and_promoted(store, eid)
    [r] = rows(await batch_raw(store, 1))
    assert (r["execution_id"], r["attempt_id"], r["attempt_index"]) == (str(eid), attempt_id, "0")
    assert (r["lease_epoch"], r["attempt_type"], r["resumed"]) == ("2", "initial", "1")
    c = await check_invariants(store, eid)
    assert (c["total_attempt_count"], c["current_lease_id"]) == ("1", r["lease_id"])
    attempt = await hash_of(store, ExecKeys(eid).attempt(0))
    assert attempt["attempt_state"] == "started" and attempt["resumed_at"] != ""
    assert attempt["lease_id"] == r["lease_id"]
    assert (await history_events(store, eid))[-1]["reason"] == "claim_resumed"


async def test_retry_attempt_gets_its_lineage(store: Store) -> None:
    policy = json.dumps({"retry_policy": {"max_retries": 3, "backoff": {"type": "fixed"}}})
    eid = await created(store, policy_json=policy)
    first = await claim(store, eid)
    reply = await fail(store, eid, first.fence, reason="flaky")
    assert (await promote(store, eid, int(reply[3])))[2] == b"promoted"
    [r] = rows(await batch_raw(store, 1))
    assert (r["attempt_index"], r["attempt_type"], r["lease_epoch"]) == ("1", "retry", "2")
    attempt = await hash_of(store, ExecKeys(eid).attempt(1))
    assert (attempt["retry_reason"], attempt["previous_attempt_index"]) == ("flaky", "0")
    await check_invariants(store, eid)


async def test_skips_what_it_cannot_claim_and_writes_nothing_for_it(store: Store) -> None:
    granted = await created(store, priority="9")
    assert (await issue_grant(store, granted, worker="w2", instance="w2-i1"))[1] == b"OK"
    before = await snapshot(store, granted, ("w2-i1",))
    ghost = new_eid()  # an index entry whose core is gone
    await store.call(
        "ZADD", PartitionKeys(ghost.tag).lane(LANE, "eligible"), -(9 * 10**12), str(ghost)
    )
    leased = await created(store, priority="8")
    await store.call("HSET", ExecKeys(leased).core, "ownership_state", "leased")
    free = await created(store)
    got = rows(await batch_raw(store, 2))
    assert [r["execution_id"] for r in got] == [str(free)]
    assert await snapshot(store, granted, ("w2-i1",)) == before
    assert await lane_sets_of(store, leased) == ["eligible"]
    assert await store.call("EXISTS", ExecKeys(leased).lease_current) == 0


async def test_max_scanned_bounds_the_walk(store: Store) -> None:
    for _ in range(3):
        blocked = await created(store, priority="9")
        assert (await issue_grant(store, blocked, worker="w2", instance="w2-i1"))[1] == b"OK"
    free = await created(store)
    assert rows(await batch_raw(store, 1, scan=3)) == []
    assert [r["execution_id"] for r in rows(await batch_raw(store, 1, scan=4))] == [str(free)]


async def test_other_lanes_and_partitions_untouched(store: Store) -> None:
    elsewhere = ExecutionId(3, str(uuid.uuid4()))
    assert (await create(store, elsewhere))[1] == b"OK"
    mine = await created(store)
    got = rows(await batch_raw(store, 4))
    assert [r["execution_id"] for r in got] == [str(mine)]
    assert await lane_sets_of(store, elsewhere) == ["eligible"]
    assert rows(await batch_raw(store, 4, keys=batch_keys(lane="other"), lane_id="other")) == []


# -- same records as grant + claim ----------------------------------------------------------------

VOLATILE = {
    "created_at", "started_at", "acquired_at", "expires_at", "last_renewed_at",
    "renewal_deadline", "last_transition_at", "last_mutation_at", "lease_acquired_at",
    "lease_expires_at", "lease_last_renewed_at", "lease_renewal_deadline", "resumed_at", "ts",
    "attempt_timeout_at",
}  # fmt: skip


def normalised(h: dict[str, str], eid: ExecutionId, lease_id: str, attempt_id: str) -> dict:
    names = {str(eid): "<eid>", lease_id: "<lease>", attempt_id: "<attempt>"}
    return {k: names.get(v, v) for k, v in h.items() if k not in VOLATILE}


async def records(store: Store, eid: ExecutionId) -> dict:
    c = await core_of(store, eid)
    lease, attempt = c["current_lease_id"], c["current_attempt_id"]
    k, p = ExecKeys(eid), PartitionKeys(eid.tag)
    idx = int(c["current_attempt_index"])
    out = {
        "core": normalised(c, eid, lease, attempt),
        "attempt": normalised(await hash_of(store, k.attempt(idx)), eid, lease, attempt),
        "usage": await hash_of(store, k.attempt_usage(idx)),
        "lease": normalised(await hash_of(store, k.lease_current), eid, lease, attempt),
        "history": [normalised(e, eid, lease, attempt) for e in await history_events(store, eid)],
        "grant": await store.call("EXISTS", k.claim_grant),
        "lane_sets": await lane_sets_of(store, eid),
        "attempts": len(await store.call("ZRANGE", k.attempts, 0, -1)),
        "holder": await store.call("SISMEMBER", p.worker_leases(INSTANCE), str(eid)),
    }
    for name in ("lease_expiry", "attempt_timeout", "execution_deadline"):
        out[name] = await store.call("ZSCORE", f"ff:idx:{eid.tag}:{name}", str(eid)) is not None
    return out


async def claim_through_grant(store: Store, eid: ExecutionId, resumed: bool) -> None:
    fn = Functions(store)
    who = Claimer(WORKER, INSTANCE, LANE, "", "caphash")
    await fn.scheduling.issue_claim_grant(eid, who, 10_000)
    if resumed:
        await fn.scheduling.claim_resumed_execution(eid, who, str(uuid.uuid4()), TTL)
    else:
        await fn.scheduling.claim_execution(eid, who, str(uuid.uuid4()), TTL, str(uuid.uuid4()))


@pytest.mark.parametrize("resumed", [False, True], ids=["new_attempt", "resumed"])
async def test_same_records_as_grant_and_claim(store: Store, resumed: bool) -> None:
    policy = json.dumps({"timeout_policy": {"attempt_timeout_ms": 60_000}})
    over = {"policy_json": policy, "tags_json": '{"app.x": "1"}', "input_payload": b"p"}
    single, batched = await created(store, **over), await created(store, **over)  # single first
    if resumed:
        await paused_and_promoted(store, single)
        await paused_and_promoted(store, batched)
        await store.call("DEL", ExecKeys(single).lease_history, ExecKeys(batched).lease_history)
    await claim_through_grant(store, single, resumed)
    [r] = rows(await batch_raw(store, 1))
    assert (r["execution_id"], r["resumed"]) == (str(batched), "1" if resumed else "0")
    assert await records(store, batched) == await records(store, single)
    assert (await records(store, single))["attempt_timeout"] is not resumed


async def test_wrapper_round_trip(store: Store) -> None:
    eid = await created(store, priority="3")
    fn = Functions(store)
    who = Claimer(WORKER, INSTANCE, LANE)
    reply = await fn.scheduling.claim_batch(PARTITION, who, TTL, minted(2), 10)
    [row] = reply.claimed
    assert row.execution_id == str(eid) and reply.mismatched == ()
    await check_invariants(store, eid)


# -- bad input ------------------------------------------------------------------------------------

BAD = [
    ({"lease_ttl_ms": "0"}, None, b"lease_ttl_ms must be 1..3600000, got: 0"),
    ({"renew_before_ms": "x"}, None, b"renew_before_ms must be a number, got: x"),
    ({"max_tasks": "0"}, None, b"max_tasks must be positive, got: 0"),
    ({"max_scanned": "1", "max_tasks": "2"}, None, b"max_scanned must be at least max_tasks"),
    ({"max_tasks": "3"}, None, b"expected max_tasks pairs of lease_id, attempt_id"),
    ({"max_reply_bytes": "-1"}, None, b"max_reply_bytes must be 0..268435456, got: -1"),
    ({"worker_id": ""}, None, b"worker_id must not be empty"),
    ({}, [("", "a")], b"lease_id must not be empty"),
    ({}, [("l", "")], b"attempt_id must not be empty"),
]


@pytest.mark.parametrize(("over", "ids", "detail"), BAD)
async def test_bad_input_changes_nothing(
    store: Store, over: dict, ids: list | None, detail: bytes
) -> None:
    eid = await created(store)
    before = await snapshot(store, eid)
    reply = await batch_raw(store, len(ids or [1, 2]), ids=ids or minted(2), **over)
    assert reply == [0, b"invalid_input", detail]
    assert await snapshot(store, eid) == before


async def test_keys_off_the_lane_or_tag_change_nothing(store: Store) -> None:
    eid = await created(store)
    before = await snapshot(store, eid)
    wrong_lane = await batch_raw(store, 1, keys=batch_keys(lane="other"))
    other_tag = [*batch_keys()[:3], PartitionKeys.of(PARTITION + 1).execution_deadline]
    if not store.cluster:  # a cross-slot call is refused by the cluster before it runs
        assert (await batch_raw(store, 1, keys=other_tag))[:2] == [0, b"invalid_input"]
    assert wrong_lane[:2] == [0, b"invalid_input"]
    assert await snapshot(store, eid) == before


async def test_invalid_worker_capabilities_change_nothing(store: Store) -> None:
    eid = await created(store)
    before = await snapshot(store, eid)
    many = ",".join(f"t{i:03d}" for i in range(257))
    assert await batch_raw(store, 1, caps=many) == [
        0, b"invalid_capabilities", b"worker:too_many_tokens",
    ]  # fmt: skip
    assert await snapshot(store, eid) == before
    with pytest.raises(FlowFabricError) as caught:
        await Functions(store).scheduling.claim_batch(
            PARTITION, Claimer(WORKER, INSTANCE, LANE, many), TTL, minted(1), 1
        )
    assert caught.value.code == "invalid_capabilities"


async def test_heads_with_budgets_or_a_quota_are_reported_not_leased(store: Store) -> None:
    budgeted = await created(
        store, priority="5", policy_json=json.dumps({"budget_ids": [str(uuid.uuid4())]})
    )
    quota = await created(store, priority="5", quota_policy_id=str(uuid.uuid4()))
    plain = await created(store)  # behind both in eligible order
    before = [await snapshot(store, e) for e in (budgeted, quota)]
    reply = await batch_raw(store, 1)
    # the attached heads do not count against max_tasks: the plain one behind them is leased
    assert [r["execution_id"] for r in rows(reply)] == [str(plain)]
    assert sorted(reply[5]) == sorted([str(budgeted).encode(), str(quota).encode()])
    assert [await snapshot(store, e) for e in (budgeted, quota)] == before, "nothing written"
    await check_invariants(store, budgeted)
