"""The budget admission check (docs/lifecycle.md#admission, docs/budgets.md#admission).

Budgets live on `{b:M}`, so the check is cross-slot and applies only to the heads that carry
`budget_ids` (`attached_only`): `ff_claim_batch` leases every other head itself and reports these
as `needs_admission`, so executions without budgets or quotas keep the one-call claim.

`BudgetCheck` admits through `ff_reserve_budget` on each attached budget's slot: a strict
budget refuses when usage has reached a non-zero hard limit, when usage plus the outstanding
reservations plus its estimate would pass it (docs/budgets.md#reservations), or after a hard
breach of a `block`/`cancel_running` budget until it is reset
(docs/budgets.md#hard-limit-actions); the execution then blocks `waiting_for_budget`. An
admission puts the execution in the budget's in-flight index and holds its estimate; `release`
(the claim failed, or a later check refused) and `BudgetReleaser` (the lease ended) give it
back. An advisory budget, or an id with no definition, admits and records nothing. A stored
number that does not parse, or a read that fails, fails the claim (fail closed).

`exhausted_budget` is the same condition as a read only, for the unblock scanner and the
unblocker's lost-wakeup check. `cancel_running` revokes the in-flight leases of a budget whose
hard limit was breached.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Callable, Iterator
from contextvars import ContextVar

from flowfabric.server.engine.admission import (
    ADMIT,
    SKIP,
    Block,
    Candidate,
    Verdict,
    each_bounded,
    stored_count,
    valid_id,
)
from flowfabric.server.engine.aio import TaskSet
from flowfabric.server.engine.ready import Released
from flowfabric.server.valkey.codec import hash_to_dict, text
from flowfabric.server.valkey.errors import FlowFabricError
from flowfabric.server.valkey.functions import Claimer, Functions
from flowfabric.server.valkey.functions.waiters import Bucket
from flowfabric.server.valkey.ids import budget_partition, parse_execution_id
from flowfabric.server.valkey.keys import BudgetKeys, ExecKeys
from flowfabric.server.valkey.store import Store

log = logging.getLogger("flowfabric.admission")

BUDGET_REASON = "waiting_for_budget"
#: Hard-limit actions under which a breach stops admission until a reset
#: (docs/budgets.md#hard-limit-actions).
LOCKING_ACTIONS = frozenset({"block", "cancel_running"})
#: Revocations in flight at once for one breach.
REVOKE_CONCURRENCY = 8
#: In-flight entries one breach revokes (the rest stay blocked from admission by the breach
#: lock and are revoked by the next breach report).
INFLIGHT_MAX = 10_000


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
    """The block detail of budget `bid` when strict and unable to admit, else "": the read-only
    twin of `ff_reserve_budget`'s refusal (lua/budget.lua), with the same details."""
    keys = BudgetKeys.of(budget_partition(bid, partitions), bid)
    pipe = store.pipeline()
    for k in (keys.definition, keys.limits, keys.usage, keys.reserved):
        pipe.hgetall(k)
    d, limits, usage, reserved = (hash_to_dict(r) for r in await store.run_pipeline(pipe))
    if not d or (d.get("enforcement_mode") or "strict") == "advisory":
        return ""
    action = d.get("on_hard_limit", "")
    if action in LOCKING_ACTIONS and d.get("last_breach_at"):
        return (
            f"budget {bid}: {d.get('last_breach_dim', '')} hard limit breached ({action}); "
            "waiting for a reset"
        )
    for field_name in sorted(limits):
        kind, _, dim = field_name.partition(":")
        if kind != "hard":
            continue

        def count(what: str, raw: str | None) -> int:
            return stored_count(f"budget {bid} {what}", raw or "0")

        limit = count(f"limit {field_name}", limits[field_name])
        used = count(f"usage {dim}", usage.get(dim))
        held = count(f"reserved {dim}", reserved.get(dim))
        est = count(f"reserve {dim}", limits.get(f"reserve:{dim}"))
        if limit > 0 and used >= limit:
            return f"budget {bid}: {dim} {used}/{limit}"
        if limit > 0 and est > 0 and used + held + est > limit:
            return f"budget {bid}: {dim} {used}/{limit}, {held} reserved, needs {est}"
    return ""


