"""The budget admission check (docs/lifecycle.md#admission, docs/budgets.md#admission).

Budgets live on `{b:M}`, so the check is cross-slot and applies only to the heads that carry
`budget_ids` (`attached_only`): `ff_claim_batch` leases every other head itself and reports these
as `needs_admission`, so executions without budgets or quotas keep the one-call claim.

`BudgetCheck` reads each attached budget (definition, limits, usage: one pipeline per budget,
one slot). A strict budget whose usage has reached a non-zero hard limit on some dimension
blocks the claim (`waiting_for_budget`); an advisory budget never blocks; an id with no
definition has no limits. A read that fails or a stored number that does not parse fails the
claim (fail closed): nothing is leased on state the check cannot trust.

`exhausted_budget` is the same condition as a read only, for the unblock scanner.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

from flowfabric.server.engine.admission import (
    ADMIT,
    Block,
    Candidate,
    Verdict,
    stored_count,
    valid_id,
)
from flowfabric.server.valkey.codec import hash_to_dict
from flowfabric.server.valkey.functions import Claimer
from flowfabric.server.valkey.ids import budget_partition
from flowfabric.server.valkey.keys import BudgetKeys
from flowfabric.server.valkey.store import Store

BUDGET_REASON = "waiting_for_budget"


#: Budget verdicts of the claim call in progress (budget id -> block detail, "" = headroom),
#: set by `claim_pass`; errors are never cached.
_PASS: ContextVar[dict[str, str] | None] = ContextVar("budget_verdicts", default=None)


@contextlib.contextmanager
def claim_pass() -> Iterator[None]:
    """Cache budget verdicts for the duration of one claim call (the scheduler's `claim`)."""
    token = _PASS.set({})
    try:
        yield
    finally:
        _PASS.reset(token)


async def exhausted_budget(store: Store, partitions: int, budget_ids: tuple[str, ...]) -> str:
    """The block detail of the first attached strict budget at a hard limit, "" when every one
    has headroom. Raises FlowFabricError when a read fails or a stored number does not parse.
    Inside `claim_pass` each budget is read once per claim call."""
    cache = _PASS.get()
    for bid in budget_ids:
        if not valid_id(bid):
            continue  # names no budget: nothing to enforce
        if cache is not None and bid in cache:
            verdict = cache[bid]
        else:
            verdict = await _budget_verdict(store, partitions, bid)
            if cache is not None:
                cache[bid] = verdict
        if verdict:
            return verdict
    return ""


async def _budget_verdict(store: Store, partitions: int, bid: str) -> str:
    """The block detail of budget `bid` when strict and at a hard limit, else ""."""
    keys = BudgetKeys.of(budget_partition(bid, partitions), bid)
    pipe = store.pipeline()
    for k in (keys.definition, keys.limits, keys.usage):
        pipe.hgetall(k)
    d, limits, usage = (hash_to_dict(r) for r in await store.run_pipeline(pipe))
    if not d or (d.get("enforcement_mode") or "strict") == "advisory":
        return ""
    for field_name in sorted(limits):
        kind, _, dim = field_name.partition(":")
        if kind != "hard":
            continue
        limit = stored_count(f"budget {bid} limit {field_name}", limits[field_name])
        used = stored_count(f"budget {bid} usage {dim}", usage.get(dim, "0") or "0")
        if limit > 0 and used >= limit:
            return f"budget {bid}: {dim} {used}/{limit}"
    return ""


class BudgetCheck:
    """Strict budgets at a hard limit block the claim (see the module docstring)."""

    name = "budget"
    in_slot = False
    attached_only = True

    def __init__(self, store: Store, budget_partitions: int) -> None:
        self.store, self.partitions = store, budget_partitions

    async def check(self, candidate: Candidate, who: Claimer) -> Verdict:
        if not candidate.budget_ids:
            return ADMIT
        detail = await exhausted_budget(self.store, self.partitions, candidate.budget_ids)
        return Block(BUDGET_REASON, detail) if detail else ADMIT

    async def release(self, candidate: Candidate, who: Claimer) -> None:
        return None  # reserves nothing: usage is charged by the worker's reports
