"""Admission: the ordered checks a claim candidate passes between "candidate found" and "lease
committed" (docs/lifecycle.md#admission).

A candidate is an eligible head of a lane's eligible set, with what the claim path knows about
it (its required capabilities, whether the claim function's own capability check failed, and,
once budgets and quotas exist, its budget ids and quota policy id). Each check answers:

- `ADMIT`: this check lets it through (the next check is asked);
- `Block(reason, detail, until_ms)`: the execution leaves the eligible set for
  `blocked:<reason>` (`ff_block_execution_for_admission`), so the lane keeps flowing past it;
  the event that clears its condition wakes it (`engine/unblock.py`), the unblock scanner
  being the backstop;
- `SKIP`: leave it eligible and untouched, for another worker or a later pass.

The first answer other than admit wins; checks that admitted before it release what they
reserved.

Two kinds of check:

- In-slot (`in_slot = True`): the claim function evaluates the same condition inside its single
  slot, atomically with the lease (the capability route, today's only check). With only in-slot
  checks the scheduler keeps the one-call batch claim and consults the checks afterwards for the
  heads the function reported (today: capability mismatches), to learn what to do with them.
- Cross-slot (`in_slot = False`): state on another hash tag (budgets on `{b:M}`, quotas on
  `{q:K}`) that a single-slot claim function cannot read. When one is registered the scheduler
  reads the candidates first (the eligible heads), asks every check in order, and claims only
  the admitted ones, one by one (a claim grant, then the claim). A cross-slot check keeps its
  guarantee by reservation: `check` reserves on its own slot (atomically there, e.g. a budget
  function that debits or holds an amount, a quota function that takes a slot in its window)
  and answers admit; if the claim then fails (another worker won the head, it stopped being
  eligible) the scheduler calls `release`, which returns the reservation. A reservation must
  carry a TTL on its own slot, so a server that dies between reserve and claim or release
  leaks nothing for longer than that TTL. Over-admission is impossible (the reservation
  precedes the lease); the worst case is a transient under-admission while a reservation for a
  failed claim is outstanding.

A cross-slot check that only concerns heads carrying `budget_ids` or a `quota_policy_id` (the
budget and quota checks, `engine/budget_admission.py` and `engine/quota_admission.py`) says so
with `attached_only = True`: it keeps the one-call batch claim for every other head, since
`ff_claim_batch` leases only heads with neither attached and reports the others as
`needs_admission`, which the scheduler then takes through every check one by one, as the
candidate-first path does.

A reclaim (an expired or revoked lease handed to another worker) continues an admitted attempt
and does not pass admission again; its capability check is the reclaim grant's.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from flowfabric.server.valkey.errors import FlowFabricError
from flowfabric.server.valkey.functions import Claimer, Functions
from flowfabric.server.valkey.ids import ExecutionId

log = logging.getLogger("flowfabric.admission")

ROUTE_REASON = "waiting_for_capable_worker"
CAPABLE_WORKER_DETAIL = "no connected worker satisfies required_capabilities"


def corrupt_record(what: str, raw: object) -> FlowFabricError:
    """A stored value an admission check cannot trust (the claim fails closed)."""
    return FlowFabricError("corrupt_record", message=f"{what} does not parse: {raw!r}")


def stored_count(what: str, raw: str) -> int:
    """A non-negative integer read from the store, or `corrupt_record`."""
    try:
        n = int(raw)
    except ValueError:
        raise corrupt_record(what, raw) from None
    if n < 0:
        raise corrupt_record(what, raw)
    return n


def valid_id(raw: str) -> bool:
    """Whether `raw` is a UUID (an attached id that is not names nothing to enforce)."""
    try:
        uuid.UUID(raw)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Candidate:
    """An eligible head the claim path found, and what it knows about it."""

    execution_id: ExecutionId
    lane_id: str
    required_capabilities: tuple[str, ...] = ()
    capability_mismatch: bool = False  # the claim function's capability check failed
    budget_ids: tuple[str, ...] = ()
    quota_policy_id: str = ""
    # read with the candidate when known (None = not read: a check that needs it reads it)
    concurrency_key: str | None = None
    lease_epoch: int | None = None  # the core's current_lease_epoch


@dataclass(frozen=True)
class Admit:
    pass


@dataclass(frozen=True)
class Skip:
    pass


@dataclass(frozen=True)
class Block:
    """Move the execution to `blocked:<reason>`. `until_ms` is when the check expects the
    condition to clear (None = when an event clears it): the block function stores no
    deadline, but the unblocker schedules a wake at it (docs/budgets.md#waking-blocked-work)."""

    reason: str
    detail: str
    until_ms: int | None = None


Verdict = Admit | Block | Skip
ADMIT = Admit()
SKIP = Skip()


class AdmissionCheck(Protocol):
    """One admission check; see the module docstring for in-slot versus cross-slot."""

    name: str
    in_slot: bool

    async def check(self, candidate: Candidate, who: Claimer) -> Verdict: ...

    async def release(self, candidate: Candidate, who: Claimer) -> None:
        """Return what `check` reserved for `candidate` (its claim failed or a later check
        refused it). A no-op for a check that reserves nothing."""


#: Candidates a batching check asks about at once (its calls in flight together).
CHECK_CONCURRENCY = 8


async def each_bounded(
    check: AdmissionCheck,
    candidates: Sequence[Candidate],
    who: Claimer,
    group: Callable[[Candidate], Hashable],
) -> list[Verdict]:
    """`check.check` for every candidate, verdicts in order. Candidates of one `group` (those
    competing for the same limit) are asked one after another, in order, so the limit goes to
    the earlier heads; groups are asked side by side, at most CHECK_CONCURRENCY at a time, so
    their round trips overlap. When a call fails, what the others admitted is released and
    the failure raised."""
    groups: dict[Hashable, list[int]] = {}
    for i, cand in enumerate(candidates):
        groups.setdefault(group(cand), []).append(i)
    results: list[Verdict | BaseException | None] = [None] * len(candidates)
    sem = asyncio.Semaphore(CHECK_CONCURRENCY)

    async def one_group(indexes: list[int]) -> None:
        async with sem:
            for i in indexes:
                try:
                    results[i] = await check.check(candidates[i], who)
                except FlowFabricError as exc:
                    results[i] = exc
                    return

    await asyncio.gather(*(one_group(ix) for ix in groups.values()))
    failed = next((r for r in results if isinstance(r, BaseException)), None)
    if failed is None:
        return [r for r in results if r is not None and not isinstance(r, BaseException)]
    for cand, r in zip(candidates, results, strict=True):
        if isinstance(r, Admit):
            try:
                await check.release(cand, who)
            except FlowFabricError as exc:
                log.warning("%s release for %s failed: %s", check.name, cand.execution_id, exc)
    raise failed


def missing_capabilities(required: Iterable[str], worker_csv: str) -> list[str]:
    have = {t for t in worker_csv.split(",") if t}
    return sorted({t for t in required if t and t not in have})


class CapabilityCheck:
    """The capability route: required capabilities must be a subset of the worker's. Evaluated
    in-slot by the claim functions; a mismatch blocks into `blocked:route`."""

    name = "capability_route"
    in_slot = True

    async def check(self, candidate: Candidate, who: Claimer) -> Verdict:
        if candidate.capability_mismatch or missing_capabilities(
            candidate.required_capabilities, who.capabilities_csv
        ):
            return Block(ROUTE_REASON, CAPABLE_WORKER_DETAIL)
        return ADMIT

    async def release(self, candidate: Candidate, who: Claimer) -> None:
        return None


OnBlocked = Callable[[ExecutionId, Block], Awaitable[None]]


class Admission:
    """The ordered list of checks the scheduler consults."""

    def __init__(self, functions: Functions, checks: Sequence[AdmissionCheck] = ()) -> None:
        self.functions = functions
        self.checks: list[AdmissionCheck] = list(checks) or [CapabilityCheck()]
        self._after_block: list[OnBlocked] = []

    def after_block(self, callback: OnBlocked) -> None:
        """`await callback(eid, verdict)` after a block verdict was applied: the unblocker
        registers the execution as a waiter (docs/budgets.md#waking-blocked-work)."""
        self._after_block.append(callback)

    @property
    def cross_slot(self) -> bool:
        """Whether some check must run before every claim (the candidate-first claim path).
        Checks that only concern heads with budgets or a quota attached (`attached_only`) do
        not count: `ff_claim_batch` reports those heads instead of leasing them."""
        return any(not c.in_slot and not getattr(c, "attached_only", False) for c in self.checks)

    def register(self, check: AdmissionCheck) -> None:
        self.checks.append(check)

    def unregister(self, check: AdmissionCheck) -> None:
        self.checks.remove(check)

    async def decide(self, candidate: Candidate, who: Claimer) -> Verdict:
        """Ask the checks in order; the first non-admit answer wins and the checks that had
        admitted release their reservations (latest first)."""
        passed: list[AdmissionCheck] = []
        for c in list(self.checks):
            verdict = await c.check(candidate, who)
            if not isinstance(verdict, Admit):
                await self._release(reversed(passed), candidate, who)
                return verdict
            passed.append(c)
        return ADMIT

    async def decide_many(self, candidates: Sequence[Candidate], who: Claimer) -> list[Verdict]:
        """`decide` for several candidates of one claim pass, check by check: a check with a
        `check_many` answers for all the candidates still admitted in one go (one round trip
        of its reads and records instead of one per candidate), the others one by one. A
        candidate refused by a check releases what the earlier checks reserved for it."""
        verdicts: list[Verdict] = [ADMIT] * len(candidates)
        pending = list(range(len(candidates)))
        passed: list[AdmissionCheck] = []
        for c in list(self.checks):
            if not pending:
                break
            batch = [candidates[i] for i in pending]
            many = getattr(c, "check_many", None)
            if many is not None:
                got: list[Verdict] = list(await many(batch, who))
            else:
                got = [await c.check(cand, who) for cand in batch]
            still = []
            for i, verdict in zip(pending, got, strict=True):
                if isinstance(verdict, Admit):
                    still.append(i)
                else:
                    verdicts[i] = verdict
                    await self._release(reversed(passed), candidates[i], who)
            pending = still
            passed.append(c)
        return verdicts

    async def release(self, candidate: Candidate, who: Claimer) -> None:
        """The candidate was admitted but its claim failed: every check releases."""
        await self._release(reversed(self.checks), candidate, who)

    async def _release(
        self, checks: Iterable[AdmissionCheck], candidate: Candidate, who: Claimer
    ) -> None:
        for c in list(checks):
            try:
                await c.release(candidate, who)
            except FlowFabricError as exc:  # the reservation's TTL returns it
                log.warning("%s release for %s failed: %s", c.name, candidate.execution_id, exc)

    async def block(self, eid: ExecutionId, verdict: Block) -> None:
        """Apply a block verdict, then tell the `after_block` callbacks; a failed block is only
        logged (the execution stays where it is and the next pass decides again)."""
        try:
            await self.functions.admission.block_execution(eid, verdict.reason, verdict.detail)
        except FlowFabricError as exc:
            log.debug("block of %s failed: %s", eid, exc.code)
            return
        for callback in self._after_block:
            await callback(eid, verdict)
