"""The quota admission check (docs/lifecycle.md#admission, docs/budgets.md#admission).

Quota policies live on `{q:K}`, so the check is cross-slot and applies only to the heads that
carry a `quota_policy_id` (`attached_only`, see `engine/budget_admission.py`).

`QuotaCheck` reads the policy and, when it limits anything, records the admission with
`ff_check_admission_and_record` in the execution's bucket (its `concurrency_key`'s, or the
policy's); a full window blocks `waiting_for_quota` with a `retry_at`, a full concurrency cap
blocks until a slot frees. When the claim then fails the admission is refunded
(`ff_refund_admission`: its window entry and its slot).

`AdmissionReleaser` gives a quota slot back when the admitted work ends its lease (the functions
announce it on the partition's ready channel; docs/budgets.md#releasing-admissions). A slot
lives exactly as long as the work holds its lease: nothing else frees it but the quota
reconciler, for work that holds no live lease any more (docs/budgets.md#slots).

`quota_clear` is the same condition as a read only, for the unblock scanner and the unblocker.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

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
from flowfabric.server.valkey.functions.quota import Admission
from flowfabric.server.valkey.ids import quota_partition
from flowfabric.server.valkey.keys import ExecKeys, QuotaKeys
from flowfabric.server.valkey.store import Store

log = logging.getLogger("flowfabric.admission")

QUOTA_REASON = "waiting_for_quota"


@dataclass(frozen=True)
class QuotaLimits:
    window_seconds: int
    rate: int
    cap: int
    jitter_ms: int

    @property
    def limits_anything(self) -> bool:
        return self.rate > 0 or self.cap > 0


async def quota_limits(store: Store, keys: QuotaKeys) -> QuotaLimits | None:
    """The policy's limits; None when it has no definition."""
    d = hash_to_dict(await store.call("HGETALL", keys.definition))
    if not d:
        return None
    q = keys.quota_policy_id

    def num(name: str, default: str = "0") -> int:
        return stored_count(f"quota {q} {name}", d.get(name, default) or default)

    return QuotaLimits(
        num("requests_per_window_seconds", "60"), num("max_requests_per_window"),
        num("active_concurrency_cap"), num("jitter_ms"),
    )  # fmt: skip


async def quota_clear(store: Store, keys: QuotaKeys) -> bool:
    """Whether an admission to the bucket `keys` names (its concurrency key's, or the
    policy's) would pass now: the same condition as `ff_check_admission_and_record`, as a read
    (nothing recorded, expired window entries only left out of the count)."""
    limits = await quota_limits(store, keys)
    if limits is None or not limits.limits_anything:
        return True
    now = await store.time_ms()
    pipe = store.pipeline()
    pipe.zcount(keys.window, f"({now - limits.window_seconds * 1000}", "+inf")
    pipe.zcard(keys.admitted)
    in_window, live = await store.run_pipeline(pipe)
    if limits.rate > 0 and int(in_window or 0) >= limits.rate:
        return False
    return not (limits.cap > 0 and int(live or 0) >= limits.cap)


