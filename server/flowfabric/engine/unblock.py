"""Event-driven unblock (docs/budgets.md#waking-blocked-work): blocked work is woken by the
event that clears its condition, not by the unblock scanner's tick.

| event | what is woken | how many |
|---|---|---|
| a quota admission released (`AdmissionReleaser.after_release`) | the policy bucket's oldest waiter | one per release |
| a budget reservation returned (`BudgetReleaser.after_release`) | the budget's oldest waiter | one per release that freed something |
| a budget reset (`ResetBudget`, the reset job) | every waiter of the budget | all |
| a rate window rolls over (an in-process timer at the block's `retry_at`, then at each next entry's leaving) | the bucket's oldest waiters | as many as the window has room for |

When admission blocks an execution for its quota or budgets (`Admission.after_block`), it is
registered in the waiters index of its quota bucket (the policy, or the policy and the core's
`concurrency_key`) or of each attached budget that is exhausted (`ff_add_waiter`, on the
owner's tag). Then the condition is checked again: a release that landed between the
admission check and the registration found nobody to wake, so when the condition is clear
now the execution takes itself out of the index (`ff_remove_waiter`) and is unblocked at
once. Whoever removes an entry unblocks it, so one entry is never woken twice.

Waking takes entries atomically (`ff_take_waiters`: two servers never take the same one) and
unblocks each with `ff_unblock_execution`, which publishes the state change (and, for a flow
member, the ready announcement) that wakes the claim long polls of every server. An entry
whose execution is no longer blocked for that reason (claimed, cancelled, unblocked by the
scanner) answers `execution_not_eligible` and is skipped: the next entry is taken instead.

Everything here is a fast path. A lost announcement, a server that dies with pending timers
or a failed call leaves the execution blocked for the unblock scanner (`engine/lifecycle.py`),
which stays the backstop.
"""  # noqa: E501

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from flowfabric.server.engine.admission import Block, valid_id
from flowfabric.server.engine.aio import TaskSet
from flowfabric.server.engine.budget_admission import BUDGET_REASON, claim_pass, exhausted_budget
from flowfabric.server.engine.quota_admission import QUOTA_REASON, quota_clear, quota_limits
from flowfabric.server.valkey.codec import text
from flowfabric.server.valkey.errors import FlowFabricError
from flowfabric.server.valkey.functions import Functions
from flowfabric.server.valkey.functions.waiters import MAX_TAKE, Bucket
from flowfabric.server.valkey.ids import (
    ExecutionId,
    budget_partition,
    parse_execution_id,
    quota_partition,
)
from flowfabric.server.valkey.keys import BudgetKeys, ExecKeys, QuotaKeys
from flowfabric.server.valkey.store import Store

log = logging.getLogger("flowfabric.unblock")

#: Stale entries (no longer blocked) one wake skips before it gives up.
MAX_SKIPPED = 16
#: Entries taken per call when waking a whole budget.
RESET_BATCH = 100
#: Entries one budget reset wakes at most; the unblock scanner returns the rest.
RESET_MAX = 10_000
#: A rate timer fires this long after `retry_at`, so the oldest window entry has left.
TIMER_SLACK_MS = 2
#: Wakes in flight at once on one server.
CONCURRENCY = 8
BENIGN = frozenset({"execution_not_eligible", "execution_not_found"})


def _first_score(reply: list[object]) -> float | None:
    """The score of a one-member WITHSCORES reply (paired by the client or flat)."""
    if not reply:
        return None
    first = reply[0]
    score = first[1] if isinstance(first, list | tuple) else reply[1]
    return float(score)  # type: ignore[arg-type]


