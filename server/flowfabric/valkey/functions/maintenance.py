"""`lua/maintenance.lua` and `lua/version.lua`: index repair and the library version."""

from __future__ import annotations

from dataclasses import dataclass

from flowfabric.server.valkey.functions.core import Decl, arg, call, ek, exec_ctx, ok, record
from flowfabric.server.valkey.ids import ExecutionId
from flowfabric.server.valkey.store import Store


@dataclass(frozen=True)
class Reconciled:
    """`ok` | `repaired <added> <removed>` | `not_found` | `unknown_state`."""

    outcome: str
    added: str = ""
    removed: str = ""


RECONCILE: Decl[Reconciled] = Decl(
    "ff_reconcile_indexes", (ek("core"),), (arg("execution_id"),), ok(record(Reconciled))
)
# ff_version replies with the bare version string (not an outcome array); Store reads it on
# every primary itself (Store.loaded_versions). Declared for the registry and read-only checks.
VERSION: Decl[None] = Decl("ff_version", (), (), {}, read_only=True)

DECLS = (RECONCILE, VERSION)


class MaintenanceFunctions:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def reconcile_indexes(self, eid: ExecutionId) -> Reconciled:
        return await call(self.store, RECONCILE, exec_ctx(eid), {"execution_id": str(eid)})
