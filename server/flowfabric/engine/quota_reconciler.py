"""The quota reconciler (docs/budgets.md#reconcilers): rebuilds each quota bucket's slots from
the live leases, a whole-pass job over the quota partitions `{q:K}` run beside the scanners.

Per policy of `ff:idx:{q:K}:quota_policies`, for the policy-wide bucket and every concurrency
key of the policy's `...:keys` index: read the admitted members older than `GRACE_MS`, check
each one's core on its own execution partition, and hand those that hold no live lease to
`ff_reconcile_quota_policy`, which removes them (only while their admission time is still the
one read, so a re-admission in between keeps its slot), trims the window, sets the counter to
the admitted set's size and drops an empty key from the index, in one call.

Several servers may run it at once: the reads decide nothing on their own and the function
re-checks every member's score, so a repair repeated by another server changes nothing.
"""

from __future__ import annotations

import logging

from flowfabric.server.valkey.codec import text
from flowfabric.server.valkey.errors import FlowFabricError
from flowfabric.server.valkey.functions import Functions
from flowfabric.server.valkey.functions.quota import RECONCILE_PAIRS
from flowfabric.server.valkey.ids import parse_execution_id
from flowfabric.server.valkey.keys import ExecKeys, QuotaKeys
from flowfabric.server.valkey.store import Store

log = logging.getLogger("flowfabric.scanners")

TRANSPORT = frozenset({"backend_unavailable", "backend_timeout"})
SCAN_COUNT = 100

#: An admission younger than this is never freed by the reconciler: between the admission and
#: the lease the execution is not yet `active` (docs/budgets.md#reconcilers).
GRACE_MS = 30_000
#: Admitted members read per page.
PAGE = 1000
#: The only phase whose executions hold a slot: leased, or expired/revoked awaiting the reclaim
#: that continues the same admitted attempt.
HOLDING_PHASE = "active"


async def sscan_all(store: Store, key: str) -> list[str]:
    """Every member of a set, by SSCAN until the cursor wraps (duplicates dropped); the
    budget and quota jobs walk their partition indexes with it."""
    seen: dict[str, None] = {}
    cursor = 0
    while True:
        cursor, members = await store.call("SSCAN", key, cursor, "COUNT", SCAN_COUNT)
        for m in members:
            seen[text(m)] = None
        cursor = int(cursor)
        if cursor == 0:
            return list(seen)


def _pairs(reply: list[object]) -> list[tuple[object, object]]:
    """A WITHSCORES reply as (member, score), whether the client paired it or not."""
    if reply and isinstance(reply[0], list | tuple):
        return [(p[0], p[1]) for p in reply]  # type: ignore[index]
    return list(zip(reply[::2], reply[1::2], strict=True))


class QuotaReconciler:
    """Frees the slots of admitted work that holds no live lease and repairs counters (see the
    module docstring)."""

    name = "quota_reconciler"

    def __init__(self, store: Store, fn: Functions, partitions: int, interval_ms: int) -> None:
        self.store, self.fn, self.partitions, self.interval_ms = store, fn, partitions, interval_ms

    async def holds_slot(self, execution_id: str) -> bool:
        """Whether the execution may hold a slot: its core is `active`, or a claim grant
        (issued after its admission, consumed by the claim) is still live."""
        try:
            eid = parse_execution_id(execution_id, 1 << 16)
        except FlowFabricError:
            return False  # names no execution: nothing can hold it
        keys = ExecKeys(eid)
        if text(await self.store.call("HGET", keys.core, "lifecycle_phase")) == HOLDING_PHASE:
            return True
        return bool(await self.store.call("EXISTS", keys.claim_grant))

    async def stale(self, bucket: QuotaKeys) -> list[tuple[str, int]]:
        """(execution id, admission time) of the bucket's members past the grace that hold no
        live lease."""
        cutoff = await self.store.time_ms() - GRACE_MS
        found: list[tuple[str, int]] = []
        offset = 0
        while True:
            page = await self.store.call(
                "ZRANGEBYSCORE", bucket.admitted, "-inf", cutoff, "WITHSCORES", "LIMIT",
                offset, PAGE,
            )  # fmt: skip
            pairs = _pairs(page)
            for raw, score in pairs:
                eid = text(raw)
                if not await self.holds_slot(eid):
                    found.append((eid, int(float(score))))  # type: ignore[arg-type]
            if len(pairs) < PAGE:
                return found
            offset += PAGE

    async def reconcile_bucket(self, bucket: QuotaKeys) -> tuple[int, bool, bool]:
        """(slots freed, counter drifted, policy gone) for one bucket."""
        stale = await self.stale(bucket)
        freed, drifted = 0, False
        for at in range(0, max(len(stale), 1), RECONCILE_PAIRS):
            r = await self.fn.quota.reconcile_bucket(bucket, stale[at : at + RECONCILE_PAIRS])
            if r.removed_policy:
                return freed, drifted, True
            freed, drifted = freed + r.removed, drifted or r.drifted
        return freed, drifted, False

    async def reconcile(self, keys: QuotaKeys) -> int:
        """One policy, every bucket; the number of buckets changed (slots freed or a counter
        repaired), 1 when the policy was gone and left the index."""
        changed = 0
        buckets = ["", *sorted(await sscan_all(self.store, keys.keys_index))]
        for key in buckets:
            bucket = keys.bucket(key)
            freed, drifted, gone = await self.reconcile_bucket(bucket)
            if gone:
                return 1
            if freed or drifted:
                changed += 1
                log.warning(
                    "quota reconciler: %s%s: %d slot(s) freed, counter %s",
                    keys.quota_policy_id, f" key {key}" if key else "", freed,
                    "repaired" if drifted else "in step",
                )  # fmt: skip
        return changed

    async def run_cycle(self) -> int:
        changed = 0
        for part in range(self.partitions):
            for qid in await sscan_all(self.store, QuotaKeys.of(part).policies):
                try:
                    changed += await self.reconcile(QuotaKeys.of(part, qid))
                except FlowFabricError as exc:
                    if exc.code in TRANSPORT:
                        raise
                    log.warning("quota reconciler: %s: %s", qid, exc.code)
        return changed
