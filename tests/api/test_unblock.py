"""Event-driven unblock (docs/budgets.md#waking-blocked-work): a release, a budget reset or a
rolling rate window brings blocked work back without the unblock scanner.

Both topologies, a real Valkey; the `api` server runs no scanners at all, so whatever comes
back here came back through the unblocker. Waits poll with a generous deadline and assert that
it happened, never how fast.
"""

from __future__ import annotations

import asyncio
import uuid

from flowfabric.server.engine.admission import Block
from flowfabric.server.engine.budgets import BudgetResetter
from flowfabric.server.engine.quota_admission import QUOTA_REASON
from flowfabric.server.engine.unblock import Unblocker
from flowfabric.server.valkey.functions.waiters import Bucket
from flowfabric.server.valkey.ids import budget_partition, parse_execution_id, quota_partition
from flowfabric.server.valkey.keys import BudgetKeys, QuotaKeys
from flowfabric.v1 import budget_pb2 as bpb
from flowfabric.v1 import flow_pb2 as fpb
from flowfabric.v1 import types_pb2 as t
from tests.api.test_budget_admission import (
    PARTS,
    claimed,
    claimed_ids,
    spent_budget,
    with_budgets,
)
from tests.api.test_budgets import budgets, create_quota, eventually
from tests.api.test_flows import flows
from tests.api.test_lifecycle import claim_next, complete, create, get
from tests.conftest import Api


def unblocker(api: Api) -> Unblocker:
    assert api.server.unblocker is not None
    return api.server.unblocker


def quota_keys(qid: str) -> QuotaKeys:
    return QuotaKeys.of(quota_partition(qid, PARTS), qid)


def budget_keys(bid: str) -> BudgetKeys:
    return BudgetKeys.of(budget_partition(bid, PARTS), bid)


async def waiting(api: Api, index: str) -> list[str]:
    return [m.decode() for m in await api.store.call("ZRANGE", index, 0, -1)]


async def eligibility(api: Api, eid: str) -> int:
    return int((await get(api, eid)).state_vector.eligibility_state)


def eligible_now(api: Api, *eids: str) -> object:
    async def check() -> bool:
        states = [await eligibility(api, e) for e in eids]
        return all(s == t.ELIGIBILITY_STATE_ELIGIBLE_NOW for s in states)

    return check


async def test_a_release_hands_the_slot_to_a_waiting_long_poll(api: Api) -> None:
    qid, _ = await create_quota(api, window_seconds=60, max_concurrent=1)
    first = await create(api, quota_policy_id=qid)
    leases = await claimed(api)
    assert [lease.execution_id for lease in leases] == [first]
    second = await create(api, quota_policy_id=qid)
    assert await claimed_ids(api) == []
    assert await eligibility(api, second) == t.ELIGIBILITY_STATE_BLOCKED_BY_QUOTA
    assert await waiting(api, quota_keys(qid).waiters()) == [second], "registered on block"
    poll = asyncio.ensure_future(claim_next(api, "w-2", wait_ms=20_000))
    await asyncio.sleep(0.2)  # let the long poll find nothing and wait (no timing asserted)
    assert not poll.done()
    await complete(api, leases[0])
    reply = await asyncio.wait_for(poll, 30)
    assert reply.WhichOneof("outcome") == "task", "the long poll got the woken execution"
    assert reply.task.lease.execution_id == second
    assert await waiting(api, quota_keys(qid).waiters()) == []


async def test_a_budget_reset_wakes_every_waiter(api: Api) -> None:
    bid = await spent_budget(api)
    blocked = [await create(api, policy=with_budgets(bid)) for _ in range(3)]
    assert await claimed_ids(api) == []
    assert sorted(await waiting(api, budget_keys(bid).waiters)) == sorted(blocked)
    await budgets(api).ResetBudget(bpb.ResetBudgetRequest(budget_id=bid), metadata=api.metadata)
    await eventually(eligible_now(api, *blocked))  # type: ignore[arg-type]
    assert await waiting(api, budget_keys(bid).waiters) == []
    assert sorted(await claimed_ids(api)) == sorted(blocked)


async def test_each_rate_window_rolling_over_wakes_the_next(api: Api) -> None:
    qid, _ = await create_quota(api, window_seconds=1, max_requests_per_window=1)
    ids = [await create(api, quota_policy_id=qid) for _ in range(3)]
    got = await claimed_ids(api)
    assert len(got) == 1
    for _ in range(2):  # the second after one window, the third after the next
        rest = [e for e in ids if e not in got]
        for eid in rest:
            assert await eligibility(api, eid) == t.ELIGIBILITY_STATE_BLOCKED_BY_QUOTA

        async def one_more(want: int = len(ids) - len(rest) + 1) -> bool:
            got.extend(await claimed_ids(api))
            return len(got) == want

        await eventually(one_more)
    assert sorted(got) == sorted(ids)


async def test_a_release_before_the_registration_is_not_lost(api: Api) -> None:
    qid, _ = await create_quota(api, window_seconds=60, max_concurrent=1)
    first = await create(api, quota_policy_id=qid)
    assert await claimed_ids(api) == [first]
    second = await create(api, quota_policy_id=qid)
    assert await claimed_ids(api) == []
    keys = quota_keys(qid)
    # the race: the slot is freed (no wake: nobody is registered yet) before the registration
    await api.store.call("DEL", keys.waiters())
    await api.server.scheduler.functions.quota.release_admission(keys, first)  # type: ignore[union-attr]
    assert await eligibility(api, second) == t.ELIGIBILITY_STATE_BLOCKED_BY_QUOTA
    eid = parse_execution_id(second, api.server.config.flow_partitions)
    await unblocker(api).blocked(eid, Block(QUOTA_REASON, "quota: concurrency cap 1"))
    assert await eligibility(api, second) == t.ELIGIBILITY_STATE_ELIGIBLE_NOW, "at once"
    assert await waiting(api, keys.waiters()) == [], "it took itself out of the index"


