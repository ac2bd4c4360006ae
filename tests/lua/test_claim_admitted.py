"""ff_claim_admitted: the admitted heads ff_claim_batch reported for admission, leased in one
call, in the order given, each with the checks and writes of a batch-claimed head."""

from __future__ import annotations

import json
import uuid

import pytest

from flowfabric.server.valkey.functions import Claimer, Functions, scheduling
from flowfabric.server.valkey.functions.core import KeyCtx
from flowfabric.server.valkey.ids import ExecutionId
from flowfabric.server.valkey.keys import PartitionKeys
from flowfabric.server.valkey.store import Store
from tests.lua.test_claim_batch import PARTITION, TTL, batch_keys, caps_policy, created, rows
from tests.lua.util import (
    INSTANCE,
    LANE,
    WORKER,
    check_invariants,
    fcall,
    issue_grant,
    snapshot,
)  # fmt: skip


def triples(eids: list[ExecutionId]) -> list[tuple[str, str, str]]:
    return [(str(e), f"lease-{uuid.uuid4()}", f"attempt-{uuid.uuid4()}") for e in eids]


async def admitted_raw(
    store: Store, ts: list[tuple[str, str, str]], caps: str = "", **over: object
) -> list:
    args: dict[str, object] = {
        "worker_id": WORKER, "worker_instance_id": INSTANCE, "lane_id": LANE,
        "capability_hash": "caphash", "worker_capabilities_csv": caps,
        "lease_ttl_ms": str(TTL), "renew_before_ms": str(TTL * 2 // 3), "max_reply_bytes": "0",
    }  # fmt: skip
    assert not set(over) - set(args), over
    args.update(over)
    args["execution_lease_attempt_ids"] = [v for t in ts for v in t]
    ctx = KeyCtx(tag=PartitionKeys.of(PARTITION).tag, lane=LANE)
    return await fcall(store, scheduling.CLAIM_ADMITTED, ctx, args, keys=batch_keys())


def quota_attached() -> dict[str, str]:
    return {"quota_policy_id": str(uuid.uuid4())}


async def test_leases_the_admitted_heads_in_the_order_given(store: Store) -> None:
    a = await created(store, priority="1", **quota_attached())
    b = await created(store, priority="9", **quota_attached())
    c = await created(store, policy_json=json.dumps({"budget_ids": [str(uuid.uuid4())]}))
    ts = triples([a, c, b])
    reply = await admitted_raw(store, ts)
    got = rows(reply)
    assert [r["execution_id"] for r in got] == [str(a), str(c), str(b)], "the order given"
    assert [(r["lease_id"], r["attempt_id"]) for r in got] == [t[1:] for t in ts]
    assert reply[3] == [], "nothing refused"
    assert int(reply[4]) > 0, "the rows' cost"
    for eid, r in zip((a, c, b), got, strict=True):
        core = await check_invariants(store, eid)
        assert (core["lifecycle_phase"], core["current_lease_id"]) == ("active", r["lease_id"])


async def test_what_it_cannot_lease_is_refused_with_a_reason(store: Store) -> None:
    taken = await created(store, **quota_attached())
    await issue_grant(store, taken)  # somebody else's grant outstanding
    gpu = await created(store, policy_json=caps_policy("gpu"), **quota_attached())
    ok = await created(store, **quota_attached())
    missing = ExecutionId(PARTITION, str(uuid.uuid4()))
    before = await snapshot(store, taken)
    reply = await admitted_raw(store, triples([taken, gpu, missing, ok]), caps="cpu")
    assert [r["execution_id"] for r in rows(reply)] == [str(ok)]
    assert reply[3] == [
        str(taken).encode(), b"skipped", str(gpu).encode(), b"mismatch",
        str(missing).encode(), b"skipped",
    ]  # fmt: skip
    assert await snapshot(store, taken) == before


async def test_a_row_past_the_reply_cap_stops_the_call(store: Store) -> None:
    small = await created(store, **quota_attached())
    big = await created(store, input_payload=b"x" * 4000, **quota_attached())
    after = await created(store, **quota_attached())
    before = [await snapshot(store, e) for e in (big, after)]
    reply = await admitted_raw(store, triples([small, big, after]), max_reply_bytes="2000")
    assert [r["execution_id"] for r in rows(reply)] == [str(small)]
    assert reply[3] == [str(big).encode(), b"full", str(after).encode(), b"full"]
    assert [await snapshot(store, e) for e in (big, after)] == before


BAD = [
    ({"lease_ttl_ms": "0"}, b"lease_ttl_ms must be 1..3600000, got: 0"),
    ({"max_reply_bytes": "-1"}, b"max_reply_bytes must be 0..268435456, got: -1"),
    ({"worker_id": ""}, b"worker_id must not be empty"),
]


@pytest.mark.parametrize(("over", "detail"), BAD)
async def test_bad_input_changes_nothing(store: Store, over: dict, detail: bytes) -> None:
    eid = await created(store, **quota_attached())
    before = await snapshot(store, eid)
    assert await admitted_raw(store, triples([eid]), **over) == [0, b"invalid_input", detail]
    assert await snapshot(store, eid) == before


async def test_a_broken_triple_list_changes_nothing(store: Store) -> None:
    eid = await created(store, **quota_attached())
    before = await snapshot(store, eid)
    (t,) = triples([eid])
    for ts in ([], [(t[0], t[1])], [(t[0], "", t[2])]):
        reply = await admitted_raw(store, ts)  # type: ignore[arg-type]
        assert reply[:2] == [0, b"invalid_input"], reply
    assert await snapshot(store, eid) == before


async def test_wrapper_round_trip(store: Store) -> None:
    eid = await created(store, **quota_attached())
    reply = await Functions(store).scheduling.claim_admitted(
        PARTITION, Claimer(WORKER, INSTANCE, LANE), TTL, triples([eid])
    )
    [row] = reply.claimed
    assert row.execution_id == str(eid) and reply.refused == ()
    await check_invariants(store, eid)
