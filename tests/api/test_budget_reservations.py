"""Budgets that cannot overshoot: reservations at admission, settled by reports and returned
when the lease ends, and the hard-limit actions `block` and `cancel_running`
(docs/budgets.md#reservations, docs/budgets.md#hard-limit-actions). Both topologies, a real
Valkey. The `api` fixture runs no scanners: every release here comes from the lease-end
announcement, and every wake from a reset.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import grpc
import pytest

from flowfabric.server.engine.budgets import BudgetReconciler
from flowfabric.server.valkey.ids import budget_partition, parse_execution_id
from flowfabric.server.valkey.keys import BudgetKeys, ExecKeys, PartitionKeys
from flowfabric.v1 import budget_pb2 as pb
from flowfabric.v1 import types_pb2 as t
from flowfabric.v1 import worker_pb2 as wpb
from tests.api.test_budget_admission import PARTS, claimed, with_budgets
from tests.api.test_budgets import budgets, create_budget, eventually, status
from tests.api.test_lifecycle import LANE, complete, create, get
from tests.api.util import expect_error, keyspace_dump
from tests.conftest import Api

C = grpc.StatusCode


def bkeys(bid: str) -> BudgetKeys:
    return BudgetKeys.of(budget_partition(bid, PARTS), bid)


async def charge(api: Api, bid: str, eid: str, tokens: int, dedup: str = "") -> Any:
    req = pb.ReportUsageRequest(
        budget_id=bid, dimensions=["total_tokens"], deltas=[tokens], execution_id=eid
    )
    if dedup:
        req.dedup_key = dedup
    return await budgets(api).ReportUsage(req, metadata=api.metadata)


async def vector(api: Api, eid: str) -> tuple[int, int]:
    info = await get(api, eid)
    return info.state_vector.eligibility_state, info.state_vector.blocking_reason


BLOCKED = (t.ELIGIBILITY_STATE_BLOCKED_BY_BUDGET, t.BLOCKING_REASON_WAITING_FOR_BUDGET)


async def listening(api: Api, eid: str) -> None:
    """Wait until the server hears `eid`'s partition's ready channel, where lease ends are
    announced (subscribed in the background at boot; one announced sooner would be lost)."""
    hub = api.server.hub
    assert hub is not None
    e = parse_execution_id(eid, api.server.config.flow_partitions)
    async with asyncio.timeout(10):
        await hub.wait_subscribed(PartitionKeys(e.tag).ready)


# -- no overshoot -------------------------------------------------------------------------------

#: Claimers working at once: enough to interleave admissions, reports and releases, few enough
#: that a 3-primary cluster on a shared box answers every call (no UNAVAILABLE).
CLAIMERS = 6


async def test_a_hundred_attempts_of_ten_never_pass_a_limit_of_five_hundred(api: Api) -> None:
    bid = await create_budget(api, hard=[500], soft=[0], reserve={"total_tokens": 10})
    eids = [await create(api, policy=with_budgets(bid)) for _ in range(100)]
    await listening(api, eids[0])
    outcomes: list[str] = []
    done: list[str] = []

    async def claimer(n: int) -> None:
        while True:
            leases = await claimed(api, instance=f"w-{n}")
            if not leases:
                return  # nothing eligible left: every head was admitted or blocked
            for lease in leases:
                r = await charge(api, bid, lease.execution_id, 10)
                outcomes.append(r.WhichOneof("outcome"))
                await complete(api, lease)
                done.append(lease.execution_id)

    await asyncio.gather(*(claimer(n) for n in range(CLAIMERS)))
    assert outcomes == ["ok"] * 50, "every admitted attempt's report fits: none is refused"
    assert len(done) == 50 and len(set(done)) == 50
    blocked = [e for e in eids if e not in done]
    for eid in blocked:
        assert await vector(api, eid) == BLOCKED
    s = await status(api, bid)
    assert s.usage["total_tokens"] == 500 and s.breach_count == 0
    await eventually(lambda: _settled(api, bid))


async def _settled(api: Api, bid: str) -> bool:
    s = await status(api, bid)
    return s.in_flight == 0 and dict(s.reserved) == {}


async def test_reservations_show_in_status_and_return_when_the_lease_ends(api: Api) -> None:
    bid = await create_budget(api, hard=[100], soft=[0], reserve={"total_tokens": 30})
    eids = [await create(api, policy=with_budgets(bid)) for _ in range(4)]
    await listening(api, eids[0])
    leases = await claimed(api)
    assert sorted(lease.execution_id for lease in leases) == sorted(eids[:3])
    assert await vector(api, eids[3]) == BLOCKED
    assert (await get(api, eids[3])).blocking_detail == (
        f"budget {bid}: total_tokens 0/100, 90 reserved, needs 30"
    )
    s = await status(api, bid)
    assert (dict(s.reserve), dict(s.reserved), s.in_flight) == (
        {"total_tokens": 30}, {"total_tokens": 90}, 3,
    )  # fmt: skip
    first = leases[0]
    assert (await charge(api, bid, first.execution_id, 5)).WhichOneof("outcome") == "ok"
    assert dict((await status(api, bid)).reserved) == {"total_tokens": 85}
    await complete(api, first)  # the 25 still held comes back, and wakes the waiter
    await eventually(lambda: _in_flight(api, bid, 2))
    s = await status(api, bid)
    assert dict(s.reserved) == {"total_tokens": 60} and s.usage["total_tokens"] == 5
    await eventually(lambda: _eligible(api, eids[3]))
    assert [lease.execution_id for lease in await claimed(api)] == [eids[3]]


async def _in_flight(api: Api, bid: str, n: int) -> bool:
    return (await status(api, bid)).in_flight == n


async def _eligible(api: Api, eid: str) -> bool:
    return (await get(api, eid)).state_vector.eligibility_state == (
        t.ELIGIBILITY_STATE_ELIGIBLE_NOW
    )


async def test_a_deduplicated_report_is_charged_and_settled_once(api: Api) -> None:
    bid = await create_budget(api, hard=[100], soft=[0], reserve={"total_tokens": 20})
    eid = await create(api, policy=with_budgets(bid))
    assert [lease.execution_id for lease in await claimed(api)] == [eid]
    for _ in range(3):
        await charge(api, bid, eid, 5, dedup=f"{bid}:{eid}:1")
    s = await status(api, bid)
    assert s.usage["total_tokens"] == 5 and dict(s.reserved) == {"total_tokens": 15}


async def test_a_failed_claim_after_admission_returns_the_reservation(api: Api) -> None:
    bid = await create_budget(api, hard=[100], soft=[0], reserve={"total_tokens": 40})
    eid = await create(api, policy=with_budgets(bid))
    assert api.server.scheduler is not None
    fn = api.server.scheduler.functions
    orig = fn.scheduling.claim_admitted

    async def refuse(*a: object, **k: object) -> object:
        from flowfabric.server.valkey.errors import FlowFabricError

        raise FlowFabricError("execution_not_leaseable")

    fn.scheduling.claim_admitted = refuse  # type: ignore[method-assign]
    try:
        with pytest.raises(grpc.aio.AioRpcError):
            await claimed(api)
    finally:
        fn.scheduling.claim_admitted = orig  # type: ignore[method-assign]
    s = await status(api, bid)
    assert s.in_flight == 0 and dict(s.reserved) == {}
    assert [lease.execution_id for lease in await claimed(api)] == [eid]


async def test_the_reconciler_releases_in_flight_work_that_has_no_lease(api: Api) -> None:
    bid = await create_budget(api, hard=[100], soft=[0], reserve={"total_tokens": 40})
    eid = await create(api, policy=with_budgets(bid))
    keys = bkeys(bid)
    assert api.server.scheduler is not None
    fn = api.server.scheduler.functions
    gone = f"{parse_execution_id(eid, api.server.config.flow_partitions).tag}:{uuid.uuid4()}"
    assert (await fn.budget.reserve_budget(keys, gone)).outcome == "admitted"  # a lost release
    assert [lease.execution_id for lease in await claimed(api)] == [eid]  # active: kept
    rec = BudgetReconciler(api.store, fn, PARTS, 1000, api.server.config.flow_partitions, 0)
    assert await rec.release_stale(keys) == 1
    s = await status(api, bid)
    assert s.in_flight == 1 and dict(s.reserved) == {"total_tokens": 40}
    assert await api.store.call("ZSCORE", keys.inflight, eid) is not None


# -- block --------------------------------------------------------------------------------------


async def test_block_holds_the_budgets_work_until_reset_while_the_lane_runs(api: Api) -> None:
    bid = await create_budget(api, hard=[100], soft=[0], on_hard_limit="block")
    running = await create(api, policy=with_budgets(bid))
    [lease] = await claimed(api)
    r = await charge(api, bid, running, 101)
    assert r.WhichOneof("outcome") == "hard_breach"
    assert (r.hard_breach.on_hard_limit, r.hard_breach.revoked_leases) == ("block", 0)
    held = [await create(api, policy=with_budgets(bid)) for _ in range(2)]
    free = await create(api)
    assert [x.execution_id for x in await claimed(api)] == [free], "the rest of the lane runs"
    for eid in held:
        assert await vector(api, eid) == BLOCKED
        assert "hard limit breached (block)" in (await get(api, eid)).blocking_detail
    assert (await get(api, running)).public_state == t.PUBLIC_STATE_ACTIVE, "running keeps on"
    await complete(api, lease)
    await budgets(api).ResetBudget(pb.ResetBudgetRequest(budget_id=bid), metadata=api.metadata)
    for eid in held:
        await eventually(lambda eid=eid: _eligible(api, eid))  # type: ignore[misc]
    assert sorted(x.execution_id for x in await claimed(api)) == sorted(held)


# -- cancel_running -----------------------------------------------------------------------------


async def test_cancel_running_revokes_every_lease_on_the_budget(api: Api) -> None:
    bid = await create_budget(api, hard=[100], soft=[0], on_hard_limit="cancel_running")
    mine = [await create(api, policy=with_budgets(bid)) for _ in range(3)]
    other = await create(api)
    await listening(api, other)
    leases = {x.execution_id: x for x in await claimed(api)}
    assert set(leases) == {*mine, other}
    assert (await charge(api, bid, mine[0], 90)).WhichOneof("outcome") == "ok"
    r = await charge(api, bid, mine[1], 20)
    assert r.WhichOneof("outcome") == "hard_breach"
    assert r.hard_breach.on_hard_limit == "cancel_running"
    assert r.hard_breach.revoked_leases == 3 and r.hard_breach.execution_revoked
    for eid in mine:  # revoked before ReportUsage answered
        assert await vector(api, eid) == BLOCKED
        e = parse_execution_id(eid, api.server.config.flow_partitions)
        lane = PartitionKeys(e.tag).lane(LANE, "blocked:budget")
        assert await api.store.call("ZSCORE", lane, eid) is not None
        assert await api.store.call("EXISTS", ExecKeys(e).lease_current) == 0
    assert (await get(api, other)).public_state == t.PUBLIC_STATE_ACTIVE
    renew = api.worker.RenewLease(
        wpb.RenewLeaseRequest(lease=leases[mine[2]], lease_ttl_ms=30_000), metadata=api.metadata
    )
    await expect_error(renew, C.FAILED_PRECONDITION, "execution_not_active")
    await eventually(lambda: _in_flight(api, bid, 0))
    late = await create(api, policy=with_budgets(bid))
    assert await claimed(api) == []
    assert await vector(api, late) == BLOCKED
    await budgets(api).ResetBudget(pb.ResetBudgetRequest(budget_id=bid), metadata=api.metadata)
    for eid in [*mine, late]:
        await eventually(lambda eid=eid: _eligible(api, eid))  # type: ignore[misc]
    again = await claimed(api)
    assert sorted(x.execution_id for x in again) == sorted([*mine, late])


async def test_soft_breaches_are_applied_and_shown_in_status(api: Api) -> None:
    bid = await create_budget(api, hard=[100], soft=[50], on_hard_limit="cancel_running")
    eid = await create(api, policy=with_budgets(bid))
    await claimed(api)
    r = await charge(api, bid, eid, 60)
    assert r.WhichOneof("outcome") == "soft_breach"
    s = await status(api, bid)
    assert (s.soft_breach_count, s.breach_count, s.usage["total_tokens"]) == (1, 0, 60)
    assert (await get(api, eid)).public_state == t.PUBLIC_STATE_ACTIVE, (
        "a soft breach stops nothing"
    )


# -- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"on_hard_limit": "explode"}, "on_hard_limit"),
        ({"reserve": {"total_tokens": -1}}, "reserve"),
        ({"reserve": {"total_tokens": 2**53}}, "reserve"),
        ({"reserve": {"custom:other": 1}}, "reserve"),
        ({"reserve": {"total_tokens": 101}}, "reserve"),
        ({"hard": [0], "reserve": {"total_tokens": 1}}, "reserve"),
    ],
)
async def test_bad_create_input_is_refused_naming_the_field(
    api: Api, kw: dict[str, Any], field: str
) -> None:
    before = await keyspace_dump(api.store)
    kw = {"hard": [100], **kw}  # the parameter dict is shared by both topologies
    req = pb.CreateBudgetRequest(
        budget_id=str(uuid.uuid4()), dimensions=["total_tokens"], soft_limits=[0],
        hard_limits=kw.pop("hard"), **kw,
    )  # fmt: skip
    info = await expect_error(
        budgets(api).CreateBudget(req, metadata=api.metadata), C.INVALID_ARGUMENT, "invalid_input"
    )
    assert info.metadata["field"] == field
    assert await keyspace_dump(api.store) == before


@pytest.mark.parametrize("eid", ["not-an-id", "{fp:99999}:00000000-0000-4000-8000-000000000000"])
async def test_a_bad_reporting_execution_is_refused(api: Api, eid: str) -> None:
    bid = await create_budget(api)
    before = await keyspace_dump(api.store)
    info = await expect_error(charge(api, bid, eid, 1), C.INVALID_ARGUMENT, "invalid_input")
    assert info.metadata["field"] == "execution_id"
    assert await keyspace_dump(api.store) == before