class BudgetCheck:
    """Reserve on every attached strict budget, or block (see the module docstring)."""

    name = "budget"
    in_slot = False
    attached_only = True

    def __init__(self, store: Store, budget_partitions: int, functions: Functions) -> None:
        self.store, self.partitions, self.functions = store, budget_partitions, functions
        # the token each admitted candidate reserved with, for its release: re-reading the
        # epoch then could see a later lease's
        self._tokens: weakref.WeakKeyDictionary[Candidate, str] = weakref.WeakKeyDictionary()

    def keys(self, bid: str) -> BudgetKeys:
        return BudgetKeys.of(budget_partition(bid, self.partitions), bid)

    def _attached(self, candidate: Candidate) -> list[str]:
        return list(dict.fromkeys(b for b in candidate.budget_ids if valid_id(b)))

    async def claim_token(self, candidate: Candidate) -> str:
        """The epoch of the lease a claim of `candidate` creates: an admission belongs to one
        lease, and the lease end releases it by that epoch (docs/budgets.md#reservations)."""
        if candidate.lease_epoch is not None:
            return str(candidate.lease_epoch + 1)
        raw = text(
            await self.store.call(
                "HGET", ExecKeys(candidate.execution_id).core, "current_lease_epoch"
            )
        )
        return str(stored_count(f"{candidate.execution_id} current_lease_epoch", raw or "0") + 1)

    async def check(self, candidate: Candidate, who: Claimer) -> Verdict:
        attached = self._attached(candidate)
        if not attached:
            return ADMIT
        cache = _PASS.get()
        eid = str(candidate.execution_id)
        token = await self.claim_token(candidate)
        reserved: list[str] = []
        for bid in attached:
            detail = cache.get(bid, "") if cache is not None else ""
            if not detail:
                got = await self.functions.budget.reserve_budget(self.keys(bid), eid, token)
                if got.outcome == "already_reserved":  # a concurrent claim of the same lease
                    await self._release(reserved, eid, token)
                    return SKIP
                if got.admitted:
                    reserved.append(bid)
                    continue
                detail = got.detail
                if cache is not None:
                    cache[bid] = detail  # same estimate for every execution of this budget
            await self._release(reserved, eid, token)
            return Block(BUDGET_REASON, detail)
        self._tokens[candidate] = token
        return ADMIT

    async def check_many(self, candidates: list[Candidate], who: Claimer) -> list[Verdict]:
        """`check` for a round of heads, their calls overlapping (docs/lifecycle.md#admission)."""
        return await each_bounded(self, candidates, who, lambda c: c.budget_ids)

    async def release(self, candidate: Candidate, who: Claimer) -> None:
        token = self._tokens.pop(candidate, None)
        if token is not None:
            await self._release(self._attached(candidate), str(candidate.execution_id), token)

    async def _release(self, bids: list[str], eid: str, token: str) -> None:
        for bid in bids:
            await self.functions.budget.release_budget(self.keys(bid), eid, token)


class BudgetReleaser:
    """Calls `ff_release_budget` on each attached budget for every `admission_released`
    announcement (docs/budgets.md#reservations). Every server hears each one; the release is
    idempotent. A lost announcement or a failed call is left to the budget reconciler."""

    CONCURRENCY = 8

    def __init__(self, functions: Functions, budget_partitions: int) -> None:
        self.functions, self.partitions = functions, budget_partitions
        self._tasks = TaskSet(self.CONCURRENCY)
        self._after: list[Callable[[BudgetKeys], None]] = []

    def after_release(self, callback: Callable[[BudgetKeys], None]) -> None:
        """`callback(keys)` after a release returned part of a reservation (a waiter may now
        fit)."""
        self._after.append(callback)

    def schedule(self, released: Released) -> None:
        bids = [b for b in dict.fromkeys(released.budget_ids) if valid_id(b)]
        eid, epoch = released.execution_id, released.lease_epoch
        if bids and eid:
            self._tasks.spawn(lambda: self._release(bids, eid, epoch), "budget-release")

    async def _release(self, bids: list[str], eid: str, epoch: str) -> None:
        for bid in bids:
            keys = BudgetKeys.of(budget_partition(bid, self.partitions), bid)
            try:
                # the admission of the lease that ended (or a stale one of an earlier lease);
                # one made for a later lease (claimed again before this arrived) stays
                got = await self.functions.budget.release_budget(keys, eid, epoch, up_to=True)
            except FlowFabricError as exc:
                log.warning("release of %s from budget %s failed: %s", eid, bid, exc.code)
                continue
            if got.freed > 0:
                for callback in self._after:
                    callback(keys)

    async def stop(self) -> None:
        await self._tasks.stop()


async def cancel_running(
    store: Store, functions: Functions, keys: BudgetKeys, flow_partitions: int, detail: str
) -> list[str]:
    """A hard breach of a `cancel_running` budget (docs/budgets.md#hard-limit-actions): revoke
    the lease of every execution in its in-flight index into `blocked:budget`; the ids revoked.
    Each revoke is one call on the execution's partition, fenced by the execution's own
    `budget_ids`; its lease release announces `admission_released`, which drops the in-flight
    entry. Failures, and entries of work no longer active, are left to the reconciler."""
    members = [text(m) for m in await store.call("ZRANGE", keys.inflight, 0, INFLIGHT_MAX - 1)]
    slots = asyncio.Semaphore(REVOKE_CONCURRENCY)
    revoked: list[str] = []

    async def one(raw: str) -> None:
        async with slots:
            try:
                eid = parse_execution_id(raw, flow_partitions)
                got = await functions.lease.revoke_for_budget(eid, keys.budget_id, detail)
            except FlowFabricError as exc:
                log.warning("budget %s: revoking %s failed: %s", keys.budget_id, raw, exc.code)
                return
            if got.outcome == "revoked":
                revoked.append(raw)
                # a waiter of the budget, so its reset brings the work back at once
                await functions.waiters.add(Bucket.budget(keys), raw)

    await asyncio.gather(*(one(m) for m in members))
    return revoked


async def lease_gone(store: Store, eid: str, flow_partitions: int) -> bool:
    """Whether the reporting execution `eid` holds no lease (an earlier breach of the same
    budget revoked it): the SDK then cancels its handler as for a revoke of this breach."""
    try:
        core = ExecKeys(parse_execution_id(eid, flow_partitions)).core
    except FlowFabricError:
        return False
    return text(await store.call("HGET", core, "lifecycle_phase")) not in ("active", "")
