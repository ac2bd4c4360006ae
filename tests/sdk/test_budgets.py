"""Budgets and quota policies through the SDK (both topologies): create, read, list, report
with every outcome, dedup, reset, the sync client, submit and flow attachment, and a handler's
report with its hard-breach helper."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from flowfabric import (
    BudgetExceeded,
    Client,
    ExecutionState,
    FlowBuilder,
    InvalidArgument,
    InvalidFlow,
    NotFound,
    RetryPolicy,
    SyncClient,
    TaskContext,
    UsageOutcome,
    UsageReport,
    Worker,
)
from flowfabric.server.valkey.ids import parse_execution_id
from flowfabric.server.valkey.keys import ExecKeys
from flowfabric.v1 import types_pb2
from tests.api.test_budget_reservations import listening
from tests.conftest import API_TOKEN, Api
from tests.sdk.conftest import running
from tests.sdk.test_worker import attempt_field


async def test_create_read_and_idempotent_create(client: Client) -> None:
    created = await client.create_budget(
        dimensions={"total_tokens": (1000, 800), "custom:calls": 0},
        scope_type="tenant",
        scope_id="acme",
        reset_interval_ms=60_000,
        on_hard_limit="fail",
    )
    assert not created.existed
    assert str(uuid.UUID(created.budget_id)) == created.budget_id
    again = await client.create_budget(created.budget_id, dimensions={"other": 5})
    assert again.existed and again.budget_id == created.budget_id

    status = await client.budget(created.budget_id)
    assert status.budget_id == created.budget_id
    assert status.enforcement == "strict"
    assert status.hard_limits == {"total_tokens": 1000, "custom:calls": 0}
    assert status.soft_limits == {"total_tokens": 800, "custom:calls": 0}
    assert status.usage == {}
    assert (status.scope_type, status.scope_id, status.on_hard_limit) == ("tenant", "acme", "fail")
    assert status.reset_interval_ms == 60_000 and status.next_reset_at is not None
    assert status.created_at is not None and status.last_breach_at is None
    assert status.dimensions == ["custom:calls", "total_tokens"]
    assert status.remaining("total_tokens") == 1000 and status.remaining("custom:calls") is None
    assert not status.exhausted


async def test_report_outcomes_and_reset(client: Client) -> None:
    bid = (
        await client.create_budget(dimensions={"total_tokens": (100, 50)}, enforcement="advisory")
    ).budget_id
    ok = await client.report_usage(bid, total_tokens=40)
    assert ok == UsageReport(UsageOutcome.OK, bid) and ok.applied
    soft = await client.report_usage(bid, {"total_tokens": 20, "custom:x": 1})
    assert (soft.outcome, soft.dimension, soft.usage, soft.limit) == (
        UsageOutcome.SOFT_BREACH, "total_tokens", 60, 50,
    )  # fmt: skip
    assert soft.applied and not soft.hard_breach
    hard = await client.report_usage(bid, total_tokens=41)
    assert (hard.outcome, hard.dimension, hard.usage, hard.limit) == (
        UsageOutcome.HARD_BREACH, "total_tokens", 60, 100,
    )  # fmt: skip
    assert hard.hard_breach and not hard.applied
    with pytest.raises(BudgetExceeded) as raised:
        hard.raise_if_hard_breach()
    assert raised.value.message == "budget_exceeded"
    assert (raised.value.budget_id, raised.value.dimension, raised.value.limit) == (
        bid, "total_tokens", 100,
    )  # fmt: skip
    assert ok.raise_if_hard_breach() is ok

    status = await client.budget(bid)
    assert status.enforcement == "advisory"
    assert status.usage == {"total_tokens": 60, "custom:x": 1}
    assert (status.breach_count, status.soft_breach_count) == (1, 1)
    assert status.last_breach_dim == "total_tokens" and status.last_breach_at is not None
    assert status.remaining("total_tokens") == 40

    full = await client.report_usage(bid, total_tokens=40)  # reaching the limit is allowed
    assert full.applied and (await client.budget(bid)).exhausted

    assert await client.reset_budget(bid) is None  # no interval: no next reset
    after = await client.budget(bid)
    assert after.usage == {"total_tokens": 0, "custom:x": 0}
    assert after.reset_count == 1 and after.last_breach_dim is None and after.breach_count == 1


async def test_report_dedup_is_counted_once(client: Client) -> None:
    bid = (await client.create_budget(dimensions={"total_tokens": 0})).budget_id
    first = await client.report_usage(bid, dedup_key=f"{bid}:turn-1", total_tokens=7)
    repeat = await client.report_usage(bid, dedup_key=f"{bid}:turn-1", total_tokens=7)
    assert first.outcome is UsageOutcome.OK
    assert repeat.outcome is UsageOutcome.ALREADY_APPLIED and not repeat.applied
    assert (await client.budget(bid)).usage == {"total_tokens": 7}


async def test_bad_input_carries_the_servers_reason(client: Client) -> None:
    with pytest.raises(InvalidArgument) as bad_id:
        await client.create_budget("not-a-uuid", dimensions={"t": 1})
    assert bad_id.value.reason == "invalid_input"
    with pytest.raises(InvalidArgument) as too_many:
        await client.create_budget(dimensions={f"d{i}": 1 for i in range(65)})
    assert too_many.value.reason == "invalid_input" and "too_many_dimensions" in str(too_many.value)
    with pytest.raises(InvalidArgument):
        await client.create_budget(dimensions={"t": 1}, enforcement="loud")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument) as zero_window:
        await client.create_quota_policy(window_seconds=0, max_per_window=3)
    assert zero_window.value.reason == "invalid_input"
    missing = str(uuid.uuid4())
    with pytest.raises(NotFound) as nf:
        await client.budget(missing)
    assert nf.value.reason == "budget_not_found"
    with pytest.raises(NotFound):
        await client.report_usage(missing, total_tokens=1)
    with pytest.raises(NotFound):
        await client.reset_budget(missing)
    with pytest.raises(NotFound) as qnf:
        await client.quota_policy(missing)
    assert qnf.value.reason == "quota_policy_not_found"
    with pytest.raises(ValueError, match="given twice"):
        await client.report_usage(missing, {"t": 1}, t=2)
    with pytest.raises(TypeError, match="keyword-only"):
        await client.report_usage(missing, "turn-1", t=2)  # type: ignore[arg-type]


async def test_listings_page_through_everything(client: Client) -> None:
    ids = {(await client.create_budget(dimensions={"t": 1})).budget_id for _ in range(5)}
    listed = [b.budget_id async for b in client.budgets(page_size=2)]
    assert sorted(listed) == sorted(ids)
    qids = set()
    for _ in range(3):
        qids.add(
            (await client.create_quota_policy(window_seconds=60, max_concurrent=2)).quota_policy_id
        )
    assert sorted([q.quota_policy_id async for q in client.quota_policies(page_size=1)]) == sorted(
        qids
    )


async def test_quota_policy_create_and_read(client: Client) -> None:
    created = await client.create_quota_policy(
        window_seconds=60, max_per_window=10, max_concurrent=2, jitter_ms=50
    )
    assert not created.existed
    again = await client.create_quota_policy(created.quota_policy_id, window_seconds=1)
    assert again.existed
    policy = await client.quota_policy(created.quota_policy_id)
    assert (policy.window_seconds, policy.max_per_window, policy.max_concurrent) == (60, 10, 2)
    assert policy.jitter_ms == 50 and policy.current_concurrency == 0
    assert policy.created_at > 0 and policy.raw.quota_policy_id == created.quota_policy_id


async def test_submit_attaches_budgets_and_quota(client: Client, api: Api) -> None:
    bid = (await client.create_budget(dimensions={"t": 100})).budget_id
    other = (await client.create_budget(dimensions={"t": 100})).budget_id
    qid = (await client.create_quota_policy(window_seconds=60, max_concurrent=5)).quota_policy_id
    job = await client.submit(
        "llm", lane="budgets", budgets=[bid, other], quota=qid, policy=RetryPolicy(max_retries=1)
    )
    core = await _core(api, job.execution_id)
    assert core.get("budget_ids") == f"{bid},{other}"
    assert core.get("quota_policy_id") == qid
    # a given proto policy keeps its budgets; new ones are added once
    again = await client.submit(
        "llm", lane="budgets", budgets=[other, bid],
        policy=types_pb2.ExecutionPolicy(budget_ids=[bid]),
    )  # fmt: skip
    assert (await _core(api, again.execution_id)).get("budget_ids") == f"{bid},{other}"
    with pytest.raises(TypeError):
        await client.submit("llm", budgets=bid)  # one string is not a list


async def _core(api: Api, eid: str) -> dict[str, str]:
    """The execution's core record (read behind the server: the API does not echo the
    attachments back)."""
    key = ExecKeys(parse_execution_id(eid, 1 << 16)).core
    raw = await api.store.call("HGETALL", key)
    if isinstance(raw, dict):
        pairs = list(raw.items())
    else:
        pairs = list(zip(raw[::2], raw[1::2], strict=True))
    return {_text(k): _text(v) for k, v in pairs}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def test_flow_members_take_budgets(client: Client) -> None:
    bid = (await client.create_budget(dimensions={"t": 100})).budget_id
    f = client.flow()
    a = f.add("a", budgets=[bid])
    f.add("b", after=[a], policy={"max_replay_count": 2}, budgets=[bid])
    f.add("c", policy=RetryPolicy(max_retries=0), budgets=[bid])
    request = f.to_request()
    assert list(request.members[0].policy.budget_ids) == [bid]
    assert f'"budget_ids":["{bid}"]' in request.members[1].policy_json
    assert list(request.members[2].policy.budget_ids) == [bid]
    submitted = await f.submit()
    assert len(submitted.members) == 3 and not submitted.duplicate

    spec = {"members": [{"key": "a", "kind": "a", "budgets": [bid]}]}
    from_file = FlowBuilder.from_spec(spec).to_request()
    assert list(from_file.members[0].policy.budget_ids) == [bid]
    with pytest.raises(InvalidFlow):
        client.flow().add("a", budgets=bid)
    with pytest.raises(InvalidFlow) as not_object:
        g = client.flow()
        g.add("a", policy="[1]", budgets=[bid])
        g.to_request()
    assert not_object.value.reason == "invalid_policy_json"


async def test_flow_members_take_a_quota(client: Client) -> None:
    qid = (await client.create_quota_policy(window_seconds=60, max_concurrent=2)).quota_policy_id
    f = client.flow()
    f.add("a", quota=qid)
    f.add("b")
    request = f.to_request()
    assert [m.quota_policy_id for m in request.members] == [qid, ""]
    assert (await f.submit()).members
    spec = {"members": [{"key": "a", "kind": "a", "quota": qid}]}
    assert FlowBuilder.from_spec(spec).to_request().members[0].quota_policy_id == qid
    with pytest.raises(InvalidFlow):
        FlowBuilder.from_spec({"members": [{"key": "a", "kind": "a", "quota": 3}]})


async def test_handler_reports_and_fails_on_hard_breach(client: Client, api: Api) -> None:
    bid = (await client.create_budget(dimensions={"total_tokens": 100})).budget_id
    worker = Worker(api.address, token=API_TOKEN, lanes=["budget-handler"], concurrency=1)
    seen: list[UsageReport] = []

    @worker.handler("turn")
    async def turn(ctx: TaskContext) -> Any:
        tokens = ctx.json()["tokens"]
        report = await ctx.report_usage(
            bid, dedup_key=f"{bid}:{ctx.execution_id}", total_tokens=tokens
        )
        seen.append(report)
        report.raise_if_hard_breach()
        return {"used": tokens}

    async with running(worker):
        first = await client.submit("turn", {"tokens": 80}, lane="budget-handler")
        assert await client.wait(first.execution_id, timeout=30) is ExecutionState.COMPLETED
        second = await client.submit(
            "turn", {"tokens": 30}, lane="budget-handler", policy=RetryPolicy(max_retries=3)
        )
        assert await client.wait(second.execution_id, timeout=30) is ExecutionState.FAILED
    assert [r.outcome for r in seen] == [UsageOutcome.OK, UsageOutcome.HARD_BREACH]
    snap = await client.describe(second.execution_id)
    assert snap.total_attempt_count == 1  # non-retryable, whatever the retry policy allows
    assert await attempt_field(api.store, second.execution_id, 0, "failure_reason") == (
        "budget_exceeded"
    )
    assert (await client.budget(bid)).usage == {"total_tokens": 80}


def _blocking_session(address: str) -> None:
    with SyncClient(address, token=API_TOKEN) as sync:
        bid = sync.create_budget(dimensions={"total_tokens": (10, 5)}).budget_id
        assert sync.report_usage(bid, total_tokens=6).outcome is UsageOutcome.SOFT_BREACH
        assert sync.report_usage(bid, {"total_tokens": 5}).outcome is UsageOutcome.HARD_BREACH
        assert sync.budget(bid).usage == {"total_tokens": 6}
        assert bid in [b.budget_id for b in sync.budgets()]
        assert sync.reset_budget(bid) is None
        qid = sync.create_quota_policy(window_seconds=10, max_per_window=1).quota_policy_id
        assert sync.quota_policy(qid).max_per_window == 1
        assert qid in [q.quota_policy_id for q in sync.quota_policies()]


async def test_sync_client(api: Api) -> None:
    """Driven from a plain thread: the server runs on the test's event loop."""
    await asyncio.to_thread(_blocking_session, api.address)


