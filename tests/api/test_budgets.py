"""BudgetService end to end over gRPC, both topologies (docs/budgets.md).

The `api` fixture runs no scanners; the scanner tests use `engine_api` (every job at 100 ms).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest

from flowfabric.server.valkey.functions.quota import QuotaFunctions
from flowfabric.server.valkey.ids import budget_partition, quota_partition
from flowfabric.server.valkey.keys import BudgetKeys, QuotaKeys
from flowfabric.v1 import budget_pb2 as pb
from flowfabric.v1 import budget_pb2_grpc
from tests.api.util import expect_error, keyspace_dump
from tests.conftest import Api

C = grpc.StatusCode
PARTS = 32


def budgets(api: Api) -> budget_pb2_grpc.BudgetServiceStub:
    return budget_pb2_grpc.BudgetServiceStub(api.channel)


async def create_budget(api: Api, **kw: Any) -> str:
    bid = kw.pop("budget_id", None) or str(uuid.uuid4())
    req = pb.CreateBudgetRequest(
        budget_id=bid, scope_type="flow", scope_id="f1", enforcement_mode="strict",
        dimensions=kw.pop("dimensions", ["total_tokens"]), hard_limits=kw.pop("hard", [100]),
        soft_limits=kw.pop("soft", [80]), **kw,
    )  # fmt: skip
    resp = await budgets(api).CreateBudget(req, metadata=api.metadata)
    assert resp.WhichOneof("outcome") == "created"
    return bid


async def report(
    api: Api, bid: str, dims: list[str], deltas: list[int], dedup: str | None = None
) -> pb.ReportUsageResponse:
    req = pb.ReportUsageRequest(budget_id=bid, dimensions=dims, deltas=deltas)
    if dedup is not None:
        req.dedup_key = dedup
    return await budgets(api).ReportUsage(req, metadata=api.metadata)


async def status(api: Api, bid: str) -> Any:
    req = pb.GetBudgetStatusRequest(budget_id=bid)
    return (await budgets(api).GetBudgetStatus(req, metadata=api.metadata)).status


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


# -- scenario 35 --------------------------------------------------------------------------------


async def test_budget_report_breach_status_and_reset(api: Api) -> None:
    bid = await create_budget(api, reset_interval_ms=3_600_000)
    r = await report(api, bid, ["total_tokens"], [60])
    assert r.WhichOneof("outcome") == "ok"
    r = await report(api, bid, ["total_tokens"], [25])
    assert r.WhichOneof("outcome") == "soft_breach"
    assert (r.soft_breach.dimension, r.soft_breach.current_usage, r.soft_breach.soft_limit) == (
        "total_tokens", 85, 80,
    )  # fmt: skip
    r = await report(api, bid, ["total_tokens"], [50])
    assert r.WhichOneof("outcome") == "hard_breach"
    assert (r.hard_breach.current_usage, r.hard_breach.hard_limit) == (85, 100)

    s = await status(api, bid)
    assert dict(s.usage) == {"total_tokens": 85}
    assert dict(s.hard_limits) == {"total_tokens": 100}
    assert dict(s.soft_limits) == {"total_tokens": 80}
    assert (s.breach_count, s.soft_breach_count) == (1, 1)
    assert s.last_breach_dim == "total_tokens" and s.HasField("last_breach_at")
    assert s.enforcement_mode == "strict" and s.scope_type == "flow"
    assert s.on_hard_limit == "fail" and s.on_soft_limit == "warn"
    assert s.HasField("created_at") and s.reset_interval_ms == 3_600_000

    before = int(time.time() * 1000)
    reset = await budgets(api).ResetBudget(
        pb.ResetBudgetRequest(budget_id=bid), metadata=api.metadata
    )
    assert abs(reset.reset.next_reset_at - (before + 3_600_000)) < 60_000
    s = await status(api, bid)
    assert dict(s.usage) == {"total_tokens": 0}
    assert not s.HasField("last_breach_at") and not s.HasField("last_breach_dim")
    assert s.reset_count == 1 and s.next_reset_at == reset.reset.next_reset_at
    assert s.breach_count == 1


async def test_multi_dimension_breach_applies_none_and_dedup_applies_once(api: Api) -> None:
    bid = await create_budget(api, dimensions=["tokens", "cost"], hard=[1000, 50], soft=[0, 0])
    r = await report(api, bid, ["tokens", "cost"], [100, 60])
    assert r.WhichOneof("outcome") == "hard_breach" and r.hard_breach.dimension == "cost"
    assert dict((await status(api, bid)).usage) == {}
    first = await report(api, bid, ["tokens"], [10], dedup=f"{bid}-turn-1")
    again = await report(api, bid, ["tokens"], [10], dedup=f"{bid}-turn-1")
    assert first.WhichOneof("outcome") == "ok"
    assert again.WhichOneof("outcome") == "already_applied"
    assert dict((await status(api, bid)).usage) == {"tokens": 10}
    tag = BudgetKeys.of(budget_partition(bid, PARTS)).tag
    assert await api.store.call("GET", f"ff:usagededup:{tag}:{bid}-turn-1") == b"1"


async def test_create_again_is_already_satisfied(api: Api) -> None:
    bid = await create_budget(api)
    req = pb.CreateBudgetRequest(budget_id=bid, dimensions=["x"], hard_limits=[1], soft_limits=[0])
    resp = await budgets(api).CreateBudget(req, metadata=api.metadata)
    assert resp.WhichOneof("outcome") == "already_satisfied"
    assert dict((await status(api, bid)).hard_limits) == {"total_tokens": 100}


async def test_unknown_budget_is_not_found(api: Api) -> None:
    bid = str(uuid.uuid4())
    stub = budgets(api)
    before = await keyspace_dump(api.store)
    md = api.metadata
    await expect_error(
        stub.GetBudgetStatus(pb.GetBudgetStatusRequest(budget_id=bid), metadata=md),
        C.NOT_FOUND, "budget_not_found",
    )  # fmt: skip
    await expect_error(report(api, bid, ["a"], [1], dedup="d"), C.NOT_FOUND, "budget_not_found")
    await expect_error(
        stub.ResetBudget(pb.ResetBudgetRequest(budget_id=bid), metadata=md),
        C.NOT_FOUND, "budget_not_found",
    )  # fmt: skip
    assert await keyspace_dump(api.store) == before


# -- bad input changes nothing ------------------------------------------------------------------

BAD_CREATES = [
    {"budget_id": "not-a-uuid"},
    {"dimensions": [f"d{i}" for i in range(65)], "hard_limits": [1] * 65, "soft_limits": [0] * 65},
    {"dimensions": ["a", "b"], "hard_limits": [1], "soft_limits": [0, 0]},
    {"dimensions": ["a"], "hard_limits": [1], "soft_limits": []},
    {"dimensions": ["a", "a"], "hard_limits": [1, 1], "soft_limits": [0, 0]},
    {"dimensions": [""], "hard_limits": [1], "soft_limits": [0]},
    {"dimensions": ["breached_at"], "hard_limits": [1], "soft_limits": [0]},
    {"dimensions": ["a"], "hard_limits": [1 << 60], "soft_limits": [0]},
    {"enforcement_mode": "sometimes"},
    {"on_hard_limit": "explode"},
    {"scope_type": "galaxy"},
    {"reset_interval_ms": 1 << 62},
    {"scope_id": "x" * 300},
]


@pytest.mark.parametrize("over", BAD_CREATES)
async def test_bad_create_is_invalid_and_writes_nothing(api: Api, over: dict[str, Any]) -> None:
    base: dict[str, Any] = {
        "budget_id": str(uuid.uuid4()), "dimensions": ["t"], "hard_limits": [1],
        "soft_limits": [0],
    }  # fmt: skip
    before = await keyspace_dump(api.store)
    req = pb.CreateBudgetRequest(**{**base, **over})
    await expect_error(
        budgets(api).CreateBudget(req, metadata=api.metadata), C.INVALID_ARGUMENT, "invalid_input"
    )
    assert await keyspace_dump(api.store) == before


async def test_too_many_dimensions_names_the_limit(api: Api) -> None:
    req = pb.CreateBudgetRequest(
        budget_id=str(uuid.uuid4()), dimensions=[f"d{i}" for i in range(65)],
        hard_limits=[1] * 65, soft_limits=[0] * 65,
    )  # fmt: skip
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await budgets(api).CreateBudget(req, metadata=api.metadata)
    assert "too_many_dimensions: limit=64, got=65" in (caught.value.details() or "")


@pytest.mark.parametrize(
    ("dims", "deltas", "dedup"),
    [
        (["a", "b"], [1], None),
        (["a", "a"], [1, 1], None),
        ([f"d{i}" for i in range(65)], [1] * 65, None),
        (["a"], [1 << 60], None),
        (["a"], [1], "has space"),
        (["a"], [1], "x" * 300),
    ],
)
async def test_bad_report_is_invalid_and_writes_nothing(
    api: Api, dims: list[str], deltas: list[int], dedup: str | None
) -> None:
    bid = await create_budget(api)
    before = await keyspace_dump(api.store)
    await expect_error(report(api, bid, dims, deltas, dedup), C.INVALID_ARGUMENT, "invalid_input")
    assert await keyspace_dump(api.store) == before


# -- quota policies -----------------------------------------------------------------------------


async def create_quota(api: Api, **kw: Any) -> tuple[str, pb.CreateQuotaPolicyResponse]:
    qid = kw.pop("quota_policy_id", None) or str(uuid.uuid4())
    req = pb.CreateQuotaPolicyRequest(quota_policy_id=qid, **kw)
    return qid, await budgets(api).CreateQuotaPolicy(req, metadata=api.metadata)


async def get_quota(api: Api, qid: str) -> Any:
    req = pb.GetQuotaPolicyRequest(quota_policy_id=qid)
    return (await budgets(api).GetQuotaPolicy(req, metadata=api.metadata)).quota_policy


async def test_quota_policy_create_and_get_shows_live_usage(api: Api) -> None:
    qid, resp = await create_quota(
        api, window_seconds=60, max_requests_per_window=10, max_concurrent=2, jitter_ms=100
    )
    assert resp.WhichOneof("outcome") == "created"
    q = await get_quota(api, qid)
    assert (q.window_seconds, q.max_requests_per_window, q.max_concurrent, q.jitter_ms) == (
        60, 10, 2, 100,
    )  # fmt: skip
    assert q.current_concurrency == 0 and q.current_window_requests == 0 and q.created_at > 0
    keys = QuotaKeys.of(quota_partition(qid, PARTS), qid)
    fn = QuotaFunctions(api.store)
    for _ in range(2):
        a = await fn.check_admission(
            keys, str(uuid.uuid4()), window_seconds=60, rate_limit=10, concurrency_cap=2
        )
        assert a.outcome == "admitted"
    q = await get_quota(api, qid)
    assert q.current_concurrency == 2 and q.current_window_requests == 2
    _, again = await create_quota(api, quota_policy_id=qid, window_seconds=1)
    assert again.WhichOneof("outcome") == "already_satisfied"
    assert (await get_quota(api, qid)).window_seconds == 60


async def test_unknown_quota_policy_is_not_found(api: Api) -> None:
    req = pb.GetQuotaPolicyRequest(quota_policy_id=str(uuid.uuid4()))
    await expect_error(
        budgets(api).GetQuotaPolicy(req, metadata=api.metadata),
        C.NOT_FOUND, "quota_policy_not_found",
    )  # fmt: skip


@pytest.mark.parametrize(
    "over",
    [
        {"quota_policy_id": "nope"},
        {"window_seconds": 0, "max_requests_per_window": 5},
        {"window_seconds": 0, "max_concurrent": 1},
        {"window_seconds": 1 << 40},
        {"window_seconds": 60, "max_concurrent": 1 << 40},
        {"window_seconds": 60, "jitter_ms": 1 << 40},
    ],
)
async def test_bad_quota_policy_is_invalid_and_writes_nothing(
    api: Api, over: dict[str, Any]
) -> None:
    before = await keyspace_dump(api.store)
    req = pb.CreateQuotaPolicyRequest(**{"quota_policy_id": str(uuid.uuid4()), **over})
    await expect_error(
        budgets(api).CreateQuotaPolicy(req, metadata=api.metadata),
        C.INVALID_ARGUMENT, "invalid_input",
    )  # fmt: skip
    assert await keyspace_dump(api.store) == before


# -- listings -----------------------------------------------------------------------------------


async def test_list_budgets_and_quota_policies_page_through_every_partition(api: Api) -> None:
    made = {await create_budget(api) for _ in range(7)}
    seen: list[str] = []
    token = ""
    while True:
        req = pb.ListBudgetsRequest(page_size=3, page_token=token)
        resp = await budgets(api).ListBudgets(req, metadata=api.metadata)
        assert len(resp.budgets) <= 3
        seen += [b.budget_id for b in resp.budgets]
        token = resp.next_page_token
        if not token:
            break
    assert sorted(seen) == sorted(made)

    qids = {(await create_quota(api, window_seconds=10, max_concurrent=1))[0] for _ in range(4)}
    resp = await budgets(api).ListQuotaPolicies(
        pb.ListQuotaPoliciesRequest(), metadata=api.metadata
    )
    assert {q.quota_policy_id for q in resp.quota_policies} == qids
    assert resp.next_page_token == ""


@pytest.mark.parametrize("req", [{"page_size": 1001}, {"page_token": "garbage"}])
async def test_list_refuses_bad_pages(api: Api, req: dict[str, Any]) -> None:
    await expect_error(
        budgets(api).ListBudgets(pb.ListBudgetsRequest(**req), metadata=api.metadata),
        C.INVALID_ARGUMENT, "invalid_input",
    )  # fmt: skip
    await expect_error(
        budgets(api).ListQuotaPolicies(pb.ListQuotaPoliciesRequest(**req), metadata=api.metadata),
        C.INVALID_ARGUMENT, "invalid_input",
    )  # fmt: skip


# -- scanners -----------------------------------------------------------------------------------


async def test_reset_scanner_resets_a_due_budget(engine_api: Api) -> None:
    api = engine_api
    bid = await create_budget(api, hard=[0], soft=[0], reset_interval_ms=1000)
    await report(api, bid, ["total_tokens"], [30])

    async def was_reset() -> bool:
        return (await status(api, bid)).reset_count >= 1

    await eventually(was_reset)
    s = await status(api, bid)
    assert dict(s.usage) == {"total_tokens": 0}
    keys = BudgetKeys.of(budget_partition(bid, PARTS), bid)
    score = float(await api.store.call("ZSCORE", keys.resets, bid))
    assert score == s.next_reset_at and score > time.time() * 1000


async def test_budget_reconciler_marks_and_keeps_unreadable(engine_api: Api) -> None:
    api = engine_api
    bid = await create_budget(api, hard=[10], soft=[0])
    keys = BudgetKeys.of(budget_partition(bid, PARTS), bid)
    await api.store.call("HSET", keys.usage, "total_tokens", "11")
    broken = BudgetKeys(keys.tag, str(uuid.uuid4()))
    await api.store.call("SADD", broken.policies, broken.budget_id)
    await api.store.call("SET", broken.definition, "not a hash")

    async def marked() -> bool:
        return bool(await api.store.call("HEXISTS", keys.usage, "breached_at"))

    await eventually(marked)
    assert await api.store.call("SISMEMBER", broken.policies, broken.budget_id) == 1


async def test_quota_reconciler_repairs_the_counter(engine_api: Api) -> None:
    api = engine_api
    qid, _ = await create_quota(api, window_seconds=60, max_concurrent=2)
    keys = QuotaKeys.of(quota_partition(qid, PARTS), qid)
    fn = QuotaFunctions(api.store)
    for _ in range(2):
        await fn.check_admission(
            keys, str(uuid.uuid4()), window_seconds=60, rate_limit=0, concurrency_cap=2
        )
    await api.store.call("SET", keys.concurrency, "5")

    async def repaired() -> bool:
        return (await get_quota(api, qid)).current_concurrency == 2

    await eventually(repaired)
    third = await fn.check_admission(
        keys, str(uuid.uuid4()), window_seconds=60, rate_limit=0, concurrency_cap=2
    )
    assert third.outcome == "concurrency_exceeded"
