"""Budgets and quotas gate claims (docs/lifecycle.md#admission, docs/budgets.md#admission).

Both topologies, a real Valkey. The `api` fixture runs no scanners; the unblock tests use
`engine_api` (every scanner at 100 ms). No assertion depends on speed.
"""

from __future__ import annotations

import json
import uuid

import grpc
import pytest

from flowfabric.server.engine.budget_admission import claim_pass, exhausted_budget
from flowfabric.server.valkey.functions import Claimer
from flowfabric.server.valkey.ids import (
    budget_partition,
    flow_partition,
    parse_execution_id,
    quota_partition,
    solo_partition,
)
from flowfabric.server.valkey.keys import BudgetKeys, ExecKeys, FlowKeys, PartitionKeys, QuotaKeys
from flowfabric.v1 import flow_pb2, flow_pb2_grpc
from flowfabric.v1 import types_pb2 as t
from tests.api.test_budgets import create_budget, create_quota, eventually, report
from tests.api.test_lifecycle import LANE, claim_for_worker, claim_next, complete, create, get
from tests.api.test_why import K, why
from tests.api.util import keyspace_dump
from tests.conftest import Api

PARTS = 32  # the default budget and quota partition counts


async def claimed(api: Api, **kw: object) -> list[t.LeaseHandle]:
    reply = await claim_next(api, max_tasks=16, **kw)  # type: ignore[arg-type]
    if reply.WhichOneof("outcome") == "batch":
        return [task.lease for task in reply.batch.tasks]
    if reply.WhichOneof("outcome") == "task":
        return [reply.task.lease]
    return []


async def claimed_ids(api: Api) -> list[str]:
    return [lease.execution_id for lease in await claimed(api)]


def with_budgets(*bids: str) -> t.ExecutionPolicy:
    return t.ExecutionPolicy(budget_ids=list(bids))


async def spent_budget(api: Api, **kw: object) -> str:
    """A budget whose total_tokens usage is at its hard limit of 100."""
    bid = await create_budget(api, hard=[100], soft=[0], **kw)
    keys = BudgetKeys.of(budget_partition(bid, PARTS), bid)
    await api.store.call("HSET", keys.usage, "total_tokens", "100")
    return bid


async def core(api: Api, eid: str, *fields: str) -> list[str]:
    e = parse_execution_id(eid, api.server.config.flow_partitions)
    raw = await api.store.call("HMGET", ExecKeys(e).core, *fields)
    return [(v or b"").decode() for v in raw]


async def test_work_without_budgets_keeps_the_one_call_claim(api: Api) -> None:
    eid = await create(api)
    e = parse_execution_id(eid, api.server.config.flow_partitions)
    assert api.server.scheduler is not None
    fn = api.server.scheduler.functions
    calls: list[str] = []
    orig = fn.scheduling.issue_claim_grant

    async def spy(*a: object, **k: object) -> object:
        calls.append("grant")
        return await orig(*a, **k)  # type: ignore[arg-type]

    fn.scheduling.issue_claim_grant = spy  # type: ignore[method-assign]
    try:
        assert await claimed_ids(api) == [eid]
    finally:
        fn.scheduling.issue_claim_grant = orig  # type: ignore[method-assign]
    assert calls == [], "no grant: leased by ff_claim_batch itself"
    assert await api.store.call("EXISTS", ExecKeys(e).claim_grant) == 0


async def test_the_batch_reports_attached_heads_without_leasing_them(api: Api) -> None:
    bid = await create_budget(api)
    plain = await create(api)
    attached = await create(api, policy=with_budgets(bid))
    assert api.server.scheduler is not None
    fn = api.server.scheduler.functions
    for eid in (plain, attached):
        part = parse_execution_id(eid, api.server.config.flow_partitions).partition
        who = Claimer("w", "w-1", LANE, "")
        ids = [(str(uuid.uuid4()), str(uuid.uuid4()))]
        reply = await fn.scheduling.claim_batch(part, who, 30_000, ids, 17)
        if eid == plain:
            assert [r.execution_id for r in reply.claimed] == [plain]
        else:
            assert reply.claimed == () and reply.needs_admission == (attached,)
            assert (await get(api, attached)).public_state == t.PUBLIC_STATE_WAITING


async def test_strict_budget_at_its_hard_limit_blocks_without_holding_the_lane(api: Api) -> None:
    bid = await spent_budget(api)
    blocked = await create(api, policy=with_budgets(bid))
    free = await create(api)
    assert await claimed_ids(api) == [free], "the same claim call leases the other execution"
    info = await get(api, blocked)
    assert info.state_vector.eligibility_state == t.ELIGIBILITY_STATE_BLOCKED_BY_BUDGET
    assert info.state_vector.blocking_reason == t.BLOCKING_REASON_WAITING_FOR_BUDGET
    assert info.blocking_detail == f"budget {bid}: total_tokens 100/100"
    e = parse_execution_id(blocked, api.server.config.flow_partitions)
    part = PartitionKeys(e.tag)
    assert await api.store.call("ZSCORE", part.lane(LANE, "blocked:budget"), blocked) is not None
    assert await api.store.call("EXISTS", ExecKeys(e).claim_grant) == 0