async def test_a_budget_reset_before_the_registration_is_not_lost(api: Api) -> None:
    bid = await spent_budget(api)
    eid = await create(api, policy=with_budgets(bid))
    assert await claimed_ids(api) == []
    keys = budget_keys(bid)
    await api.store.call("DEL", keys.waiters)
    await api.store.call("HSET", keys.usage, "total_tokens", "0")  # as a reset leaves it
    e = parse_execution_id(eid, api.server.config.flow_partitions)
    await unblocker(api).blocked(e, Block("waiting_for_budget", "budget"))
    assert await eligibility(api, eid) == t.ELIGIBILITY_STATE_ELIGIBLE_NOW
    assert await waiting(api, keys.waiters) == []


async def test_taking_skips_entries_no_longer_blocked(api: Api) -> None:
    u = unblocker(api)
    qid, _ = await create_quota(api, window_seconds=60, max_concurrent=1)
    bucket = u.quota_bucket(qid)
    assert bucket is not None
    assert await u.wake(bucket, 1, QUOTA_REASON) == 0, "an empty index wakes nobody"
    holder = await create(api, quota_policy_id=qid)
    assert await claimed_ids(api) == [holder]
    blocked = await create(api, quota_policy_id=qid)
    assert await claimed_ids(api) == []
    plain = await create(api)  # eligible, never blocked
    fn = api.server.scheduler.functions  # type: ignore[union-attr]
    index = quota_keys(qid).waiters()
    await api.store.call("ZADD", index, 1, plain, 2, "not-an-execution-id", 3, holder)
    assert await waiting(api, index) == [plain, "not-an-execution-id", holder, blocked]
    assert await u.wake(bucket, 1, QUOTA_REASON) == 1
    assert await eligibility(api, blocked) == t.ELIGIBILITY_STATE_ELIGIBLE_NOW
    assert await eligibility(api, plain) == t.ELIGIBILITY_STATE_ELIGIBLE_NOW
    assert (await get(api, holder)).public_state == t.PUBLIC_STATE_ACTIVE, "untouched"
    assert await waiting(api, index) == []
    # unblocking what is no longer blocked is benign: nothing changes, nothing raised
    assert await u.wake(bucket, 1, QUOTA_REASON) == 0
    assert await fn.waiters.take(Bucket.quota(quota_keys(str(uuid.uuid4()))), 1) == ()


async def test_the_budget_reset_job_wakes_the_waiters_of_what_it_reset(api: Api) -> None:
    bid = await spent_budget(api, reset_interval_ms=3_600_000)
    eid = await create(api, policy=with_budgets(bid))
    assert await claimed_ids(api) == []
    keys = budget_keys(bid)
    await api.store.call("HSET", keys.definition, "next_reset_at", "1")  # due now
    await api.store.call("ZADD", keys.resets, 1, bid)
    fn = api.server.scheduler.functions  # type: ignore[union-attr]
    job = BudgetResetter(api.store, fn, PARTS, 60_000, unblocker(api).budget_reset)
    assert await job.run_cycle() == 1
    await eventually(eligible_now(api, eid))  # type: ignore[arg-type]
    assert await waiting(api, keys.waiters) == []


async def test_the_scanner_backstop_drops_the_entries_of_what_it_returns(engine_api: Api) -> None:
    api = engine_api
    bid = await spent_budget(api)
    eid = await create(api, policy=with_budgets(bid))
    assert await claimed_ids(api) == []
    keys = budget_keys(bid)
    assert await waiting(api, keys.waiters) == [eid]
    await api.store.call("HSET", keys.usage, "total_tokens", "0")  # cleared without an event

    async def returned() -> bool:
        eligible = await eligibility(api, eid) == t.ELIGIBILITY_STATE_ELIGIBLE_NOW
        return eligible and not await waiting(api, keys.waiters)

    await eventually(returned)


async def test_a_woken_flow_member_reaches_a_long_poll(api: Api) -> None:
    """A flow member lives on its flow's partition: the unblock's ready announcement (not the
    lane partition's state events) wakes the long poll."""
    bid = await spent_budget(api)
    fid = str(uuid.uuid4())
    lane = f"lane-unblock-{fid[:8]}"
    req = fpb.SubmitFlowRequest(
        flow_id=fid, flow_kind="dag", namespace="ns",
        members=[fpb.SubmitFlowRequest.Member(
            key="X", lane_id=lane, execution_kind="step", policy=with_budgets(bid),
        )],
    )  # fmt: skip
    reply = await flows(api).SubmitFlow(req, metadata=api.metadata)
    (eid,) = [m.execution_id for m in reply.submitted.members]

    async def blocked() -> bool:  # once a claim pass has found it (the ready hint or window)
        assert (await claim_next(api, lanes=(lane,))).WhichOneof("outcome") != "task"
        return await eligibility(api, eid) == t.ELIGIBILITY_STATE_BLOCKED_BY_BUDGET

    await eventually(blocked)
    poll = asyncio.ensure_future(claim_next(api, "w-2", lanes=(lane,), wait_ms=20_000))
    await asyncio.sleep(0.2)
    assert not poll.done()
    await budgets(api).ResetBudget(bpb.ResetBudgetRequest(budget_id=bid), metadata=api.metadata)
    got = await asyncio.wait_for(poll, 30)
    assert got.WhichOneof("outcome") == "task" and got.task.lease.execution_id == eid