async def test_cancel_running_cancels_every_handler_on_the_budget(client: Client, api: Api) -> None:
    """A hard breach of a `cancel_running` budget (docs/budgets.md#hard-limit-actions): the
    reporter's handler is cancelled from the report's answer, an idle one at its next renewal;
    both executions wait for the budget; a reset brings them back."""
    bid = (
        await client.create_budget(dimensions={"total_tokens": 100}, on_hard_limit="cancel_running")
    ).budget_id
    lane = f"cancel-{uuid.uuid4().hex[:8]}"
    worker = Worker(api.address, token=API_TOKEN, lanes=[lane], concurrency=2, lease_ttl_ms=1500)
    started: dict[str, asyncio.Event] = {"idle": asyncio.Event(), "spend": asyncio.Event()}
    cancelled: dict[str, asyncio.Event] = {"idle": asyncio.Event(), "spend": asyncio.Event()}
    reports: list[UsageReport] = []
    go = asyncio.Event()

    async def body(kind: str, ctx: TaskContext) -> Any:
        started[kind].set()
        try:
            if kind == "spend":
                await go.wait()
                for _ in range(3):
                    reports.append(await ctx.report_usage(bid, total_tokens=60))
            await asyncio.Event().wait()  # only a cancellation ends it
        except asyncio.CancelledError:
            cancelled[kind].set()
            raise

    @worker.handler("idle")
    async def idle(ctx: TaskContext) -> Any:
        return await body("idle", ctx)

    @worker.handler("spend")
    async def spend(ctx: TaskContext) -> Any:
        return await body("spend", ctx)

    async with running(worker):
        sleeper = await client.submit("idle", {}, lane=lane, budgets=[bid])
        spender = await client.submit("spend", {}, lane=lane, budgets=[bid])
        await listening(api, spender.execution_id)
        for kind in ("idle", "spend"):
            await asyncio.wait_for(started[kind].wait(), 30)
        assert (await client.budget(bid)).in_flight == 2
        go.set()
        await asyncio.wait_for(cancelled["spend"].wait(), 10)
        await asyncio.wait_for(cancelled["idle"].wait(), 10)  # its next renewal (0.5 s)
        # the refused report's answer cancelled the handler inside report_usage
        assert [r.outcome for r in reports] == [UsageOutcome.OK]
        assert (await client.budget(bid)).breach_count == 1
        for job in (sleeper, spender):
            assert await client.state(job.execution_id) is ExecutionState.RATE_LIMITED
            snap = await client.describe(job.execution_id)
            assert "cancel_running" in snap.blocking_detail
        assert (await client.budget(bid)).usage == {"total_tokens": 60}
        for kind in ("idle", "spend"):
            started[kind].clear()
        await client.reset_budget(bid)  # both come back (resumed on their attempts)
        for kind in ("idle", "spend"):
            await asyncio.wait_for(started[kind].wait(), 30)