async def test_budget_with_headroom_admits(api: Api) -> None:
    bid = await create_budget(api)
    r = await report(api, bid, ["total_tokens"], [99])
    assert r.WhichOneof("outcome") in ("ok", "soft_breach")
    eid = await create(api, policy=with_budgets(bid, str(uuid.uuid4())))  # one dangling id
    assert await claimed_ids(api) == [eid]


async def test_advisory_budget_never_blocks(api: Api) -> None:
    bid = await create_budget(api, hard=[100], soft=[0])
    keys = BudgetKeys.of(budget_partition(bid, PARTS), bid)
    await api.store.call("HSET", keys.definition, "enforcement_mode", "advisory")
    await api.store.call("HSET", keys.usage, "total_tokens", "500")
    eid = await create(api, policy=with_budgets(bid))
    assert await claimed_ids(api) == [eid]


async def test_a_bad_budget_state_fails_the_claim_closed(api: Api) -> None:
    bid = await create_budget(api)
    keys = BudgetKeys.of(budget_partition(bid, PARTS), bid)
    await api.store.call("DEL", keys.limits)
    await api.store.call("SET", keys.limits, "not a hash")
    eid = await create(api, policy=with_budgets(bid))
    with pytest.raises(grpc.aio.AioRpcError):
        await claim_next(api, max_tasks=16)
    e = parse_execution_id(eid, api.server.config.flow_partitions)
    assert await api.store.call("EXISTS", ExecKeys(e).claim_grant) == 0
    info = await get(api, eid)
    assert info.public_state == t.PUBLIC_STATE_WAITING, "nothing leased, nothing blocked"
    assert info.state_vector.eligibility_state == t.ELIGIBILITY_STATE_ELIGIBLE_NOW


async def test_a_failed_check_hands_over_what_the_claim_already_leased(api: Api) -> None:
    # Fail closed for the head whose budget state cannot be read, not for the rest: the plain
    # execution the same batch leased is returned, not stranded until its lease expires.
    bid = await create_budget(api)
    keys = BudgetKeys.of(budget_partition(bid, PARTS), bid)
    await api.store.call("DEL", keys.limits)
    await api.store.call("SET", keys.limits, "not a hash")
    broken = await create(api, policy=with_budgets(bid))
    plain = await create(api)
    assert await claimed_ids(api) == [plain]
    e = parse_execution_id(broken, api.server.config.flow_partitions)
    assert await api.store.call("EXISTS", ExecKeys(e).claim_grant) == 0
    info = await get(api, broken)
    assert info.state_vector.eligibility_state == t.ELIGIBILITY_STATE_ELIGIBLE_NOW


async def test_an_unparsable_usage_fails_the_claim_closed(api: Api) -> None:
    bid = await create_budget(api)
    keys = BudgetKeys.of(budget_partition(bid, PARTS), bid)
    await api.store.call("HSET", keys.usage, "total_tokens", "lots")
    eid = await create(api, policy=with_budgets(bid))
    with pytest.raises(grpc.aio.AioRpcError):
        await claim_next(api, max_tasks=16)
    assert (await get(api, eid)).public_state == t.PUBLIC_STATE_WAITING


async def test_reset_budget_is_unblocked_and_claimed(engine_api: Api) -> None:
    api = engine_api
    bid = await spent_budget(api)
    eid = await create(api, policy=with_budgets(bid))
    assert await claimed_ids(api) == []
    info = await get(api, eid)
    assert info.state_vector.blocking_reason == t.BLOCKING_REASON_WAITING_FOR_BUDGET
    keys = BudgetKeys.of(budget_partition(bid, PARTS), bid)
    await api.store.call("HSET", keys.usage, "total_tokens", "0")  # as a reset leaves it

    async def eligible() -> bool:
        got = await get(api, eid)
        return bool(got.state_vector.eligibility_state == t.ELIGIBILITY_STATE_ELIGIBLE_NOW)

    await eventually(eligible)
    assert await claimed_ids(api) == [eid]


