"""`lua/admission.lua`: block and unblock an execution for admission."""

from __future__ import annotations

from flowfabric.server.valkey.functions.core import (
    Decl,
    Outcome,
    arg,
    call,
    ek,
    exec_ctx,
    ok,
    record,
    routed,
)
from flowfabric.server.valkey.ids import ExecutionId
from flowfabric.server.valkey.store import Store

BLOCK: Decl[Outcome] = Decl(
    "ff_block_execution_for_admission",
    (ek("core"), routed("lane eligible"), routed("target blocked index")),
    (arg("execution_id"), arg("blocking_reason"), arg("blocking_detail")),
    ok(record(Outcome)),
)
UNBLOCK: Decl[Outcome] = Decl(
    "ff_unblock_execution",
    (ek("core"), routed("source blocked index"), routed("lane eligible")),
    (arg("execution_id"), arg("expected_blocking_reason")),
    ok(record(Outcome)),
)

DECLS = (BLOCK, UNBLOCK)


class AdmissionFunctions:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def block_execution(self, eid: ExecutionId, reason: str, detail: str) -> Outcome:
        """`blocked`."""
        values = {"execution_id": str(eid), "blocking_reason": reason, "blocking_detail": detail}
        return await call(self.store, BLOCK, exec_ctx(eid), values)

    async def unblock_execution(self, eid: ExecutionId, expected_reason: str) -> Outcome:
        """`unblocked`."""
        values = {"execution_id": str(eid), "expected_blocking_reason": expected_reason}
        return await call(self.store, UNBLOCK, exec_ctx(eid), values)
