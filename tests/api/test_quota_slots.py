"""A quota slot lives exactly as long as the lease (docs/budgets.md#slots): every path that ends
a lease frees it through the real server and functions, nothing else does, and a lost release
is freed by the quota reconciler once the grace has passed (docs/budgets.md#reconcilers).

Both topologies, a real Valkey. The `api` server runs no scanners; the releaser hears the
`admission_released` announcements on the ready channel. Waits poll with a deadline.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from flowfabric.server.engine import quota_reconciler
from flowfabric.server.engine.admission import ADMIT, SKIP, Candidate
from flowfabric.server.engine.quota_admission import QuotaCheck
from flowfabric.server.engine.quota_reconciler import QuotaReconciler
from flowfabric.server.valkey.functions import Claimer, Functions
from flowfabric.server.valkey.ids import parse_execution_id, quota_partition
from flowfabric.server.valkey.keys import PartitionKeys, QuotaKeys
from flowfabric.v1 import execution_pb2 as pb
from flowfabric.v1 import types_pb2 as t
from flowfabric.v1 import worker_pb2 as wpb
from tests.api.suspend_util import suspend
from tests.api.test_budget_admission import PARTS, claimed_ids
from tests.api.test_budgets import create_quota, eventually
from tests.api.test_lifecycle import (
    claim_next,
    claim_one,
    complete,
    create,
    fail,
    renew,
    retry_policy,
)
from tests.api.util import keyspace_dump
from tests.conftest import Api


def reconciler(api: Api) -> QuotaReconciler:
    return QuotaReconciler(api.store, Functions(api.store), PARTS, 0)


def quota_keys(qid: str, key: str = "") -> QuotaKeys:
    return QuotaKeys.of(quota_partition(qid, PARTS), qid, key)


async def holds(api: Api, qid: str, eid: str, key: str = "") -> bool:
    return await api.store.call("ZSCORE", quota_keys(qid, key).admitted, eid) is not None


async def slots(api: Api, qid: str, key: str = "") -> int:
    k = quota_keys(qid, key)
    n = int(await api.store.call("ZCARD", k.admitted))
    assert int(await api.store.call("GET", k.concurrency) or 0) == n, "counter follows the set"
    return n


async def freed(api: Api, qid: str, eid: str) -> None:
    async def gone() -> bool:
        return not await holds(api, qid, eid)

    await eventually(gone)
    assert await slots(api, qid) == 0


async def admitted_task(api: Api, qid: str, **fields: object) -> t.ClaimedTask:
    eid = await create(api, quota_policy_id=qid, **fields)
    assert api.server.hub is not None  # a server that just booted may not listen yet
    await api.server.hub.wait_subscribed(PartitionKeys(parse_execution_id(eid, 1 << 16).tag).ready)
    task = await claim_one(api)
    assert task.lease.execution_id == eid
    assert await holds(api, qid, eid)
    return task


async def quota(api: Api) -> str:
    qid, _ = await create_quota(api, window_seconds=1, max_concurrent=1)
    return qid


# -- every lease-ending path --------------------------------------------------------------------


async def _complete(api: Api, lease: t.LeaseHandle) -> None:
    await complete(api, lease)


async def _fail(api: Api, lease: t.LeaseHandle) -> None:
    await fail(api, lease)


async def _cancel(api: Api, lease: t.LeaseHandle) -> None:
    await api.execution.CancelExecution(
        pb.CancelExecutionRequest(execution_id=lease.execution_id), metadata=api.metadata
    )


async def _holder_cancel(api: Api, lease: t.LeaseHandle) -> None:
    await api.worker.CancelLeasedExecution(
        wpb.CancelLeasedExecutionRequest(lease=lease, reason="gave up"), metadata=api.metadata
    )


async def _suspend(api: Api, lease: t.LeaseHandle) -> None:
    reply = await suspend(api, lease, "go")
    assert reply.WhichOneof("outcome") == "suspended", reply


async def _delay(api: Api, lease: t.LeaseHandle) -> None:
    until = await api.store.time_ms() + 60_000
    await api.worker.DelayExecution(
        wpb.DelayExecutionRequest(lease=lease, delay_until=until), metadata=api.metadata
    )


async def _waiting_children(api: Api, lease: t.LeaseHandle) -> None:
    await api.worker.MoveToWaitingChildren(
        wpb.MoveToWaitingChildrenRequest(lease=lease), metadata=api.metadata
    )


ENDS: dict[str, Callable[[Api, t.LeaseHandle], Awaitable[None]]] = {
    "complete": _complete,
    "fail": _fail,
    "cancel": _cancel,
    "holder_cancel": _holder_cancel,
    "suspend": _suspend,
    "delay": _delay,
    "waiting_children": _waiting_children,
}


@pytest.mark.parametrize("path", sorted(ENDS))
async def test_each_lease_ending_path_frees_the_slot(api: Api, path: str) -> None:
    qid = await quota(api)
    task = await admitted_task(api, qid)
    waiting = await create(api, quota_policy_id=qid)
    assert await claimed_ids(api) == [], "the cap of 1 is held"
    await ENDS[path](api, task.lease)
    await freed(api, qid, task.lease.execution_id)
    assert await claimed_ids(api) == [waiting], "the freed slot admits the next"


async def test_a_retry_frees_the_slot_and_is_admitted_again(api: Api) -> None:
    qid = await quota(api)
    task = await admitted_task(api, qid, policy=retry_policy(max_retries=2))
    await fail(api, task.lease)  # retry scheduled: the lease ends
    await freed(api, qid, task.lease.execution_id)


async def test_expiry_by_deadline_frees_the_slot(engine_api: Api) -> None:
    api = engine_api
    qid = await quota(api)
    # 1.5 s: the deadline must not pass before the claim below on a loaded machine
    deadline = await api.store.time_ms() + 1500
    task = await admitted_task(api, qid, execution_deadline_at=deadline)
    await freed(api, qid, task.lease.execution_id)


async def test_too_many_reclaims_frees_the_slot(api: Api) -> None:
    qid = await quota(api)
    eid = await create(api, quota_policy_id=qid, policy=t.ExecutionPolicy(max_reclaim_count=1))
    await claim_one(api, "w-A", lease_ttl_ms=100)

    async def reclaimed(instance: str) -> bool:
        reply = await claim_next(api, instance, lease_ttl_ms=100)
        return reply.WhichOneof("outcome") == "task"

    await eventually(lambda: reclaimed("w-B"))
    assert await holds(api, qid, eid), "a reclaim keeps the admission"

    async def failed() -> bool:
        await claim_next(api, "w-C", lease_ttl_ms=100)
        return not await holds(api, qid, eid)

    await eventually(failed)
    assert await slots(api, qid) == 0


async def test_an_expired_or_revoked_lease_keeps_the_slot_for_its_reclaim(api: Api) -> None:
    qid = await quota(api)
    task = await admitted_task(api, qid)
    eid = task.lease.execution_id
    await api.execution.RevokeLease(pb.RevokeLeaseRequest(execution_id=eid), metadata=api.metadata)
    assert await holds(api, qid, eid), "revoked, awaiting its reclaim"
    assert not await reconciler(api).holds_slot("not-an-id")
    assert await reconciler(api).holds_slot(eid)
    again = await claim_one(api, "w-2")
    assert again.lease.execution_id == eid and again.attempt_type == t.ATTEMPT_TYPE_RECLAIM
    assert await slots(api, qid) == 1
    await complete(api, again.lease)
    await freed(api, qid, eid)


# -- time frees nothing -------------------------------------------------------------------------


async def test_a_job_running_longer_than_the_window_keeps_its_slot(api: Api) -> None:
    qid = await quota(api)  # a 1 s window, cap 1
    task = await admitted_task(api, qid)
    other = await create(api, quota_policy_id=qid)
    rec = reconciler(api)
    for _ in range(3):
        await eventually(_after(api, 700), within=5)
        assert (await renew(api, task.lease)).WhichOneof("outcome") == "renewed"
        await rec.run_cycle()
        assert await holds(api, qid, task.lease.execution_id)
        assert await claimed_ids(api) == [], "still at the cap after 2 s of 1 s windows"
    await complete(api, task.lease)
    await freed(api, qid, task.lease.execution_id)
    assert await claimed_ids(api) == [other]


def _after(api: Api, ms: int) -> Callable[[], Awaitable[bool]]:
    start: list[int] = []

    async def check() -> bool:
        now = await api.store.time_ms()
        start.append(start[0] if start else now)
        return now - start[0] >= ms

    return check


# -- a lost release -----------------------------------------------------------------------------


async def test_a_lost_release_is_freed_by_the_reconciler_after_the_grace(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    releaser = api.server.releaser
    assert releaser is not None

    async def lost(*args: object) -> None:  # the announcement never arrives
        return None

    monkeypatch.setattr(releaser, "_release", lost)
    qid = await quota(api)
    task = await admitted_task(api, qid)
    eid = task.lease.execution_id
    await complete(api, task.lease)
    rec = reconciler(api)
    await rec.run_cycle()
    assert await holds(api, qid, eid), "within the grace: kept"
    # the admission is older than the grace now
    aged = await api.store.time_ms() - quota_reconciler.GRACE_MS - 1
    await api.store.call("ZADD", quota_keys(qid).admitted, "XX", aged, eid)
    assert await rec.run_cycle() >= 1
    assert not await holds(api, qid, eid)
    assert await slots(api, qid) == 0


async def test_the_reconciler_keeps_live_leases_past_the_grace(api: Api) -> None:
    qid, _ = await create_quota(api, window_seconds=1, max_concurrent=3)
    task = await admitted_task(api, qid)
    eid = task.lease.execution_id
    aged = await api.store.time_ms() - quota_reconciler.GRACE_MS - 1
    await api.store.call("ZADD", quota_keys(qid).admitted, "XX", aged, eid)
    await api.store.call("SET", quota_keys(qid).concurrency, "3")  # drifted
    await reconciler(api).run_cycle()
    assert await holds(api, qid, eid)
    assert await slots(api, qid) == 1, "the counter is rebuilt from the live set"


# -- a repeat check -----------------------------------------------------------------------------


async def test_a_repeat_check_of_a_held_execution_skips_it(api: Api) -> None:
    """Another claim holds the execution's admission: the check leaves it (SKIP), records
    nothing, and the claim would move on to the next head (docs/budgets.md#slots)."""
    qid, _ = await create_quota(api, window_seconds=60, max_requests_per_window=5, max_concurrent=2)
    eid = await create(api, quota_policy_id=qid)
    fn = Functions(api.store)
    check = QuotaCheck(api.store, fn, PARTS)
    cand = Candidate(parse_execution_id(eid, 1 << 16), "L", quota_policy_id=qid)
    first, second = Claimer("w", "wi-1", "L"), Claimer("w", "wi-2", "L")
    assert await check.check(cand, first) == ADMIT
    before = await keyspace_dump(api.store)
    assert await check.check(cand, second) == SKIP
    await check.release(cand, second)  # its claim failed: it recorded nothing to refund
    assert await keyspace_dump(api.store) == before
    await check.release(cand, first)  # the admitting claim failed: refunded
    assert not await holds(api, qid, eid)
    assert await api.store.call("ZCARD", quota_keys(qid).window) == 0