class QuotaCheck:
    """Rate window and concurrency cap of the execution's quota bucket (see the module
    docstring). An admission this server recorded is remembered until its claim succeeds or
    fails (then it is refunded), for at most `REMEMBER_S`."""

    name = "quota"
    in_slot = False
    attached_only = True

    #: How long an admission is remembered for its refund; a claim decides well within it.
    REMEMBER_S = 120.0
    #: How long a policy's limits are served from memory, and how many policies are.
    LIMITS_TTL_S = 1.0
    LIMITS_CACHED = 4096

    def __init__(self, store: Store, functions: Functions, quota_partitions: int) -> None:
        self.store, self.functions, self.partitions = store, functions, quota_partitions
        self._admitted: dict[tuple[str, str], tuple[float, QuotaKeys, Admission]] = {}
        self._after_refund: list[Callable[[str, str], None]] = []
        # policy id -> (read at, limits): definitions never change once created, so a read
        # serves the claims of the next LIMITS_TTL_S (a deleted policy is noticed that late)
        self._limits: dict[str, tuple[float, QuotaLimits | None]] = {}

    def keys(self, quota_policy_id: str, concurrency_key: str = "") -> QuotaKeys | None:
        if not valid_id(quota_policy_id):
            return None
        part = quota_partition(quota_policy_id, self.partitions)
        return QuotaKeys.of(part, quota_policy_id, concurrency_key)

    async def check(self, candidate: Candidate, who: Claimer) -> Verdict:
        if not valid_id(candidate.quota_policy_id):
            return ADMIT
        eid = candidate.execution_id
        key = candidate.concurrency_key
        if key is None:  # not read with the candidate
            key = text(await self.store.call("HGET", ExecKeys(eid).core, "concurrency_key"))
        keys = self.keys(candidate.quota_policy_id, key)
        if keys is None:
            return ADMIT
        limits = await self._policy_limits(keys)
        if limits is None or not limits.limits_anything:
            return ADMIT
        got = await self.functions.quota.check_admission(
            keys, str(eid), window_seconds=limits.window_seconds,
            rate_limit=limits.rate, concurrency_cap=limits.cap, jitter_ms=limits.jitter_ms,
        )  # fmt: skip
        q = keys.quota_policy_id + (f" key {key}" if key else "")
        if got.outcome == "rate_exceeded":
            retry_at = await self.store.time_ms() + (got.retry_after_ms or 0)
            detail = (
                f"quota {q}: rate limit {limits.rate}/{limits.rate} per "
                f"{limits.window_seconds}s window; retry_at {retry_at}"
            )
            return Block(QUOTA_REASON, detail, until_ms=retry_at)
        if got.outcome == "concurrency_exceeded":
            return Block(QUOTA_REASON, f"quota {q}: concurrency cap {limits.cap}")
        if got.outcome == "already_admitted":
            # another claim is taking it under its own admission (or a lost release left it a
            # slot the reconciler will free): leave it, take the next head
            return SKIP
        self._remember((str(eid), who.worker_instance_id), keys, got)
        return ADMIT

    async def _policy_limits(self, keys: QuotaKeys) -> QuotaLimits | None:
        now = time.monotonic()
        hit = self._limits.get(keys.quota_policy_id)
        if hit is not None and now - hit[0] < self.LIMITS_TTL_S:
            return hit[1]
        limits = await quota_limits(self.store, keys)
        if len(self._limits) >= self.LIMITS_CACHED:
            self._limits.clear()
        self._limits[keys.quota_policy_id] = (now, limits)
        return limits

    async def check_many(self, candidates: list[Candidate], who: Claimer) -> list[Verdict]:
        """`check` for a round of heads, their calls overlapping (docs/lifecycle.md#admission)."""
        return await each_bounded(
            self, candidates, who, lambda c: (c.quota_policy_id, c.concurrency_key)
        )

    def _remember(self, at: tuple[str, str], keys: QuotaKeys, got: Admission) -> None:
        now = time.monotonic()
        while self._admitted:  # oldest first: entries of claims that succeeded age out
            first = next(iter(self._admitted))
            if now - self._admitted[first][0] < self.REMEMBER_S:
                break
            del self._admitted[first]
        self._admitted.pop(at, None)
        self._admitted[at] = (now, keys, got)

    async def release(self, candidate: Candidate, who: Claimer) -> None:
        """The claim after this server's admission failed: refund it (its window entry, and
        its slot unless a later admission owns it)."""
        held = self._admitted.pop((str(candidate.execution_id), who.worker_instance_id), None)
        if held is not None:
            _, keys, got = held
            freed = await self.functions.quota.refund_admission(
                keys, str(candidate.execution_id), got
            )
            if freed.waiters:  # the refunded place is free now: wake one waiter for it
                for callback in self._after_refund:
                    callback(keys.quota_policy_id, keys.concurrency_key)

    def after_refund(self, callback: Callable[[str, str], None]) -> None:
        """`callback(quota_policy_id, concurrency_key)` after a refund gave a bucket's place
        back while executions wait on it (docs/budgets.md#waking-blocked-work)."""
        self._after_refund.append(callback)


class AdmissionReleaser:
    """Calls `ff_release_admission` for each `admission_released` announcement. Every server
    hears each one; only the call that freed the slot (`released`, not `not_held`) wakes a
    waiter, so one release wakes one waiter however many servers hear it. A lost
    announcement or a failed call leaves the slot to the quota reconciler
    (`engine/quota_reconciler.py`), which frees it once the execution holds no live lease."""

    #: Releases in flight at once on one server.
    CONCURRENCY = 8

    def __init__(self, functions: Functions, quota_partitions: int) -> None:
        self.functions, self.partitions = functions, quota_partitions
        self._tasks = TaskSet(self.CONCURRENCY)
        self._after: list[Callable[[str, str], None]] = []

    def after_release(self, callback: Callable[[str, str], None]) -> None:
        """`callback(quota_policy_id, concurrency_key)` after a release call freed a slot, for
        waking the work blocked on that bucket (docs/budgets.md#waking-blocked-work)."""
        self._after.append(callback)

    def schedule(self, released: Released) -> None:
        quota_policy_id, execution_id = released.quota_policy_id, released.execution_id
        if not valid_id(quota_policy_id) or not execution_id:
            return
        part = quota_partition(quota_policy_id, self.partitions)
        keys = QuotaKeys.of(part, quota_policy_id, released.concurrency_key)
        self._tasks.spawn(lambda: self._release(keys, execution_id), "quota-release")

    async def _release(self, keys: QuotaKeys, execution_id: str) -> None:
        await self.release(keys, execution_id)

    async def release(self, keys: QuotaKeys, execution_id: str) -> bool:
        """Release `execution_id`'s slot in `keys`' bucket; True when this call freed it (the
        callbacks then ran)."""
        try:
            got = await self.functions.quota.release_admission(keys, execution_id)
        except FlowFabricError as exc:
            log.warning(
                "release of %s from quota %s failed: %s", execution_id, keys.quota_policy_id,
                exc.code,
            )  # fmt: skip
            return False
        if got.outcome != "released":
            return False
        if got.waiters:  # nobody blocked on the bucket: nothing to wake
            for callback in self._after:
                callback(keys.quota_policy_id, keys.concurrency_key)
        return True

    async def stop(self) -> None:
        await self._tasks.stop()
