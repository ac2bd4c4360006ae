"""`lua/maintenance.lua` and `lua/version.lua`: index repair, the guarded repair of records past
the bounds, and the library version."""

from __future__ import annotations

from dataclasses import dataclass

from flowfabric.server.valkey.functions.core import (
    Decl,
    arg,
    call,
    ek,
    exec_ctx,
    ok,
    record,
    routed,
    tail,
)
from flowfabric.server.valkey.ids import ExecutionId
from flowfabric.server.valkey.store import Store


@dataclass(frozen=True)
class Reconciled:
    """`ok` | `repaired <added> <removed>` | `not_found` | `unknown_state`."""

    outcome: str
    added: str = ""
    removed: str = ""


@dataclass(frozen=True)
class Repaired:
    """`ok` | `not_found` | `orphan_removed` | `young_orphan` | `clamped <fields CSV>`."""

    outcome: str
    fields: str = ""


RECONCILE: Decl[Reconciled] = Decl(
    "ff_reconcile_indexes", (ek("core"),), (arg("execution_id"),), ok(record(Reconciled))
)
REPAIR: Decl[Repaired] = Decl(
    "ff_repair_execution", (ek("core"),), (arg("execution_id"), arg("min_age_ms", "int")),
    ok(record(Repaired)),
)  # fmt: skip
# ff_version replies with the bare version string (not an outcome array); Store reads it on
# every primary itself (Store.loaded_versions). Declared for the registry and read-only checks.
VERSION: Decl[None] = Decl("ff_version", (), (), {}, read_only=True)

# ff_probe_due (lua/probe.lua) reads many partitions of one node and replies with a flat array,
# not an outcome; the scanners call it themselves (engine/scanners.py). Declared for the
# registry and read-only checks.
PROBE_DUE: Decl[None] = Decl(
    "ff_probe_due", (routed("route"),),
    (arg("test"), arg("upper"), arg("index"), arg("per_lane"), arg("tag_count", "int"),
     tail("tags_and_lanes")),
    {}, read_only=True,
)  # fmt: skip

DECLS = (RECONCILE, REPAIR, VERSION, PROBE_DUE)


class MaintenanceFunctions:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def reconcile_indexes(self, eid: ExecutionId) -> Reconciled:
        return await call(self.store, RECONCILE, exec_ctx(eid), {"execution_id": str(eid)})

    async def repair_execution(self, eid: ExecutionId, min_age_ms: int) -> Repaired:
        values = {"execution_id": str(eid), "min_age_ms": min_age_ms}
        return await call(self.store, REPAIR, exec_ctx(eid), values)
