"""The client's BudgetService part: budgets (allowances over named dimensions) and quota
policies (admission pacing), docs/budgets.md.

`create_budget` and `create_quota_policy` mint the id before the first attempt, so a retry after
UNAVAILABLE answers "already existed" instead of creating twice. `report_usage` returns a
`UsageReport` whose outcome says whether the deltas were applied: breaches are outcomes, not
exceptions. Executions attach to budgets and a quota policy at submit
(`Client.submit(..., budgets=[...], quota=...)`).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncGenerator, Mapping
from typing import Literal

from flowfabric._models import (
    BudgetCreated,
    BudgetStatus,
    QuotaPolicy,
    QuotaPolicyCreated,
    UsageReport,
)
from flowfabric._transport import Connected, Transport, pages
from flowfabric.v1 import budget_pb2

Limits = Mapping[str, int | tuple[int, int]]
"""A budget's dimensions: name → hard limit, or name → (hard, soft); 0 = no limit."""
Enforcement = Literal["strict", "advisory"]
HardLimitAction = Literal[
    "",
    "fail",
    "block",
    "cancel_running",
    "suspend",
    "deny_child",
    "warn",
    "reroute_fallback",
    "close_scope",
]
"""`block` and `cancel_running` are acted on by the engine; the others are hints for the
reporting worker (docs/budgets.md#hard-limit-actions)."""
Scope = Literal["", "execution", "flow", "lane", "tenant"]


def _limits(dimensions: Limits) -> tuple[list[str], list[int], list[int]]:
    names, hard, soft = [], [], []
    for name, limit in dimensions.items():
        if isinstance(limit, tuple):
            if len(limit) != 2:
                raise ValueError(f"dimension {name!r}: give a hard limit or (hard, soft)")
            h, s = limit
        else:
            h, s = limit, 0
        names.append(name)
        hard.append(int(h))
        soft.append(int(s))
    return names, hard, soft


def usage_request(
    budget_id: str,
    usage: Mapping[str, int] | None,
    dedup_key: str | None,
    deltas: Mapping[str, int],
    execution_id: str = "",
) -> budget_pb2.ReportUsageRequest:
    """ReportUsage for `usage` (a mapping, for names that are not identifiers such as
    `custom:x`) and `deltas` (keywords) together; a name in both is refused."""
    if isinstance(usage, str | bytes) or not isinstance(usage, Mapping | None):
        raise TypeError("usage is a mapping of dimension -> delta (dedup_key is keyword-only)")
    merged = dict(usage or {})
    for name, delta in deltas.items():
        if name in merged:
            raise ValueError(f"dimension {name!r} given twice")
        merged[name] = delta
    request = budget_pb2.ReportUsageRequest(
        budget_id=budget_id,
        dimensions=list(merged),
        deltas=[int(d) for d in merged.values()],
        execution_id=execution_id,
    )
    if dedup_key is not None:
        request.dedup_key = dedup_key
    return request


async def report(transport: Transport, request: budget_pb2.ReportUsageRequest) -> UsageReport:
    """ReportUsage; retried on UNAVAILABLE only with a dedup key (without one a repeat could
    count twice)."""
    reply = await transport.unary(
        transport.budgets.ReportUsage, request, retry=request.HasField("dedup_key")
    )
    return UsageReport.from_proto(reply, request.budget_id)


