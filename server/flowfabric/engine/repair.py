"""The guarded repair sweep (docs/architecture.md#repair-sweep): finds execution records an older
version left half-written or past today's bounds and repairs each with `ff_repair_execution`.

Admin-triggered (AdminService.RepairSweep), never a background scanner: the records it looks for
are exactly the ones no index reaches (a create that failed half-way), so it walks the keyspace
with `SCAN MATCH ff:exec:*:core` on every primary, which the scanners never do. The function
decides everything inside its atomic call, on guards a live record cannot meet (not in
`all_executions`, in no lane set, never claimed, older than `min_age_ms`), so the sweep is
idempotent and safe to run beside live traffic: a second run repairs nothing. Every repair is
logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from flowfabric.server.valkey.codec import text
from flowfabric.server.valkey.errors import FlowFabricError
from flowfabric.server.valkey.functions import Functions
from flowfabric.server.valkey.ids import parse_execution_id
from flowfabric.server.valkey.store import Store

log = logging.getLogger("flowfabric.repair")

SCAN_COUNT = 500
LISTED_MAX = 100  # execution ids named in the report; the counts cover every repair


@dataclass
class RepairReport:
    """What one sweep did."""

    scanned: int = 0
    orphans_removed: int = 0
    clamped: int = 0
    skipped: int = 0  # young orphans and records the function refused
    repaired_ids: list[str] = field(default_factory=list)

    def note(self, eid: str) -> None:
        if len(self.repaired_ids) < LISTED_MAX:
            self.repaired_ids.append(eid)


def execution_id_of(core_key: str) -> str:
    """`ff:exec:{fp:N}:<eid>:core` -> `<eid>`."""
    rest = core_key.removeprefix("ff:exec:")
    return rest[rest.find("}") + 2 :].removesuffix(":core")  # past the routing tag and its ':'


async def repair_sweep(
    store: Store, fn: Functions, partitions: int, min_age_ms: int
) -> RepairReport:
    """One pass over every execution core of the keyspace."""
    report = RepairReport()
    async for raw in store.client.scan_iter(match="ff:exec:*:core", count=SCAN_COUNT):
        key = text(raw)
        report.scanned += 1
        try:
            eid = parse_execution_id(execution_id_of(key), partitions)
            reply = await fn.maintenance.repair_execution(eid, min_age_ms)
        except FlowFabricError as exc:
            if exc.code in ("backend_unavailable", "backend_timeout"):
                raise
            log.warning("repair sweep: %s left alone: %s", key, exc.code)
            report.skipped += 1
            continue
        if reply.outcome == "orphan_removed":
            report.orphans_removed += 1
            report.note(str(eid))
            log.warning("repair sweep: removed orphaned execution %s (no index reached it)", eid)
        elif reply.outcome == "clamped":
            report.clamped += 1
            report.note(str(eid))
            log.warning("repair sweep: %s clamped to the bounds: %s", eid, reply.fields)
        elif reply.outcome == "young_orphan":
            report.skipped += 1
            log.info("repair sweep: %s looks orphaned but is younger than %d ms", eid, min_age_ms)
    log.info(
        "repair sweep done: %d scanned, %d orphans removed, %d clamped, %d skipped",
        report.scanned, report.orphans_removed, report.clamped, report.skipped,
    )  # fmt: skip
    return report
