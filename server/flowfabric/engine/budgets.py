"""The budget and quota scanners (docs/budgets.md#scanners): whole-pass jobs over the budget
partitions `{b:M}` and the quota partitions `{q:K}`, run by `ScannerSet` beside the
per-execution-partition scanners.

| job | index | function | default interval |
|---|---|---|---|
| budget_reset | `ff:idx:{b:M}:budget_resets`, due members (20 per partition per pass) | `ff_reset_budget` (only if due) | `FF_BUDGET_RESET_INTERVAL_S` 15 s |
| budget_reconciler | `ff:idx:{b:M}:budget_policies` (SSCAN); each budget's `inflight` older than the grace | `ff_reconcile_budget`; `ff_release_budget` for work no longer active | `FF_BUDGET_RECONCILER_INTERVAL_S` 30 s |
| quota_reconciler | `ff:idx:{q:K}:quota_policies` (SSCAN) | each bucket's admissions past the grace checked against live leases, then `ff_reconcile_quota_policy` (engine/quota_reconciler.py) | `FF_QUOTA_RECONCILER_INTERVAL_S` 30 s |

Several servers may run these against one Valkey: each step is one atomic function that
re-checks what it acts on (a reset only fires while the budget is still due, so two servers
never reset one budget twice for one period; a reconciler's repair is idempotent).
"""  # noqa: E501

from __future__ import annotations

import logging
from collections.abc import Callable

from flowfabric.server.config import Config
from flowfabric.server.engine.quota_reconciler import QuotaReconciler, sscan_all
from flowfabric.server.valkey.codec import text
from flowfabric.server.valkey.errors import FlowFabricError
from flowfabric.server.valkey.functions import Functions
from flowfabric.server.valkey.ids import parse_execution_id
from flowfabric.server.valkey.keys import BudgetKeys, ExecKeys
from flowfabric.server.valkey.store import Store, server_time_ms

log = logging.getLogger("flowfabric.scanners")

RESET_BATCH = 20
TRANSPORT = frozenset({"backend_unavailable", "backend_timeout"})
#: An in-flight entry this old whose execution is no longer active is released by the
#: reconciler (docs/budgets.md#reservations): longer than any claim grant (60 s), so an
#: admission whose claim is still being made is never taken back.
INFLIGHT_GRACE_MS = 120_000
INFLIGHT_BATCH = 100


OnReset = Callable[[BudgetKeys], None]


class BudgetResetter:
    """Resets every budget whose `next_reset_at` has passed; `on_reset(keys)` after each reset
    this job made (the unblocker wakes the budget's waiters,
    docs/budgets.md#waking-blocked-work)."""

    name = "budget_reset"

    def __init__(
        self, store: Store, fn: Functions, partitions: int, interval_ms: int,
        on_reset: OnReset | None = None,
    ) -> None:  # fmt: skip
        self.store, self.fn, self.partitions, self.interval_ms = store, fn, partitions, interval_ms
        self.on_reset = on_reset

    async def run_cycle(self) -> int:
        done = 0
        now = await server_time_ms(self.store)
        for part in range(self.partitions):
            index = BudgetKeys.of(part).resets
            due = await self.store.call(
                "ZRANGEBYSCORE", index, "-inf", now, "LIMIT", 0, RESET_BATCH
            )
            for raw in due:
                keys = BudgetKeys.of(part, text(raw))
                try:
                    r = await self.fn.budget.reset_budget(keys, only_if_due=True)
                except FlowFabricError as exc:
                    if exc.code in TRANSPORT:
                        raise
                    log.debug("budget reset %s: %s", text(raw), exc.code)
                    continue
                if r.outcome == "reset":
                    done += 1
                    if self.on_reset is not None:
                        self.on_reset(keys)
        return done


class BudgetReconciler:
    """Keeps `budget_policies` to budgets that exist, each non-resetting budget's
    `breached_at` marker in step with its usage, and each budget's in-flight index (and so its
    reservations) to work that is still active: an entry older than `INFLIGHT_GRACE_MS` whose
    execution is not active (its `admission_released` announcement was lost) is released."""

    name = "budget_reconciler"

    def __init__(
        self, store: Store, fn: Functions, partitions: int, interval_ms: int,
        flow_partitions: int = 256, grace_ms: int = INFLIGHT_GRACE_MS,
    ) -> None:  # fmt: skip
        self.store, self.fn, self.partitions, self.interval_ms = store, fn, partitions, interval_ms
        self.flow_partitions, self.grace_ms = flow_partitions, grace_ms
        self.errors = 0

    async def run_cycle(self) -> int:
        changed = 0
        for part in range(self.partitions):
            for bid in await sscan_all(self.store, BudgetKeys.of(part).policies):
                keys = BudgetKeys.of(part, bid)
                try:
                    r = await self.fn.budget.reconcile_budget(keys)
                    if r.outcome != "removed":
                        changed += await self.release_stale(keys)
                except FlowFabricError as exc:
                    if exc.code in TRANSPORT:
                        raise
                    # an unreadable definition stays indexed: counted, never dropped
                    self.errors += 1
                    log.warning("budget reconciler: %s: %s", bid, exc.code)
                    continue
                changed += r.outcome in ("removed", "marked", "cleared")
        return changed

    async def release_stale(self, keys: BudgetKeys) -> int:
        """Release the in-flight entries past the grace whose execution is not active."""
        cutoff = await server_time_ms(self.store) - self.grace_ms
        old = await self.store.call(
            "ZRANGEBYSCORE", keys.inflight, "-inf", cutoff, "LIMIT", 0, INFLIGHT_BATCH
        )
        released = 0
        for raw in (text(m) for m in old):
            try:
                eid = parse_execution_id(raw, self.flow_partitions)
            except FlowFabricError:
                eid = None  # names no execution: nothing can hold it
            if eid is not None:
                phase = text(await self.store.call("HGET", ExecKeys(eid).core, "lifecycle_phase"))
                if phase == "active":
                    continue
            got = await self.fn.budget.release_budget(keys, raw)
            released += got.outcome == "released"
        return released


def budget_jobs(
    config: Config, store: Store, fn: Functions, on_reset: OnReset | None = None
) -> list[BudgetResetter | BudgetReconciler | QuotaReconciler]:
    """The three jobs with the configured intervals, for `ScannerSet.cycles`."""
    b, q = config.budget_partitions, config.quota_partitions
    return [
        BudgetResetter(store, fn, b, config.interval_ms("FF_BUDGET_RESET_INTERVAL_S"), on_reset),
        BudgetReconciler(
            store,
            fn,
            b,
            config.interval_ms("FF_BUDGET_RECONCILER_INTERVAL_S"),
            config.flow_partitions,
        ),
        QuotaReconciler(store, fn, q, config.interval_ms("FF_QUOTA_RECONCILER_INTERVAL_S")),
    ]
