"""`lua/lease.lua`: renew, mark expired, revoke, and the reclaim grant and claim."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from flowfabric.server.valkey.codec import Reply, hash_to_dict
from flowfabric.server.valkey.errors import FlowFabricError
from flowfabric.server.valkey.functions.core import (
    Batch,
    Claimer,
    Decl,
    Fence,
    Leased,
    Outcome,
    arg,
    call,
    call_batch,
    ek,
    exec_ctx,
    key,
    ok,
    opt,
    pk,
    record,
    routed,
)
from flowfabric.server.valkey.ids import ExecutionId
from flowfabric.server.valkey.store import Store


@dataclass(frozen=True)
class Renewed:
    expires_at: int


@dataclass(frozen=True)
class Revoked:
    outcome: str
    lease_id: str
    lease_epoch: int


@dataclass(frozen=True)
class Granted:
    execution_id: str
    grant_expires_at: int


@dataclass(frozen=True)
class ReclaimLimit:
    """`OK max_reclaims_exceeded`: the execution is now terminal failed."""

    outcome: str = "max_reclaims_exceeded"


@dataclass(frozen=True)
class Reclaimed(Leased):
    """A reclaim's lease and what the worker needs to run the execution (as in a batch claim
    row), so the caller does not re-read it."""

    payload: bytes = b""
    payload_encoding: str = ""
    execution_kind: str = ""
    namespace: str = ""
    priority: int = 0
    flow_id: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    trace_context: str = ""  # stored form (valkey/tracecontext.py)


def _reclaimed(reply: Reply) -> Reclaimed | ReclaimLimit:
    if reply.str(0) == "max_reclaims_exceeded":
        return ReclaimLimit()
    lease = record(Leased)(reply)
    tags = reply.values[12] if len(reply.values) > 12 else []
    return Reclaimed(
        lease.lease_id, lease.lease_epoch, lease.lease_expires_at, lease.attempt_id,
        lease.attempt_index, lease.attempt_type, payload=reply.raw(6),
        payload_encoding=reply.str(7), execution_kind=reply.str(8), namespace=reply.str(9),
        priority=int(reply.str(10) or 0), flow_id=reply.str(11), tags=hash_to_dict(tags),
        trace_context=reply.str(13) if len(reply.values) > 13 else "",
    )  # fmt: skip


RENEW: Decl[Renewed] = Decl(
    "ff_renew_lease",
    (ek("core"), ek("lease_current"), ek("lease_history"), pk("lease_expiry")),
    (arg("execution_id"), arg("attempt_index", "int"), arg("attempt_id"), arg("lease_id"),
     opt("lease_epoch"), arg("lease_ttl_ms", "int"), arg("lease_history_grace_ms", "int")),
    ok(record(Renewed)),
)  # fmt: skip
MARK_EXPIRED: Decl[Outcome] = Decl(
    "ff_mark_lease_expired_if_due",
    (ek("core"), ek("lease_current"), pk("lease_expiry"), ek("lease_history")),
    (arg("execution_id"),),
    {"OK": record(Outcome), "ALREADY_SATISFIED": record(Outcome)},
)
REVOKE: Decl[Revoked | Outcome] = Decl(
    "ff_revoke_lease",
    (ek("core"), ek("lease_current"), ek("lease_history"), pk("lease_expiry"),
     routed("holder's worker leases")),
    (arg("execution_id"), arg("expected_lease_id"), arg("revoke_reason")),
    {"OK": record(Revoked), "ALREADY_SATISFIED": record(Outcome)},
)  # fmt: skip
GRANT_ARGV = (
    arg("execution_id"), arg("worker_id"), arg("worker_instance_id"), arg("lane_id"),
    arg("capability_hash"), arg("grant_ttl_ms", "int"), arg("route_snapshot_json", default=""),
    arg("admission_summary", default=""), arg("worker_capabilities_csv"),
)  # fmt: skip
RECLAIM_GRANT: Decl[Granted] = Decl(
    "ff_issue_reclaim_grant",
    (ek("core"), ek("claim_grant"), pk("lease_expiry")),
    GRANT_ARGV,
    ok(record(Granted)),
    durable=False,
)
RECLAIM: Decl[Reclaimed | ReclaimLimit] = Decl(
    "ff_reclaim_execution",
    (ek("core"), ek("claim_grant"), routed("old attempt hash"), routed("old stream meta"),
     routed("new attempt hash"), routed("new attempt usage"), ek("attempts"),
     ek("lease_current"), ek("lease_history"), pk("lease_expiry"),
     key("new worker's leases", lambda c: c.part.worker_leases(c.worker_instance_id)),
     routed("lane active"), pk("attempt_timeout"), pk("execution_deadline")),
    (arg("execution_id"), arg("worker_id"), arg("worker_instance_id"), arg("lane_id"),
     arg("lease_id"), arg("lease_ttl_ms", "int"), arg("attempt_id"),
     arg("attempt_policy_json", default="")),
    ok(_reclaimed),
)  # fmt: skip

REVOKE_FOR_BUDGET: Decl[Outcome] = Decl(
    "ff_revoke_for_budget",
    (ek("core"), ek("lease_current"), ek("lease_history"), pk("lease_expiry"),
     pk("attempt_timeout")),
    (arg("execution_id"), arg("budget_id"), arg("detail", default="")),
    {"OK": record(Outcome), "ALREADY_SATISFIED": record(Outcome)},
)  # fmt: skip

RENEWS: Batch[Renewed] = Batch("ff_renew_leases", RENEW)
BATCHES = (RENEWS,)

DECLS = (RENEW, MARK_EXPIRED, REVOKE, RECLAIM_GRANT, RECLAIM, REVOKE_FOR_BUDGET)


def grant_values(eid: ExecutionId, who: Claimer, grant_ttl_ms: int) -> dict[str, object]:
    return {
        "execution_id": str(eid), "worker_id": who.worker_id,
        "worker_instance_id": who.worker_instance_id, "lane_id": who.lane_id,
        "capability_hash": who.capability_hash, "grant_ttl_ms": grant_ttl_ms,
        "worker_capabilities_csv": who.capabilities_csv,
    }  # fmt: skip


class LeaseFunctions:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def renew_lease(
        self, eid: ExecutionId, attempt_index: int, fence: Fence, lease_ttl_ms: int,
        history_grace_ms: int = 5000,
    ) -> Renewed:  # fmt: skip
        return await call(self.store, RENEW, exec_ctx(eid), {
            "execution_id": str(eid), "attempt_index": attempt_index,
            "attempt_id": fence.attempt_id, "lease_id": fence.lease_id,
            "lease_epoch": fence.lease_epoch, "lease_ttl_ms": lease_ttl_ms,
            "lease_history_grace_ms": history_grace_ms,
        })  # fmt: skip

    async def renew_leases(
        self, items: Sequence[tuple[ExecutionId, int, Fence, int, int]]
    ) -> list[Renewed | FlowFabricError]:
        """`renew_lease` for each (eid, attempt_index, fence, lease_ttl_ms, history_grace_ms),
        all on one partition, in one FCALL: per item its reply or its error, in order."""
        return await call_batch(self.store, RENEWS, [(exec_ctx(eid), {
            "execution_id": str(eid), "attempt_index": idx, "attempt_id": fence.attempt_id,
            "lease_id": fence.lease_id, "lease_epoch": fence.lease_epoch, "lease_ttl_ms": ttl,
            "lease_history_grace_ms": grace,
        }) for eid, idx, fence, ttl, grace in items])  # fmt: skip

    async def mark_lease_expired_if_due(self, eid: ExecutionId) -> Outcome:
        return await call(self.store, MARK_EXPIRED, exec_ctx(eid), {"execution_id": str(eid)})

    async def revoke_lease(
        self, eid: ExecutionId, expected_lease_id: str, reason: str
    ) -> Revoked | Outcome:
        """`Revoked`, or `Outcome` already_revoked | already_expired."""
        values = {"execution_id": str(eid), "expected_lease_id": expected_lease_id,
                  "revoke_reason": reason}  # fmt: skip
        return await call(self.store, REVOKE, exec_ctx(eid), values)

    async def revoke_for_budget(self, eid: ExecutionId, budget_id: str, detail: str) -> Outcome:
        """`revoked`, `not_active` or `not_attached` (docs/budgets.md#hard-limit-actions)."""
        values = {"execution_id": str(eid), "budget_id": budget_id, "detail": detail}
        return await call(self.store, REVOKE_FOR_BUDGET, exec_ctx(eid), values)

    async def issue_reclaim_grant(
        self, eid: ExecutionId, who: Claimer, grant_ttl_ms: int
    ) -> Granted:
        values = grant_values(eid, who, grant_ttl_ms)
        return await call(self.store, RECLAIM_GRANT, exec_ctx(eid), values)

    async def reclaim_execution(
        self, eid: ExecutionId, who: Claimer, lease_id: str, lease_ttl_ms: int, attempt_id: str
    ) -> Reclaimed | ReclaimLimit:
        ctx = exec_ctx(eid, worker_instance_id=who.worker_instance_id)
        return await call(self.store, RECLAIM, ctx, {
            "execution_id": str(eid), "worker_id": who.worker_id,
            "worker_instance_id": who.worker_instance_id, "lane_id": who.lane_id,
            "lease_id": lease_id, "lease_ttl_ms": lease_ttl_ms, "attempt_id": attempt_id,
        })  # fmt: skip
