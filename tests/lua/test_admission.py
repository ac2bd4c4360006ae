"""ff_block_execution_for_admission and ff_unblock_execution
(docs/lifecycle.md#admission-blocks)."""

from __future__ import annotations

import pytest

from flowfabric.server.valkey.functions import admission
from flowfabric.server.valkey.ids import ExecutionId
from flowfabric.server.valkey.keys import ExecKeys, PartitionKeys
from flowfabric.server.valkey.store import Store
from tests.lua.util import LANE, create, ctx_of, fcall, new_eid


async def block(store: Store, eid: ExecutionId, reason: str, detail: str = "d") -> list:
    values = {"execution_id": str(eid), "blocking_reason": reason, "blocking_detail": detail}
    return await fcall(store, admission.BLOCK, ctx_of(eid), values)


async def unblock(store: Store, eid: ExecutionId, expected: str = "") -> list:
    values = {"execution_id": str(eid), "expected_blocking_reason": expected}
    return await fcall(store, admission.UNBLOCK, ctx_of(eid), values)


@pytest.mark.parametrize(
    ("reason", "eligibility", "index", "public"),
    [
        ("waiting_for_budget", b"blocked_by_budget", "blocked:budget", b"rate_limited"),
        ("waiting_for_quota", b"blocked_by_quota", "blocked:quota", b"rate_limited"),
        ("waiting_for_capable_worker", b"blocked_by_route", "blocked:route", b"waiting"),
        ("paused_by_policy", b"blocked_by_lane_state", "blocked:operator", b"waiting"),
    ],
)
async def test_block_then_unblock(
    store: Store, reason: str, eligibility: bytes, index: str, public: bytes
) -> None:
    eid = new_eid()
    await create(store, eid, priority="4")
    p, k = PartitionKeys(eid.tag), ExecKeys(eid)
    assert await block(store, eid, reason, "why") == [1, b"OK", b"blocked"]
    core = await store.call("HGETALL", k.core)
    assert core[b"eligibility_state"] == eligibility and core[b"public_state"] == public
    assert core[b"blocking_reason"] == reason.encode() and core[b"blocking_detail"] == b"why"
    assert await store.call("ZSCORE", p.lane(LANE, "eligible"), str(eid)) is None
    assert await store.call("ZSCORE", p.lane(LANE, index), str(eid)) is not None
    # a stale unblock (other expected reason) changes nothing
    stale = await unblock(store, eid, "waiting_for_something_else")
    assert stale[:2] == [0, b"execution_not_eligible"]
    assert await unblock(store, eid, reason) == [1, b"OK", b"unblocked"]
    core = await store.call("HGETALL", k.core)
    assert core[b"eligibility_state"] == b"eligible_now" and core[b"blocking_detail"] == b""
    assert core[b"public_state"] == b"waiting"
    score = await store.call("ZSCORE", p.lane(LANE, "eligible"), str(eid))
    assert int(score) == int(core[b"created_at"]) - 4 * 10**12
    assert await store.call("ZSCORE", p.lane(LANE, index), str(eid)) is None
    assert (await unblock(store, eid))[:2] == [0, b"execution_not_eligible"]


async def test_block_rejections(store: Store) -> None:
    eid = new_eid()
    assert await block(store, eid, "waiting_for_budget") == [0, b"execution_not_found"]
    await create(store, eid)
    assert await block(store, eid, "because") == [0, b"invalid_blocking_reason", b"because"]
    core = await store.call("HGET", ExecKeys(eid).core, "eligibility_state")
    assert core == b"eligible_now"
