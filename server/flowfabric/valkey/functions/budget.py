"""`lua/budget.lua`: create budgets, report usage against their limits, reset them, and the
budget reconciler's per-budget repair (docs/budgets.md)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from flowfabric.server.valkey.codec import Reply
from flowfabric.server.valkey.functions.core import (
    Decl,
    Key,
    KeyCtx,
    Outcome,
    arg,
    call,
    key,
    ok,
    opt,
    record,
    tail,
)
from flowfabric.server.valkey.keys import BudgetKeys
from flowfabric.server.valkey.store import Store


@dataclass(frozen=True)
class BudgetCreated:
    """`created` False: the budget already existed and nothing changed."""

    created: bool


@dataclass(frozen=True)
class UsageReport:
    """`outcome`: `ok`, `soft_breach` (applied; `current_usage` after), `hard_breach` (not
    applied; `current_usage` before) or `already_applied` (the dedup id was seen)."""

    outcome: str
    dimension: str = ""
    current_usage: int | None = None
    limit: int | None = None
    on_hard_limit: str = ""  # with a hard breach: the budget's action


@dataclass(frozen=True)
class BudgetReset:
    """`outcome` `reset`, or `not_due` for a scanner call another server got to first;
    `next_reset_at` 0 = not recurring."""

    outcome: str
    next_reset_at: int = 0


@dataclass(frozen=True)
class Limit:
    """One dimension of a new budget; 0 = no limit."""

    dimension: str
    hard: int = 0
    soft: int = 0
    reserve: int = 0  # estimate held per admitted execution (docs/budgets.md#reservations)


@dataclass(frozen=True)
class NewBudget:
    budget_id: str
    scope_type: str = ""
    scope_id: str = ""
    enforcement_mode: str = ""
    on_hard_limit: str = ""
    on_soft_limit: str = ""
    reset_interval_ms: int = 0
    limits: tuple[Limit, ...] = ()


def _b(attr: str) -> Key:
    return key(f"budget.{attr}", lambda c: str(getattr(c.budget, attr)))


def _dedup(c: KeyCtx) -> str:
    return c.budget.dedup(c.idempotency_key) if c.idempotency_key else c.budget.noop


CREATE: Decl[BudgetCreated] = Decl(
    "ff_create_budget",
    (_b("definition"), _b("limits"), _b("usage"), _b("resets"), _b("policies")),
    (arg("budget_id"), arg("scope_type"), arg("scope_id"), arg("enforcement_mode"),
     arg("on_hard_limit"), arg("on_soft_limit"), arg("reset_interval_ms", "int"), opt("now"),
     arg("dim_count", "int"), tail("dimensions_and_limits")),
    {"OK": lambda r: BudgetCreated(True), "ALREADY_SATISFIED": lambda r: BudgetCreated(False)},
)  # fmt: skip


def _report(reply: Reply) -> UsageReport:
    if reply.status == "ALREADY_SATISFIED":
        return UsageReport("already_applied")
    return record(UsageReport)(reply)


REPORT: Decl[UsageReport] = Decl(
    "ff_report_usage_and_check",
    (_b("definition"), _b("limits"), _b("usage"), key("budget.dedup_or_noop", _dedup),
     _b("reserved"), _b("holds")),
    (arg("budget_id"), opt("now"), arg("dedup_id"), arg("execution_id", default=""),
     arg("dim_count", "int"), tail("dimensions_and_deltas")),
    {"OK": _report, "ALREADY_SATISFIED": _report},
)  # fmt: skip
RESET: Decl[BudgetReset] = Decl(
    "ff_reset_budget",
    (_b("definition"), _b("usage"), _b("resets")),
    (arg("budget_id"), opt("now"), arg("only_if_due", "bool", False)),
    {"OK": record(BudgetReset), "ALREADY_SATISFIED": record(BudgetReset)},
)
RECONCILE: Decl[Outcome] = Decl(
    "ff_reconcile_budget",
    (_b("definition"), _b("limits"), _b("usage"), _b("policies")),
    (arg("budget_id"), opt("now")),
    ok(record(Outcome)),
)


@dataclass(frozen=True)
class Reservation:
    """`outcome`: `admitted`, `already_reserved`, `not_enforced` (no definition, or advisory)
    or `exhausted` (`detail` is the block detail)."""

    outcome: str
    detail: str = ""

    @property
    def admitted(self) -> bool:
        return self.outcome != "exhausted"


@dataclass(frozen=True)
class BudgetReleased:
    """`outcome` `released` (`freed` = the amount returned) or `not_held`."""

    outcome: str
    freed: int = 0


RESERVE: Decl[Reservation] = Decl(
    "ff_reserve_budget",
    (_b("definition"), _b("limits"), _b("usage"), _b("reserved"), _b("holds"), _b("inflight")),
    (arg("budget_id"), arg("execution_id"), opt("now"), arg("claim_token", default="")),
    {"OK": record(Reservation), "ALREADY_SATISFIED": record(Reservation)},
)
RELEASE: Decl[BudgetReleased] = Decl(
    "ff_release_budget",
    (_b("definition"), _b("reserved"), _b("holds"), _b("inflight")),
    (
        arg("budget_id"),
        arg("execution_id"),
        arg("claim_token", default=""),
        arg("match", default=""),
    ),
    {"OK": record(BudgetReleased), "ALREADY_SATISFIED": record(BudgetReleased)},
)

DECLS = (CREATE, REPORT, RESET, RECONCILE, RESERVE, RELEASE)


def budget_ctx(keys: BudgetKeys, dedup_id: str = "") -> KeyCtx:
    return KeyCtx(tag=keys.tag, budget_id=keys.budget_id, idempotency_key=dedup_id)


class BudgetFunctions:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def create_budget(self, keys: BudgetKeys, b: NewBudget) -> BudgetCreated:
        dims = [x.dimension for x in b.limits]
        amounts = [str(getattr(x, f)) for f in ("hard", "soft", "reserve") for x in b.limits]
        return await call(self.store, CREATE, budget_ctx(keys), {
            "budget_id": keys.budget_id, "scope_type": b.scope_type, "scope_id": b.scope_id,
            "enforcement_mode": b.enforcement_mode, "on_hard_limit": b.on_hard_limit,
            "on_soft_limit": b.on_soft_limit, "reset_interval_ms": b.reset_interval_ms,
            "now": None, "dim_count": len(dims), "dimensions_and_limits": dims + amounts,
        })  # fmt: skip

    async def report_usage(
        self,
        keys: BudgetKeys,
        dimensions: Sequence[str],
        deltas: Sequence[int],
        dedup_id: str,
        execution_id: str = "",
    ) -> UsageReport:
        """`dimensions` and `deltas` parallel (the caller checked); `execution_id` settles
        that execution's reservation (docs/budgets.md#reservations)."""
        return await call(self.store, REPORT, budget_ctx(keys, dedup_id), {
            "budget_id": keys.budget_id, "now": None, "dedup_id": dedup_id,
            "execution_id": execution_id,
            "dim_count": len(dimensions),
            "dimensions_and_deltas": list(dimensions) + [str(d) for d in deltas],
        })  # fmt: skip

    async def reset_budget(self, keys: BudgetKeys, *, only_if_due: bool = False) -> BudgetReset:
        values = {"budget_id": keys.budget_id, "now": None, "only_if_due": only_if_due}
        return await call(self.store, RESET, budget_ctx(keys), values)

    async def reserve_budget(
        self, keys: BudgetKeys, execution_id: str, claim_token: str = ""
    ) -> Reservation:
        values = {"budget_id": keys.budget_id, "execution_id": execution_id, "now": None,
                  "claim_token": claim_token}  # fmt: skip
        return await call(self.store, RESERVE, budget_ctx(keys), values)

    async def release_budget(
        self, keys: BudgetKeys, execution_id: str, claim_token: str = "", *, up_to: bool = False
    ) -> BudgetReleased:
        """`claim_token` "" releases whichever admission (the reconciler); else only the
        admission made under that token (a failed claim), or with `up_to` any admission whose
        token is at most that lease epoch (the lease ended)."""
        values = {"budget_id": keys.budget_id, "execution_id": execution_id,
                  "claim_token": claim_token, "match": "up_to" if up_to else ""}  # fmt: skip
        return await call(self.store, RELEASE, budget_ctx(keys), values)

    async def reconcile_budget(self, keys: BudgetKeys) -> Outcome:
        """`removed`, `skipped`, `marked`, `cleared` or `unchanged`."""
        values = {"budget_id": keys.budget_id, "now": None}
        return await call(self.store, RECONCILE, budget_ctx(keys), values)