async def test_quota_rate_blocks_the_third_with_retry_at(api: Api) -> None:
    qid, _ = await create_quota(api, window_seconds=60, max_requests_per_window=2)
    ids = [await create(api, quota_policy_id=qid) for _ in range(3)]
    got = await claimed_ids(api)
    assert len(got) == 2 and set(got) < set(ids)
    (third,) = set(ids) - set(got)  # the last in eligible order (ties go by id)
    info = await get(api, third)
    assert info.state_vector.eligibility_state == t.ELIGIBILITY_STATE_BLOCKED_BY_QUOTA
    assert info.state_vector.blocking_reason == t.BLOCKING_REASON_WAITING_FOR_QUOTA
    prefix = f"quota {qid}: rate limit 2/2 per 60s window; retry_at "
    assert info.blocking_detail.startswith(prefix), info.blocking_detail
    retry_at = int(info.blocking_detail[len(prefix) :])
    assert retry_at > await api.store.time_ms()
    w = await why(api, third)
    assert w.kind == K.KIND_QUOTA_RATE and w.eta_at == retry_at == w.quota.retry_at


async def test_quota_without_limits_admits(api: Api) -> None:
    qid, _ = await create_quota(api, window_seconds=0)
    eid = await create(api, quota_policy_id=qid)
    assert await claimed_ids(api) == [eid]


async def test_concurrency_cap_blocks_until_the_first_completes(engine_api: Api) -> None:
    api = engine_api
    qid, _ = await create_quota(api, window_seconds=60, max_concurrent=1)
    first = await create(api, quota_policy_id=qid)
    leases = await claimed(api)
    assert [lease.execution_id for lease in leases] == [first]
    second = await create(api, quota_policy_id=qid)
    assert await claimed_ids(api) == []
    info = await get(api, second)
    assert info.state_vector.blocking_reason == t.BLOCKING_REASON_WAITING_FOR_QUOTA
    assert info.blocking_detail == f"quota {qid}: concurrency cap 1"
    keys = QuotaKeys.of(quota_partition(qid, PARTS), qid)
    assert await api.store.call("GET", keys.concurrency) == b"1"
    await complete(api, leases[0])

    async def released() -> bool:
        return bool(await api.store.call("GET", keys.concurrency) == b"0")

    await eventually(released)

    async def eligible() -> bool:
        got = await get(api, second)
        return bool(got.state_vector.eligibility_state == t.ELIGIBILITY_STATE_ELIGIBLE_NOW)

    await eventually(eligible)
    assert await claimed_ids(api) == [second]


async def test_a_failed_claim_after_admission_returns_the_quota_slot(api: Api) -> None:
    qid, _ = await create_quota(api, window_seconds=60, max_concurrent=1)
    eid = await create(api, quota_policy_id=qid)
    e = parse_execution_id(eid, api.server.config.flow_partitions)
    assert api.server.scheduler is not None
    fn = api.server.scheduler.functions
    orig = fn.scheduling.claim_admitted
    keys = QuotaKeys.of(quota_partition(qid, PARTS), qid)
    seen: list[bytes | None] = []

    async def stolen(*a: object, **k: object) -> object:
        # admitted by now; another worker takes a grant on the head before this claim leases it
        seen.append(await api.store.call("GET", keys.concurrency))
        await fn.scheduling.issue_claim_grant(e, Claimer("thief", "thief-1", LANE, ""), 60_000)
        return await orig(*a, **k)  # type: ignore[arg-type]

    fn.scheduling.claim_admitted = stolen  # type: ignore[method-assign]
    try:
        assert await claimed_ids(api) == []
    finally:
        fn.scheduling.claim_admitted = orig  # type: ignore[method-assign]
    assert seen == [b"1"]
    assert await api.store.call("GET", keys.concurrency) == b"0", "counter restored"
    assert await api.store.call("ZSCORE", keys.admitted, eid) is None, "slot refunded"
    assert await api.store.call("ZCARD", keys.window) == 0, "window entry refunded"


async def test_budget_verdicts_are_cached_for_one_claim_call(api: Api) -> None:
    bid = await spent_budget(api)
    keys = BudgetKeys.of(budget_partition(bid, PARTS), bid)
    detail = f"budget {bid}: total_tokens 100/100"
    with claim_pass():
        assert await exhausted_budget(api.store, PARTS, (bid,)) == detail
        await api.store.call("HSET", keys.usage, "total_tokens", "0")
        assert await exhausted_budget(api.store, PARTS, (bid,)) == detail, "read once per call"
    assert await exhausted_budget(api.store, PARTS, (bid,)) == "", "the next call reads again"


async def test_the_two_step_grant_passes_admission(api: Api) -> None:
    bid = await spent_budget(api)
    blocked = await create(api, policy=with_budgets(bid))
    granted = await claim_for_worker(api)
    assert granted.WhichOneof("outcome") == "no_work"
    info = await get(api, blocked)
    assert info.state_vector.blocking_reason == t.BLOCKING_REASON_WAITING_FOR_BUDGET
    free = await create(api)
    granted = await claim_for_worker(api)
    assert granted.WhichOneof("outcome") == "granted"
    assert granted.granted.execution_id == free


