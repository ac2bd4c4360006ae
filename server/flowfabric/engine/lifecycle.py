"""The execution-lifecycle scanners (docs/architecture.md#scanners, docs/architecture.md#scanners),
built on `ScannerSet`.

| scanner | index | function |
|---|---|---|
| lease_expiry | `lease_expiry` | `ff_mark_lease_expired_if_due` |
| delayed_promoter | each lane's `delayed` | `ff_promote_delayed` |
| attempt_timeout | `attempt_timeout` | `ff_expire_execution(attempt_timeout)` |
| execution_deadline | `execution_deadline` | `ff_expire_execution(execution_deadline)` |
| unblock (route) | each lane's `blocked:route` | `ff_unblock_execution` once a worker fits |
| unblock_budget | each lane's `blocked:budget` | `ff_unblock_execution` once budgets allow |
| unblock_quota | each lane's `blocked:quota` | `ff_unblock_execution` once the quota would admit |
| index_reconciler | `all_executions` (SSCAN) | `ff_reconcile_indexes` |
| retention_trimmer | each lane's `terminal`, older than 24 h | cascade delete (plain commands) |
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable

from flowfabric.server.config import Config
from flowfabric.server.engine.budget_admission import BUDGET_REASON, exhausted_budget
from flowfabric.server.engine.probe import partitions_with_work
from flowfabric.server.engine.quota_admission import QUOTA_REASON, quota_clear
from flowfabric.server.engine.scanners import Scanner, ScannerSet
from flowfabric.server.engine.unblock import Unblocker
from flowfabric.server.valkey.codec import text
from flowfabric.server.valkey.errors import FlowFabricError
from flowfabric.server.valkey.functions import Functions
from flowfabric.server.valkey.ids import ExecutionId, parse_execution_id, quota_partition
from flowfabric.server.valkey.keys import (
    ExecKeys,
    PartitionKeys,
    QuotaKeys,
    WaitpointKeys,
    signal_key,
    signal_payload_key,
)
from flowfabric.server.valkey.store import Store
from flowfabric.server.valkey.workers import WorkerRegistry

log = logging.getLogger("flowfabric.scanners")

RETENTION_MS = 24 * 3600 * 1000
RETENTION_BATCH = 20
UNBLOCK_BATCH = 100
RECONCILE_BATCH = 100


def lifecycle_scanners(
    config: Config,
    store: Store,
    fn: Functions,
    registry: WorkerRegistry,
    on_eligible: Callable[[], None] | None = None,
    unblocker: Unblocker | None = None,
) -> ScannerSet:
    """Every lifecycle scanner with the configured intervals. `unblocker`: the scanner drops
    the waiters entries of what it returns (docs/budgets.md#waking-blocked-work)."""
    parts = config.flow_partitions
    scanners = ScannerSet(store, parts, config.lanes)

    def eid_of(member: str) -> ExecutionId:
        return parse_execution_id(member, parts)

    def eligible() -> None:
        if on_eligible is not None:
            on_eligible()

    async def mark_expired(member: str, now: int, lane: str | None) -> None:
        await fn.lease.mark_lease_expired_if_due(eid_of(member))

    async def promote(member: str, now: int, lane: str | None) -> None:
        reply = await fn.scheduling.promote_delayed(eid_of(member), lane or "", now)
        if reply.outcome == "promoted":
            eligible()

    async def expire_attempt(member: str, now: int, lane: str | None) -> None:
        await fn.execution.expire_execution(eid_of(member), "attempt_timeout")

    async def expire_deadline(member: str, now: int, lane: str | None) -> None:
        await fn.execution.expire_execution(eid_of(member), "execution_deadline")

    def interval(var: str) -> int:
        return config.interval_ms(var)

    route = RouteUnblocker(store, fn, registry, eligible)
    admitted = AdmissionUnblocker(
        store, fn, config.budget_partitions, config.quota_partitions, eligible, unblocker
    )
    trimmer = RetentionTrimmer(store, parts)
    for scanner in (
        Scanner("lease_expiry", interval("FF_LEASE_EXPIRY_INTERVAL_MS"),
                lambda p, _: p.lease_expiry, mark_expired),
        Scanner("delayed_promoter", interval("FF_DELAYED_PROMOTER_INTERVAL_MS"),
                lambda p, lane: p.lane(lane or "", "delayed"), promote, per_lane=True),
        Scanner("attempt_timeout", interval("FF_ATTEMPT_TIMEOUT_INTERVAL_S"),
                lambda p, _: p.attempt_timeout, expire_attempt),
        Scanner("execution_deadline", interval("FF_EXECUTION_DEADLINE_INTERVAL_S"),
                lambda p, _: p.execution_deadline, expire_deadline),
        Scanner("unblock", interval("FF_UNBLOCK_INTERVAL_S"),
                lambda p, lane: p.lane(lane or "", "blocked:route"), route.action,
                per_lane=True, batch=UNBLOCK_BATCH, whole_index=True),
        Scanner("unblock_budget", interval("FF_UNBLOCK_INTERVAL_S"),
                lambda p, lane: p.lane(lane or "", "blocked:budget"), admitted.budget,
                per_lane=True, batch=UNBLOCK_BATCH, whole_index=True),
        Scanner("unblock_quota", interval("FF_UNBLOCK_INTERVAL_S"),
                lambda p, lane: p.lane(lane or "", "blocked:quota"), admitted.quota,
                per_lane=True, batch=UNBLOCK_BATCH, whole_index=True),
        Scanner("retention_trimmer", interval("FF_RETENTION_TRIMMER_INTERVAL_S"),
                lambda p, lane: p.lane(lane or "", "terminal"), trimmer.action,
                per_lane=True, batch=RETENTION_BATCH, age_ms=RETENTION_MS),
    ):  # fmt: skip
        scanners.add(scanner)
    scanners.reconciler = IndexReconciler(
        store, fn, parts, interval("FF_INDEX_RECONCILER_INTERVAL_S")
    )
    return scanners


class RouteUnblocker:
    """Route-blocked executions return to eligible once some single live worker covers them."""

    def __init__(
        self,
        store: Store,
        fn: Functions,
        registry: WorkerRegistry,
        on_eligible: Callable[[], None] | None,
    ) -> None:
        self.store, self.fn, self.registry, self.on_eligible = store, fn, registry, on_eligible
        self._sets: list[frozenset[str]] = []
        self._read_for: int | None = None

    async def _worker_sets(self, cycle_now: int) -> list[frozenset[str]]:
        """Read once per scanner cycle (`now` is the cycle's server time), so a worker that
        registers is seen by the next unblock pass (docs/lifecycle.md#capability-routing), not after
        a cache TTL."""
        if cycle_now != self._read_for:
            self._sets = await self.registry.live_capability_sets()
            self._read_for = cycle_now
        return self._sets

    async def action(self, member: str, now: int, lane: str | None) -> None:
        eid = parse_execution_id(member, 1 << 16)
        reason, required = [
            text(v) for v in await self.store.call(
                "HMGET", ExecKeys(eid).core, "blocking_reason", "required_capabilities"
            )
        ]  # fmt: skip
        if reason != "waiting_for_capable_worker":
            return
        need = frozenset(t for t in required.split(",") if t)
        if need and not any(need <= caps for caps in await self._worker_sets(now)):
            return
        try:
            await self.fn.admission.unblock_execution(eid, "waiting_for_capable_worker")
        except FlowFabricError as exc:
            if exc.code != "execution_not_eligible":  # benign: already moved on
                raise
            return
        if self.on_eligible is not None:
            self.on_eligible()


class AdmissionUnblocker:
    """Budget- and quota-blocked executions return to eligible once the condition that blocked
    them has cleared (docs/lifecycle.md#admission-blocks): every attached strict budget has
    headroom; the quota's window (expired entries left out) is below its rate and its
    concurrency counter below its cap. Reads only; a read that fails leaves it blocked.

    This is the backstop of the event-driven wakes (`engine/unblock.py`): what it returns also
    leaves the waiters indexes it was registered in."""

    def __init__(
        self,
        store: Store,
        fn: Functions,
        budget_partitions: int,
        quota_partitions: int,
        on_eligible: Callable[[], None] | None,
        unblocker: Unblocker | None = None,
    ) -> None:
        self.store, self.fn, self.on_eligible = store, fn, on_eligible
        self.budget_partitions, self.quota_partitions = budget_partitions, quota_partitions
        self.unblocker = unblocker

    async def _core(self, member: str) -> tuple[ExecutionId, str, str, str, str]:
        eid = parse_execution_id(member, 1 << 16)
        reason, bids, qid, key = (
            text(v) for v in await self.store.call(
                "HMGET", ExecKeys(eid).core, "blocking_reason", "budget_ids", "quota_policy_id",
                "concurrency_key",
            )
        )  # fmt: skip
        return eid, reason, bids, qid, key

    async def budget(self, member: str, now: int, lane: str | None) -> None:
        eid, reason, bids, qid, key = await self._core(member)
        if reason != BUDGET_REASON:
            return
        try:
            ids = tuple(b for b in bids.split(",") if b)
            if await exhausted_budget(self.store, self.budget_partitions, ids):
                return
        except FlowFabricError as exc:
            log.debug("budget unblock of %s: %s", member, exc.code)
            return
        if await self._unblock(eid, BUDGET_REASON) and self.unblocker is not None:
            await self.unblocker.forget(eid, bids, qid, key)

    async def quota(self, member: str, now: int, lane: str | None) -> None:
        eid, reason, bids, qid, key = await self._core(member)
        if reason != QUOTA_REASON:
            return
        try:
            uuid.UUID(qid)
        except ValueError:
            pass  # names no policy: nothing holds it back
        else:
            keys = QuotaKeys.of(quota_partition(qid, self.quota_partitions), qid, key)
            try:
                if not await quota_clear(self.store, keys):
                    return
            except FlowFabricError as exc:
                log.debug("quota unblock of %s: %s", member, exc.code)
                return
        if await self._unblock(eid, QUOTA_REASON) and self.unblocker is not None:
            await self.unblocker.forget(eid, bids, qid, key)

    async def _unblock(self, eid: ExecutionId, reason: str) -> bool:
        try:
            await self.fn.admission.unblock_execution(eid, reason)
        except FlowFabricError as exc:
            if exc.code != "execution_not_eligible":  # benign: already moved on
                raise
            return False
        if self.on_eligible is not None:
            self.on_eligible()
        return True


class RetentionTrimmer:
    """Deletes terminal executions older than the retention window (plain commands, one slot)."""

    def __init__(self, store: Store, partitions: int) -> None:
        self.store, self.partitions = store, partitions

    async def action(self, member: str, now: int, lane: str | None) -> None:
        await self.purge(parse_execution_id(member, self.partitions), lane or "")

    async def purge(self, eid: ExecutionId, lane: str) -> None:
        k, p = ExecKeys(eid), PartitionKeys(eid.tag)
        core = await self.store.call("HMGET", k.core, "lifecycle_phase", "total_attempt_count")
        phase, total = text(core[0]), int(text(core[1]) or 0)
        if phase and phase != "terminal":
            # replayed since it was indexed: only drop the stale index entry
            await self.store.call("ZREM", p.lane(lane, "terminal"), str(eid))
            return
        pipe = self.store.pipeline()
        pipe.smembers(k.waitpoints)
        pipe.zrange(k.signals, 0, -1)
        waitpoints, signals = await self.store.run_pipeline(pipe)
        keys = [k.core, k.payload, k.result, k.policy, k.tags, k.claim_grant, k.lease_current,
                k.lease_history, k.attempts, k.suspension_current, k.waitpoints,
                k.signals]  # fmt: skip
        for raw in waitpoints or ():
            w = WaitpointKeys(eid.tag, text(raw))
            keys += [w.waitpoint, w.condition, w.stream]
        for raw in signals or ():
            keys += [signal_key(eid.tag, text(raw)), signal_payload_key(eid.tag, text(raw))]
        for i in range(total):
            keys += [k.attempt(i), k.attempt_usage(i), k.attempt_policy(i), k.stream(i),
                     k.stream_meta(i)]  # fmt: skip
        pipe = self.store.pipeline()
        pipe.delete(*keys)
        pipe.zrem(p.lane(lane, "terminal"), str(eid))
        pipe.srem(p.all_executions, str(eid))
        await self.store.run_pipeline(pipe)


class IndexReconciler:
    """Walks `all_executions` (SSCAN) and repairs index membership drift via a function."""

    def __init__(self, store: Store, fn: Functions, partitions: int, interval_ms: int):
        self.store, self.fn, self.partitions, self.interval_ms = store, fn, partitions, interval_ms

    async def run_cycle(self) -> int:
        repaired = 0
        # only the partitions that hold executions (one ff_probe_due per node: engine/probe.py)
        index = PartitionKeys.of(0).all_executions.removeprefix(PartitionKeys.of(0).index(""))
        for part in await partitions_with_work(
            self.store, range(self.partitions), index, test="any"
        ):
            key = PartitionKeys.of(part).all_executions
            cursor = 0
            while True:
                cursor, members = await self.store.call(
                    "SSCAN", key, cursor, "COUNT", RECONCILE_BATCH
                )
                for raw in members:
                    try:
                        eid = parse_execution_id(text(raw), self.partitions)
                        reply = await self.fn.maintenance.reconcile_indexes(eid)
                    except FlowFabricError as exc:
                        log.debug("reconcile %s: %s", text(raw), exc.code)
                        continue
                    if reply.outcome == "repaired":
                        repaired += 1
                        log.warning("index reconciler repaired %s", text(raw))
                cursor = int(cursor)
                if cursor == 0:
                    break
        return repaired