class Unblocker:
    """Registers blocked work in the waiters indexes and wakes it (see the module docstring).
    `on_eligible` is called after a wake unblocked something (the scheduler's local wake)."""

    def __init__(
        self,
        store: Store,
        fn: Functions,
        flow_partitions: int,
        budget_partitions: int,
        quota_partitions: int,
        on_eligible: Callable[[], None] | None = None,
    ) -> None:
        self.store, self.fn, self.on_eligible = store, fn, on_eligible
        self.flow_partitions = flow_partitions
        self.budget_partitions, self.quota_partitions = budget_partitions, quota_partitions
        self._tasks = TaskSet(CONCURRENCY)
        self._timers: dict[Bucket, tuple[int, asyncio.TimerHandle]] = {}

    # -- keys ---------------------------------------------------------------------------------

    def quota_bucket(self, quota_policy_id: str, concurrency_key: str = "") -> Bucket | None:
        if not valid_id(quota_policy_id):
            return None
        part = quota_partition(quota_policy_id, self.quota_partitions)
        return Bucket.quota(QuotaKeys.of(part, quota_policy_id), concurrency_key)

    def budget_keys(self, budget_id: str) -> BudgetKeys:
        return BudgetKeys.of(budget_partition(budget_id, self.budget_partitions), budget_id)

    # -- registration (admission blocked an execution) ----------------------------------------

    async def blocked(self, eid: ExecutionId, verdict: Block) -> None:
        """`Admission.after_block`: register a quota or budget block and re-check it. A failure
        is logged; the scanner returns the execution."""
        try:
            if verdict.reason == QUOTA_REASON:
                await self._register_quota(eid, verdict)
            elif verdict.reason == BUDGET_REASON:
                await self._register_budgets(eid)
        except FlowFabricError as exc:
            log.warning("registering %s as a waiter failed: %s", eid, exc.code)

    async def _core(self, eid: ExecutionId, *fields: str) -> list[str]:
        return [text(v) for v in await self.store.call("HMGET", ExecKeys(eid).core, *fields)]

    async def _register_quota(self, eid: ExecutionId, verdict: Block) -> None:
        qid, key = await self._core(eid, "quota_policy_id", "concurrency_key")
        bucket = self.quota_bucket(qid, key)
        if bucket is None:
            return
        await self.fn.waiters.add(bucket, str(eid))
        if verdict.until_ms is not None:
            await self.schedule_window(bucket, verdict.until_ms)
        keys = QuotaKeys(bucket.tag, bucket.owner_id, bucket.concurrency_key)
        # quota_clear is the admission condition itself: were it looser than the check, a
        # claim would block and this would unblock, in turn, for as long as they disagreed
        if await quota_clear(self.store, keys):  # a release landed before the registration
            await self._self_wake([bucket], eid, QUOTA_REASON)

    async def _register_budgets(self, eid: ExecutionId) -> None:
        (bids,) = await self._core(eid, "budget_ids")
        attached = list(dict.fromkeys(b for b in bids.split(",") if valid_id(b)))
        if not attached:
            return  # not blocked by a budget of its own: left to the scanner
        buckets: list[Bucket] = []
        for bid in attached:
            if await self._exhausted(bid):
                bucket = Bucket.budget(self.budget_keys(bid))
                await self.fn.waiters.add(bucket, str(eid))
                buckets.append(bucket)
        # every budget that blocked it may have been reset since: check them all again
        for bucket in buckets:
            if await self._exhausted(bucket.owner_id):
                return
        await self._self_wake(buckets, eid, BUDGET_REASON)

    async def _exhausted(self, budget_id: str) -> bool:
        # a fresh read: the claim call's verdict cache would repeat what blocked it
        with claim_pass():
            return bool(await exhausted_budget(self.store, self.budget_partitions, (budget_id,)))

    async def _self_wake(self, buckets: list[Bucket], eid: ExecutionId, reason: str) -> None:
        """The condition is clear after registration: unblock `eid` unless a wake already took
        its entry (that wake unblocks it)."""
        took = False
        for bucket in buckets:
            took = await self.fn.waiters.remove(bucket, str(eid)) or took
        if (took or not buckets) and await self._unblock(str(eid), reason):
            self._woke()

    # -- wakes --------------------------------------------------------------------------------

    def released(self, quota_policy_id: str, concurrency_key: str) -> None:
        """`AdmissionReleaser.after_release`: a slot was freed; wake the bucket's oldest waiter
        (it re-blocks if another claim took the slot first)."""
        bucket = self.quota_bucket(quota_policy_id, concurrency_key)
        if bucket is not None:
            self._tasks.spawn(lambda: self._wake_logged(bucket, 1, QUOTA_REASON), "unblock-quota")

    def budget_freed(self, keys: BudgetKeys) -> None:
        """`BudgetReleaser.after_release`: a reservation was returned; wake the budget's oldest
        waiter (it re-blocks if the room went to another claim first)."""
        bucket = Bucket.budget(keys)
        self._tasks.spawn(lambda: self._wake_logged(bucket, 1, BUDGET_REASON), "unblock-budget")

    def budget_reset(self, keys: BudgetKeys) -> None:
        """A budget was reset (ResetBudget, the reset job): wake all its waiters."""
        bucket = Bucket.budget(keys)
        self._tasks.spawn(
            lambda: self._wake_logged(bucket, RESET_MAX, BUDGET_REASON, RESET_MAX),
            "unblock-budget",
        )

    async def _wake_logged(
        self, bucket: Bucket, count: int, reason: str, max_skipped: int = MAX_SKIPPED
    ) -> None:
        try:
            await self.wake(bucket, count, reason, max_skipped)
        except FlowFabricError as exc:
            log.warning("waking %s %s failed: %s", bucket.owner_kind, bucket.owner_id, exc.code)

    async def wake(
        self, bucket: Bucket, count: int, reason: str, max_skipped: int = MAX_SKIPPED
    ) -> int:
        """Take up to `count` waiters of `bucket` (oldest first) and unblock them, skipping
        (up to `max_skipped`) entries that are no longer blocked for `reason`; the number
        unblocked."""
        woken = skipped = 0
        while woken < count and skipped <= max_skipped:
            taken = await self.fn.waiters.take(bucket, min(count - woken, MAX_TAKE, RESET_BATCH))
            if not taken:
                break
            for raw in taken:
                if await self._unblock(raw, reason):
                    woken += 1
                else:
                    skipped += 1
        if woken:
            self._woke()
        return woken

    async def _unblock(self, raw: str, reason: str) -> bool:
        try:
            eid = parse_execution_id(raw, self.flow_partitions)
            await self.fn.admission.unblock_execution(eid, reason)
        except FlowFabricError as exc:
            if exc.code not in BENIGN and exc.code != "invalid_input":
                log.warning("unblock of %s failed: %s (the scanner returns it)", raw, exc.code)
            return False
        return True

    def _woke(self) -> None:
        if self.on_eligible is not None:
            self.on_eligible()

    # -- rate windows -------------------------------------------------------------------------

    async def schedule_window(self, bucket: Bucket, retry_at_ms: int) -> None:
        """Wake up to the policy's rate of waiters once its window has room again, at
        `retry_at_ms` (Valkey clock). One timer per bucket: the earliest wins."""
        pending = self._timers.get(bucket)
        if pending is not None and pending[0] <= retry_at_ms:
            return
        if pending is not None:
            pending[1].cancel()
        delay_ms = max(0, retry_at_ms - await self.store.time_ms()) + TIMER_SLACK_MS
        handle = asyncio.get_running_loop().call_later(delay_ms / 1000, self._fire, bucket)
        self._timers[bucket] = (retry_at_ms, handle)

    def _fire(self, bucket: Bucket) -> None:
        self._timers.pop(bucket, None)
        self._tasks.spawn(lambda: self._window_rolled(bucket), "unblock-window")

    async def _window_rolled(self, bucket: Bucket) -> None:
        """Wake as many waiters as the window has room for now, then, while waiters remain,
        look again when the next entry leaves the window: entries age out one by one, so
        waking more than the room would only make the extra ones block again."""
        try:
            keys = QuotaKeys(bucket.tag, bucket.owner_id, bucket.concurrency_key)
            limits = await quota_limits(self.store, keys)
            if limits is None or limits.rate <= 0:
                return  # no rate limit (any more): releases and the scanner wake the rest
            w = limits.window_seconds * 1000
            now = await self.store.time_ms()
            in_window = int(await self.store.call("ZCOUNT", keys.window, f"({now - w}", "+inf"))
            if in_window < limits.rate:
                await self.wake(bucket, limits.rate - in_window, QUOTA_REASON)
            if await self.store.call("ZCARD", bucket.index):
                oldest = await self.store.call(
                    "ZRANGEBYSCORE", keys.window, f"({now - w}", "+inf", "WITHSCORES",
                    "LIMIT", 0, 1,
                )  # fmt: skip
                leaves = _first_score(oldest)
                next_at = now + w if leaves is None else int(leaves) + w
                await self.schedule_window(bucket, max(next_at, now + TIMER_SLACK_MS))
        except FlowFabricError as exc:
            log.warning("window wake of quota %s failed: %s", bucket.owner_id, exc.code)

    # -- the scanner's side -------------------------------------------------------------------

    async def forget(
        self, eid: ExecutionId, budget_ids: str, quota_policy_id: str, key: str
    ) -> None:
        """The unblock scanner returned `eid`: drop its waiters entries (best effort)."""
        buckets = [Bucket.budget(self.budget_keys(b)) for b in budget_ids.split(",") if valid_id(b)]
        quota = self.quota_bucket(quota_policy_id, key)
        for bucket in [*buckets, *([quota] if quota is not None else [])]:
            try:
                await self.fn.waiters.remove(bucket, str(eid))
            except FlowFabricError as exc:
                log.debug("dropping waiter %s: %s", eid, exc.code)

    async def stop(self) -> None:
        for _, handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        await self._tasks.stop()