async def test_flow_members_pass_their_quota(api: Api) -> None:
    """A SubmitFlow member's `quota_policy_id` is checked at claim like CreateExecution's."""
    qid, _ = await create_quota(api, window_seconds=60, max_concurrent=1)
    fid = str(uuid.uuid4())
    parts = api.server.config.flow_partitions
    lane = next(
        f"q-{n}" for n in range(10_000)
        if solo_partition(f"q-{n}", parts) == flow_partition(fid, parts)
    )  # fmt: skip
    members = [
        flow_pb2.SubmitFlowRequest.Member(
            key=k, lane_id=lane, execution_kind="step", quota_policy_id=qid
        )
        for k in ("a", "b")
    ]
    reply = await flow_pb2_grpc.FlowServiceStub(api.channel).SubmitFlow(
        flow_pb2.SubmitFlowRequest(flow_id=fid, flow_kind="dag", namespace="ns", members=members),
        metadata=api.metadata,
    )
    ids = {m.key: m.execution_id for m in reply.submitted.members}
    assert await core(api, ids["a"], "quota_policy_id") == [qid]
    leased = await claimed(api, lanes=(lane,))
    assert len(leased) == 1
    other = ({"a", "b"} - {k for k, v in ids.items() if v == leased[0].execution_id}).pop()
    assert (await get(api, ids[other])).state_vector.blocking_reason == (
        t.BLOCKING_REASON_WAITING_FOR_QUOTA
    )


async def test_a_flow_member_quota_that_is_not_a_string_is_refused(api: Api) -> None:
    """The function checks the member field itself (for any FCALL caller, not only the RPC),
    and a refusal writes nothing."""
    fid = str(uuid.uuid4())
    p = flow_partition(fid, api.server.config.flow_partitions)
    tag = f"{{fp:{p}}}"
    fk = FlowKeys(tag, fid)
    members = [{"key": "a", "id": f"{tag}:{uuid.uuid4()}", "lane": "l", "kind": "k",
                "priority": 0, "quota": 7}]  # fmt: skip
    before = await keyspace_dump(api.store)
    reply = await api.store.call(
        "FCALL", "ff_submit_flow", 3, fk.core, fk.members, PartitionKeys.of(p).flow_index,
        fid, "dag", "ns", str(p), json.dumps(members), "[]", "", b"",
    )  # fmt: skip
    assert reply[:2] == [0, b"invalid_input"] and b"quota must be a string" in reply[2], reply
    assert await keyspace_dump(api.store) == before


async def test_why_names_the_exhausted_budget_and_its_next_reset(api: Api) -> None:
    bid = await spent_budget(api, reset_interval_ms=3_600_000)
    blocked = await create(api, policy=with_budgets(bid))
    assert await claimed_ids(api) == []
    w = await why(api, blocked)
    assert w.kind == K.KIND_BUDGET
    b = w.budget
    assert (b.budget_id, b.dimension, b.usage, b.limit) == (bid, "total_tokens", 100, 100)
    keys = BudgetKeys.of(budget_partition(bid, PARTS), bid)
    next_reset = int(await api.store.call("HGET", keys.definition, "next_reset_at"))
    assert b.next_reset_at == next_reset == w.eta_at


async def test_why_names_the_holders_of_a_full_concurrency_cap(api: Api) -> None:
    qid, _ = await create_quota(api, window_seconds=60, max_concurrent=1)
    first = await create(api, quota_policy_id=qid)
    assert await claimed_ids(api) == [first]
    second = await create(api, quota_policy_id=qid)
    assert await claimed_ids(api) == []
    w = await why(api, second)
    assert w.kind == K.KIND_QUOTA_CONCURRENCY and not w.HasField("eta_at")
    q = w.quota
    assert (q.quota_policy_id, q.concurrency_cap, q.holders_total, list(q.holders)) == (
        qid, 1, 1, [first],
    )  # fmt: skip
    assert "1 running hold its slots" in w.summary


async def test_a_claim_looks_past_a_run_of_blocked_heads(api: Api) -> None:
    spent, fine = await spent_budget(api), await create_budget(api, hard=[100], soft=[0])
    blocked = [await create(api, policy=with_budgets(spent)) for _ in range(40)]
    behind = await create(api, policy=with_budgets(fine))
    reply = await claim_next(api, max_tasks=1)
    assert reply.WhichOneof("outcome") in ("task", "batch"), "one call finds the head behind"
    got = reply.task if reply.WhichOneof("outcome") == "task" else reply.batch.tasks[0]
    assert got.lease.execution_id == behind
    for eid in blocked:
        info = await get(api, eid)
        assert info.state_vector.eligibility_state == t.ELIGIBILITY_STATE_BLOCKED_BY_BUDGET