class BudgetsMixin(Connected):
    """Budgets and quota policies (BudgetService)."""

    async def create_budget(
        self,
        budget_id: str | None = None,
        *,
        dimensions: Limits,
        enforcement: Enforcement = "strict",
        reset_interval_ms: int = 0,
        scope_type: Scope = "",
        scope_id: str = "",
        on_hard_limit: HardLimitAction = "",
        on_soft_limit: str = "",
        reserve: Mapping[str, int] | None = None,
    ) -> BudgetCreated:
        """Create a budget over `dimensions`, e.g. `{"total_tokens": 10_000}` (a hard limit)
        or `{"total_tokens": (10_000, 8_000)}` (hard, soft); 0 = no limit (still counted).

        Creating an existing id changes nothing and answers `existed=True` (the arguments of
        this call are ignored then).

        Args:
            budget_id: A lowercase UUID; default: a new one.
            dimensions: At most 64, any names (`total_tokens`, `custom:x`, ...).
            enforcement: `strict` (meant to stop work) or `advisory` (counted only).
            reset_interval_ms: Zero the usage this often; 0 = never.
            scope_type, scope_id: Descriptive labels (`tenant`, `acme`); nothing derives from
                them.
            on_hard_limit: What a hard breach does: `block` (nothing new starts until a
                reset), `cancel_running` (as `block`, and every running execution on the
                budget loses its lease; its handler is cancelled), or a hint for the reporting
                worker (`fail`, the default, `warn`, ...).
            on_soft_limit: A stored hint (`warn` by default).
            reserve: Estimate per dimension that every admitted execution holds until it is
                done, e.g. `{"total_tokens": 2_000}`: work starts only while usage plus what
                running work holds leaves room for it, so running work is never refused for
                lack of room within its estimate. Each name needs a hard limit at least as
                large (docs/budgets.md#reservations).

        Raises:
            InvalidArgument: `invalid_input` (a bad id, too many or duplicate dimensions, a
                limit out of bounds, an unknown mode or scope); ErrorInfo `field` names it.
        """
        names, hard, soft = _limits(dimensions)
        request = budget_pb2.CreateBudgetRequest(
            budget_id=budget_id or str(uuid.uuid4()),
            scope_type=scope_type,
            scope_id=scope_id,
            enforcement_mode=enforcement,
            on_hard_limit=on_hard_limit,
            on_soft_limit=on_soft_limit,
            reset_interval_ms=reset_interval_ms,
            dimensions=names,
            hard_limits=hard,
            soft_limits=soft,
            reserve=dict(reserve or {}),
        )
        reply = await self._transport.unary(self._transport.budgets.CreateBudget, request)
        existed = reply.WhichOneof("outcome") == "already_satisfied"
        body = reply.already_satisfied if existed else reply.created
        return BudgetCreated(body.budget_id or request.budget_id, existed)

    async def budget(self, budget_id: str) -> BudgetStatus:
        """The budget's definition, limits, usage and counters.

        Raises:
            NotFound: `budget_not_found`.
        """
        reply: budget_pb2.GetBudgetStatusResponse = await self._transport.unary(
            self._transport.budgets.GetBudgetStatus,
            budget_pb2.GetBudgetStatusRequest(budget_id=budget_id),
        )
        return BudgetStatus.from_proto(reply.status)

    async def budgets(self, *, page_size: int = 100) -> AsyncGenerator[BudgetStatus, None]:
        """Every budget, page by page (partition by partition, in id order within one)."""

        async def fetch(token: str) -> budget_pb2.ListBudgetsResponse:
            return await self._transport.unary(
                self._transport.budgets.ListBudgets,
                budget_pb2.ListBudgetsRequest(page_size=page_size, page_token=token),
            )

        async for reply in pages(fetch):
            for status in reply.budgets:
                yield BudgetStatus.from_proto(status)

    async def report_usage(
        self,
        budget_id: str,
        usage: Mapping[str, int] | None = None,
        /,
        *,
        dedup_key: str | None = None,
        **deltas: int,
    ) -> UsageReport:
        """Add usage to a budget, all or nothing: `report_usage(bid, total_tokens=120)`, or
        with a mapping for names that are not identifiers, `report_usage(bid, {"custom:x": 3})`.

        A report that would take any dimension past its hard limit is not applied
        (HARD_BREACH); one that passes a soft limit is applied and says so (SOFT_BREACH).

        Args:
            dedup_key: Makes the report safe to repeat for 24 h (a repeat answers
                ALREADY_APPLIED) and lets it be retried on UNAVAILABLE; without one it is not
                retried. Keys are shared by the budgets of one partition: make them
                budget-specific (e.g. prefixed with the budget id).

        Raises:
            NotFound: `budget_not_found`.
            InvalidArgument: `invalid_input` (a bad dimension name, a delta out of bounds).
        """
        return await report(self._transport, usage_request(budget_id, usage, dedup_key, deltas))

    async def reset_budget(self, budget_id: str) -> int | None:
        """Zero the budget's usage now (the breach counters stay cumulative). Not retried:
        each reset bumps `reset_count` and pushes the schedule.

        Returns:
            The next periodic reset (ms since the epoch), or None for a budget without one.

        Raises:
            NotFound: `budget_not_found`.
        """
        reply = await self._transport.unary(
            self._transport.budgets.ResetBudget,
            budget_pb2.ResetBudgetRequest(budget_id=budget_id),
            retry=False,
        )
        return reply.reset.next_reset_at or None

    async def create_quota_policy(
        self,
        policy_id: str | None = None,
        *,
        window_seconds: int,
        max_per_window: int = 0,
        max_concurrent: int = 0,
        jitter_ms: int = 0,
    ) -> QuotaPolicyCreated:
        """Create a quota policy: at most `max_per_window` admissions per sliding window of
        `window_seconds` (0 = no rate limit) and at most `max_concurrent` admitted at once
        (0 = no cap). An existing id changes nothing and answers `existed=True`.

        Raises:
            InvalidArgument: `invalid_input` (a bad id, a number out of bounds, a zero window
                with a limit).
        """
        request = budget_pb2.CreateQuotaPolicyRequest(
            quota_policy_id=policy_id or str(uuid.uuid4()),
            window_seconds=window_seconds,
            max_requests_per_window=max_per_window,
            max_concurrent=max_concurrent,
            jitter_ms=jitter_ms,
        )
        reply = await self._transport.unary(self._transport.budgets.CreateQuotaPolicy, request)
        existed = reply.WhichOneof("outcome") == "already_satisfied"
        body = reply.already_satisfied if existed else reply.created
        return QuotaPolicyCreated(body.quota_policy_id or request.quota_policy_id, existed)

    async def quota_policy(self, policy_id: str) -> QuotaPolicy:
        """The policy with its live concurrency and current-window admissions.

        Raises:
            NotFound: `quota_policy_not_found`.
        """
        reply: budget_pb2.GetQuotaPolicyResponse = await self._transport.unary(
            self._transport.budgets.GetQuotaPolicy,
            budget_pb2.GetQuotaPolicyRequest(quota_policy_id=policy_id),
        )
        return QuotaPolicy.from_proto(reply.quota_policy)

    async def quota_policies(self, *, page_size: int = 100) -> AsyncGenerator[QuotaPolicy, None]:
        """Every quota policy, page by page."""

        async def fetch(token: str) -> budget_pb2.ListQuotaPoliciesResponse:
            return await self._transport.unary(
                self._transport.budgets.ListQuotaPolicies,
                budget_pb2.ListQuotaPoliciesRequest(page_size=page_size, page_token=token),
            )

        async for reply in pages(fetch):
            for policy in reply.quota_policies:
                yield QuotaPolicy.from_proto(policy)
