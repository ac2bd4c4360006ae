"""BudgetService: budgets and quota policies (docs/budgets.md).

Each RPC validates the request at the edge (ids, the dimension arrays, every bound), so bad
input is INVALID_ARGUMENT before anything reaches Valkey, then runs one function (or one read)
on the budget's `{b:M}` or the policy's `{q:K}` partition. Admission against a quota is the
scheduler's call, not an RPC of this service.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from flowfabric.server.api.servicers.base import ServerContext
from flowfabric.server.engine.budget_admission import cancel_running, lease_gone
from flowfabric.server.valkey import bounds, budget_reads
from flowfabric.server.valkey.errors import FlowFabricError, InvalidInput
from flowfabric.server.valkey.functions import Functions
from flowfabric.server.valkey.functions.budget import Limit, NewBudget
from flowfabric.server.valkey.functions.quota import NewQuotaPolicy
from flowfabric.server.valkey.ids import (
    budget_partition,
    parse_execution_id,
    parse_uuid,
    quota_partition,
)
from flowfabric.server.valkey.keys import BudgetKeys, QuotaKeys
from flowfabric.v1 import budget_pb2 as pb
from flowfabric.v1 import budget_pb2_grpc as rpc

ENFORCEMENT_MODES = ("", "strict", "advisory")
HARD_LIMIT_ACTIONS = (
    "", "fail", "suspend", "deny_child", "warn", "reroute_fallback", "close_scope", "block",
    "cancel_running",
)  # fmt: skip
SCOPE_TYPES = ("", "execution", "flow", "lane", "tenant")
LIST_DEFAULT = 100
# Usage fields that are not dimensions (docs/budgets.md#keys).
RESERVED_DIMENSIONS = frozenset({"breached_at", "_init"})


def _label(value: str, field: str) -> str:
    bounds.check_size(bounds.LABEL_BYTES, value, field)
    return value


def _one_of(value: str, allowed: Sequence[str], field: str) -> str:
    if value not in allowed:
        shown = ", ".join(a for a in allowed if a)
        raise InvalidInput(field, f"{field} must be one of {shown}, got: {value!r}")
    return value


def _dedup_id(value: str) -> str:
    """A raw dedup id: a label without whitespace or control bytes (it becomes part of a key)."""
    _label(value, "dedup_key")
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise InvalidInput("dedup_key", "dedup_key must not contain whitespace or control bytes")
    return value


def _dimensions(names: Sequence[str], field: str = "dimensions") -> list[str]:
    n = len(names)
    if n > bounds.BUDGET_DIMENSIONS.hi:
        raise InvalidInput(
            field, f"too_many_dimensions: limit={bounds.BUDGET_DIMENSIONS.hi}, got={n}"
        )
    seen: set[str] = set()
    for name in names:
        bounds.check_size(bounds.DIMENSION_BYTES, name, field)
        if name in RESERVED_DIMENSIONS:
            raise InvalidInput(field, f"{name!r} is reserved and cannot name a dimension")
        if name in seen:
            raise InvalidInput(field, f"duplicate dimension {name!r}")
        seen.add(name)
    return list(names)


def _parallel(names: Sequence[str], values: Sequence[int], field: str, code: str) -> list[int]:
    if len(values) != len(names):
        raise InvalidInput(field, f"{code}: dimensions={len(names)} {field}={len(values)}")
    for v in values:
        bounds.check(bounds.BUDGET_AMOUNT, v, field)
    return list(values)


def _reserve(estimates: Mapping[str, int], dims: Sequence[str], hard: Sequence[int]) -> list[int]:
    """The per-dimension estimates, parallel to `dims` (docs/budgets.md#reservations)."""
    limit_of = dict(zip(dims, hard, strict=True))
    for name in sorted(estimates):
        value = estimates[name]
        if name not in limit_of:
            raise InvalidInput("reserve", f"reserve names {name!r}, which is not a dimension")
        bounds.check(bounds.BUDGET_AMOUNT, value, "reserve")
        if value > 0 and limit_of[name] < value:
            raise InvalidInput(
                "reserve", f"reserve of {name!r} needs a hard limit of at least {value}"
            )
    return [estimates.get(d, 0) for d in dims]


def _page_size(value: int) -> int:
    if value > bounds.PAGE.hi:
        raise InvalidInput("page_size", f"page_size must be at most {bounds.PAGE.hi}")
    return value or LIST_DEFAULT


class BudgetServicer(rpc.BudgetServiceServicer):
    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx

    @property
    def fn(self) -> Functions:
        return self.ctx.functions

    def _budget(self, value: str) -> BudgetKeys:
        bid = parse_uuid(value, "budget_id")
        return BudgetKeys.of(budget_partition(bid, self.ctx.config.budget_partitions), bid)

    def _quota(self, value: str) -> QuotaKeys:
        qid = parse_uuid(value, "quota_policy_id")
        return QuotaKeys.of(quota_partition(qid, self.ctx.config.quota_partitions), qid)

    # -- budgets ------------------------------------------------------------------------------

    async def CreateBudget(
        self, request: pb.CreateBudgetRequest, context: Any
    ) -> pb.CreateBudgetResponse:
        keys = self._budget(request.budget_id)
        dims = _dimensions(request.dimensions)
        code = "dimension_limit_array_mismatch"
        hard = _parallel(dims, request.hard_limits, "hard_limits", code)
        soft = _parallel(dims, request.soft_limits, "soft_limits", code)
        reserve = _reserve(request.reserve, dims, hard)
        bounds.check(bounds.HORIZON_MS, request.reset_interval_ms, "reset_interval_ms")
        mode = _one_of(request.enforcement_mode, ENFORCEMENT_MODES, "enforcement_mode")
        new = NewBudget(
            budget_id=keys.budget_id,
            scope_type=_one_of(request.scope_type, SCOPE_TYPES, "scope_type"),
            scope_id=_label(request.scope_id, "scope_id"),
            enforcement_mode=mode,
            on_hard_limit=_one_of(request.on_hard_limit, HARD_LIMIT_ACTIONS, "on_hard_limit"),
            on_soft_limit=_label(request.on_soft_limit, "on_soft_limit"),
            reset_interval_ms=request.reset_interval_ms,
            limits=tuple(
                Limit(d, h, s, r) for d, h, s, r in zip(dims, hard, soft, reserve, strict=True)
            ),
        )
        made = await self.fn.budget.create_budget(keys, new)
        if made.created:
            return pb.CreateBudgetResponse(
                created=pb.CreateBudgetResponse.Created(budget_id=keys.budget_id)
            )
        return pb.CreateBudgetResponse(
            already_satisfied=pb.CreateBudgetResponse.AlreadySatisfied(budget_id=keys.budget_id)
        )

    async def GetBudgetStatus(
        self, request: pb.GetBudgetStatusRequest, context: Any
    ) -> pb.GetBudgetStatusResponse:
        keys = self._budget(request.budget_id)
        status = await budget_reads.budget_status(self.ctx.store, keys)
        if status is None:
            raise FlowFabricError("budget_not_found", message=f"no budget {keys.budget_id}")
        return pb.GetBudgetStatusResponse(status=status)

    async def ReportUsage(
        self, request: pb.ReportUsageRequest, context: Any
    ) -> pb.ReportUsageResponse:
        keys = self._budget(request.budget_id)
        dims = _dimensions(request.dimensions)
        deltas = _parallel(dims, request.deltas, "deltas", "dimension_delta_array_mismatch")
        dedup = _dedup_id(request.dedup_key) if request.HasField("dedup_key") else ""
        eid = ""
        if request.execution_id:
            eid = str(parse_execution_id(request.execution_id, self.ctx.config.flow_partitions))
        r = await self.fn.budget.report_usage(keys, dims, deltas, dedup, eid)
        R = pb.ReportUsageResponse
        if r.outcome == "soft_breach":
            return R(soft_breach=R.SoftBreach(
                dimension=r.dimension, current_usage=r.current_usage or 0,
                soft_limit=r.limit or 0,
            ))  # fmt: skip
        if r.outcome == "hard_breach":
            revoked: list[str] = []
            mine = False
            if r.on_hard_limit == "cancel_running":  # docs/budgets.md#hard-limit-actions
                detail = (
                    f"budget {keys.budget_id}: {r.dimension} hard limit breached "
                    "(cancel_running); waiting for a reset"
                )
                parts = self.ctx.config.flow_partitions
                revoked = await cancel_running(self.ctx.store, self.fn, keys, parts, detail)
                mine = bool(eid) and (
                    eid in revoked or await lease_gone(self.ctx.store, eid, parts)
                )
            return R(hard_breach=R.HardBreach(
                dimension=r.dimension, current_usage=r.current_usage or 0,
                hard_limit=r.limit or 0, on_hard_limit=r.on_hard_limit,
                revoked_leases=len(revoked), execution_revoked=mine,
            ))  # fmt: skip
        if r.outcome == "already_applied":
            return R(already_applied=R.AlreadyApplied())
        return R(ok=R.Ok())

    #: Called with the budget's keys after ResetBudget reset it (the server wires the
    #: unblocker's wake of its waiters: docs/budgets.md#waking-blocked-work).
    on_reset: Callable[[BudgetKeys], None] | None = None

    async def ResetBudget(
        self, request: pb.ResetBudgetRequest, context: Any
    ) -> pb.ResetBudgetResponse:
        keys = self._budget(request.budget_id)
        r = await self.fn.budget.reset_budget(keys)
        if self.on_reset is not None:
            self.on_reset(keys)
        return pb.ResetBudgetResponse(
            reset=pb.ResetBudgetResponse.Reset(next_reset_at=r.next_reset_at)
        )

    async def ListBudgets(
        self, request: pb.ListBudgetsRequest, context: Any
    ) -> pb.ListBudgetsResponse:
        size = _page_size(request.page_size)
        n = self.ctx.config.budget_partitions
        page = budget_reads.Page.parse(request.page_token, n) if request.page_token else None

        async def read(part: int, bid: str) -> Any:
            return await budget_reads.budget_status(self.ctx.store, BudgetKeys.of(part, bid))

        rows, nxt = await budget_reads.list_page(
            self.ctx.store, n, lambda p: BudgetKeys.of(p).policies, read, size, page
        )
        return pb.ListBudgetsResponse(budgets=rows, next_page_token=nxt.token() if nxt else "")

    # -- quota policies -----------------------------------------------------------------------

    async def CreateQuotaPolicy(
        self, request: pb.CreateQuotaPolicyRequest, context: Any
    ) -> pb.CreateQuotaPolicyResponse:
        keys = self._quota(request.quota_policy_id)
        window = bounds.check(bounds.QUOTA_WINDOW_S, request.window_seconds, "window_seconds")
        rate = bounds.check(
            bounds.QUOTA_LIMIT, request.max_requests_per_window, "max_requests_per_window"
        )
        cap = bounds.check(bounds.QUOTA_LIMIT, request.max_concurrent, "max_concurrent")
        jitter = bounds.check(bounds.QUOTA_JITTER_MS, request.jitter_ms, "jitter_ms")
        if window == 0 and (rate or cap):
            raise InvalidInput(
                "window_seconds", "window_seconds must be positive when a limit is set"
            )
        made = await self.fn.quota.create_quota_policy(
            keys, NewQuotaPolicy(keys.quota_policy_id, window, rate, cap, jitter)
        )
        R = pb.CreateQuotaPolicyResponse
        qid = keys.quota_policy_id
        if made.created:
            return R(created=R.Created(quota_policy_id=qid))
        return R(already_satisfied=R.AlreadySatisfied(quota_policy_id=qid))

    async def GetQuotaPolicy(
        self, request: pb.GetQuotaPolicyRequest, context: Any
    ) -> pb.GetQuotaPolicyResponse:
        keys = self._quota(request.quota_policy_id)
        policy = await budget_reads.quota_policy(self.ctx.store, keys)
        if policy is None:
            raise FlowFabricError(
                "quota_policy_not_found", message=f"no quota policy {keys.quota_policy_id}"
            )
        return pb.GetQuotaPolicyResponse(quota_policy=policy)

    async def ListQuotaPolicies(
        self, request: pb.ListQuotaPoliciesRequest, context: Any
    ) -> pb.ListQuotaPoliciesResponse:
        size = _page_size(request.page_size)
        n = self.ctx.config.quota_partitions
        page = budget_reads.Page.parse(request.page_token, n) if request.page_token else None

        async def read(part: int, qid: str) -> Any:
            return await budget_reads.quota_policy(self.ctx.store, QuotaKeys.of(part, qid))

        rows, nxt = await budget_reads.list_page(
            self.ctx.store, n, lambda p: QuotaKeys.of(p).policies, read, size, page
        )
        return pb.ListQuotaPoliciesResponse(
            quota_policies=rows, next_page_token=nxt.token() if nxt else ""
        )
