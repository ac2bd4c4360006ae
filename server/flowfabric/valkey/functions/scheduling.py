"""`lua/scheduling.lua`: claim grants, claims (single, resumed, batch), delayed promotion and
priority changes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from flowfabric.server.valkey.codec import Reply, hash_to_dict, text
from flowfabric.server.valkey.errors import FlowFabricError
from flowfabric.server.valkey.functions.core import (
    Claimer,
    Decl,
    KeyCtx,
    Leased,
    Outcome,
    arg,
    call,
    ek,
    exec_ctx,
    key,
    lane,
    ok,
    pk,
    record,
    routed,
    tail,
)
from flowfabric.server.valkey.functions.lease import GRANT_ARGV, Granted, grant_values
from flowfabric.server.valkey.ids import ExecutionId
from flowfabric.server.valkey.keys import PartitionKeys
from flowfabric.server.valkey.store import Store


@dataclass(frozen=True)
class BatchClaim:
    """One `claimed` row of ff_claim_batch."""

    execution_id: str
    lease_id: str
    lease_epoch: int
    lease_expires_at: int
    attempt_id: str
    attempt_index: int
    attempt_type: str
    resumed: bool
    payload: bytes
    payload_encoding: str
    execution_kind: str
    namespace: str
    priority: int
    flow_id: str
    tags: dict[str, str] = field(default_factory=dict)
    trace_context: str = ""  # stored form (valkey/tracecontext.py)
    # how long an eligible head waited to be claimed; None for a reclaim (docs/observability.md)
    claim_wait_ms: int | None = None


@dataclass(frozen=True)
class Batch:
    claimed: tuple[BatchClaim, ...]
    mismatched: tuple[str, ...]
    reply_bytes: int = 0  # what the claimed rows cost, as counted against max_reply_bytes
    # heads with budgets or a quota attached, not leased: the caller admits them
    # (docs/lifecycle.md#admission)
    needs_admission: tuple[str, ...] = ()


@dataclass(frozen=True)
class AdmittedBatch:
    """ff_claim_admitted: the leases, in the order asked, and why each other id was not leased
    (`mismatch`, `full` or `skipped`)."""

    claimed: tuple[BatchClaim, ...]
    refused: tuple[tuple[str, str], ...]
    reply_bytes: int = 0


@dataclass(frozen=True)
class PriorityChanged:
    old_priority: int
    new_priority: int


def _row(row: Sequence[object]) -> BatchClaim:
    if not isinstance(row, list | tuple) or len(row) != 17:
        raise FlowFabricError("protocol_error", message=f"ff_claim_batch: bad claimed row {row!r}")
    (eid, lease_id, epoch, expires, attempt_id, index, attempt_type, resumed, payload, encoding,
     kind, namespace, priority, flow_id, tags, trace_context, waited) = row  # fmt: skip
    return BatchClaim(
        execution_id=text(eid), lease_id=text(lease_id), lease_epoch=int(text(epoch)),
        lease_expires_at=int(text(expires)), attempt_id=text(attempt_id),
        attempt_index=int(text(index)), attempt_type=text(attempt_type),
        resumed=text(resumed) == "1",
        payload=payload if isinstance(payload, bytes) else text(payload).encode(),
        payload_encoding=text(encoding), execution_kind=text(kind), namespace=text(namespace),
        priority=int(text(priority) or 0), flow_id=text(flow_id), tags=hash_to_dict(tags),
        trace_context=text(trace_context),
        claim_wait_ms=int(text(waited)) if text(waited) else None,
    )  # fmt: skip


def _batch(reply: Reply) -> Batch:
    claimed = reply.values[0] if reply.values else []
    mismatched = reply.values[1] if len(reply.values) > 1 else []
    used = int(text(reply.values[2])) if len(reply.values) > 2 else 0
    admit = reply.values[3] if len(reply.values) > 3 else []
    return Batch(
        tuple(_row(r) for r in claimed or []),
        tuple(text(m) for m in mismatched or []),
        used,
        tuple(text(m) for m in admit or []),
    )


def _admitted(reply: Reply) -> AdmittedBatch:
    claimed = reply.values[0] if reply.values else []
    flat = [text(v) for v in (reply.values[1] if len(reply.values) > 1 else []) or []]
    used = int(text(reply.values[2])) if len(reply.values) > 2 else 0
    return AdmittedBatch(
        tuple(_row(r) for r in claimed or []),
        tuple(zip(flat[::2], flat[1::2], strict=True)),
        used,
    )


def _worker_leases(c: KeyCtx) -> str:
    return c.part.worker_leases(c.worker_instance_id)


ISSUE_GRANT: Decl[Granted] = Decl(
    "ff_issue_claim_grant",
    (ek("core"), ek("claim_grant"), lane("eligible")),
    GRANT_ARGV,
    ok(record(Granted)),
    durable=False,
)
CLAIM: Decl[Leased] = Decl(
    "ff_claim_execution",
    (ek("core"), ek("claim_grant"), lane("eligible"), pk("lease_expiry"),
     key("claimer's worker leases", _worker_leases), routed("attempt hash"),
     routed("attempt usage"), routed("attempt policy"), ek("attempts"), ek("lease_current"),
     ek("lease_history"), lane("active"), pk("attempt_timeout"), pk("execution_deadline")),
    (arg("execution_id"), arg("worker_id"), arg("worker_instance_id"), arg("lane_id"),
     arg("capability_hash"), arg("lease_id"), arg("lease_ttl_ms", "int"),
     arg("renew_before_ms", "int"), arg("attempt_id"), arg("attempt_policy_json", default=""),
     arg("attempt_timeout_ms", default=""), arg("execution_deadline_at", default="")),
    ok(record(Leased)),
)  # fmt: skip
CLAIM_RESUMED: Decl[Leased] = Decl(
    "ff_claim_resumed_execution",
    (ek("core"), ek("claim_grant"), routed("lane eligible"), pk("lease_expiry"),
     routed("claimer's worker leases"), routed("attempt hash"), ek("lease_current"),
     ek("lease_history"), routed("lane active"), pk("attempt_timeout"),
     pk("execution_deadline")),
    (arg("execution_id"), arg("worker_id"), arg("worker_instance_id"), arg("lane_id"),
     arg("lease_id"), arg("lease_ttl_ms", "int"), arg("current_attempt_index", default=""),
     arg("remaining_attempt_timeout_ms", default="")),
    ok(record(Leased)),
)  # fmt: skip
CLAIM_BATCH: Decl[Batch] = Decl(
    "ff_claim_batch",
    (lane("eligible"), pk("lease_expiry"), pk("attempt_timeout"), pk("execution_deadline")),
    (arg("worker_id"), arg("worker_instance_id"), arg("lane_id"), arg("capability_hash"),
     arg("worker_capabilities_csv"), arg("lease_ttl_ms", "int"), arg("renew_before_ms", "int"),
     arg("max_tasks", "int"), arg("max_scanned", "int"), arg("max_reply_bytes", "int", default=0),
     arg("tenant_weights", default=""), tail("lease_and_attempt_ids")),
    ok(_batch),
)  # fmt: skip
CLAIM_ADMITTED: Decl[AdmittedBatch] = Decl(
    "ff_claim_admitted",
    (lane("eligible"), pk("lease_expiry"), pk("attempt_timeout"), pk("execution_deadline")),
    (arg("worker_id"), arg("worker_instance_id"), arg("lane_id"), arg("capability_hash"),
     arg("worker_capabilities_csv"), arg("lease_ttl_ms", "int"), arg("renew_before_ms", "int"),
     arg("max_reply_bytes", "int", default=0), tail("execution_lease_attempt_ids")),
    ok(_admitted),
)  # fmt: skip
PROMOTE: Decl[Outcome] = Decl(
    "ff_promote_delayed",
    (ek("core"), lane("delayed"), routed("lane eligible")),
    (arg("execution_id"), arg("now_ms", "int")),
    ok(record(Outcome)),
)
CHANGE_PRIORITY: Decl[PriorityChanged] = Decl(
    "ff_change_priority",
    (ek("core"), routed("lane eligible")),
    (arg("execution_id"), arg("new_priority", "int")),
    ok(record(PriorityChanged)),
)

DECLS = (
    ISSUE_GRANT, CLAIM, CLAIM_RESUMED, CLAIM_BATCH, CLAIM_ADMITTED, PROMOTE, CHANGE_PRIORITY,
)  # fmt: skip


class SchedulingFunctions:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def issue_claim_grant(self, eid: ExecutionId, who: Claimer, grant_ttl_ms: int) -> Granted:
        ctx = exec_ctx(eid, lane=who.lane_id)
        return await call(self.store, ISSUE_GRANT, ctx, grant_values(eid, who, grant_ttl_ms))

    async def claim_execution(
        self, eid: ExecutionId, who: Claimer, lease_id: str, lease_ttl_ms: int, attempt_id: str
    ) -> Leased:
        ctx = exec_ctx(eid, lane=who.lane_id, worker_instance_id=who.worker_instance_id)
        return await call(self.store, CLAIM, ctx, {
            "execution_id": str(eid), "worker_id": who.worker_id,
            "worker_instance_id": who.worker_instance_id, "lane_id": who.lane_id,
            "capability_hash": who.capability_hash, "lease_id": lease_id,
            "lease_ttl_ms": lease_ttl_ms, "renew_before_ms": lease_ttl_ms * 2 // 3,
            "attempt_id": attempt_id,
        })  # fmt: skip

    async def claim_resumed_execution(
        self, eid: ExecutionId, who: Claimer, lease_id: str, lease_ttl_ms: int
    ) -> Leased:
        return await call(self.store, CLAIM_RESUMED, exec_ctx(eid), {
            "execution_id": str(eid), "worker_id": who.worker_id,
            "worker_instance_id": who.worker_instance_id, "lane_id": who.lane_id,
            "lease_id": lease_id, "lease_ttl_ms": lease_ttl_ms,
        })  # fmt: skip

    async def claim_batch(
        self, partition: int, who: Claimer, lease_ttl_ms: int, ids: list[tuple[str, str]],
        max_scanned: int, max_reply_bytes: int = 0, tenant_weights: str = "",
    ) -> Batch:  # fmt: skip
        """Up to len(ids) of the lane's due leases (reclaimed) and eligible heads on one
        partition leased in one call, the i-th lease with the i-th (lease_id, attempt_id), the
        rows costing at most `max_reply_bytes` (0 = no cap), namespaces sharing the heads by
        `tenant_weights` (`TenantWeights.argv`; "" = equal shares,
        docs/lifecycle.md#tenant-fairness)."""
        ctx = KeyCtx(tag=PartitionKeys.of(partition).tag, lane=who.lane_id)
        return await call(self.store, CLAIM_BATCH, ctx, {
            "worker_id": who.worker_id, "worker_instance_id": who.worker_instance_id,
            "lane_id": who.lane_id, "capability_hash": who.capability_hash,
            "worker_capabilities_csv": who.capabilities_csv, "lease_ttl_ms": lease_ttl_ms,
            "renew_before_ms": lease_ttl_ms * 2 // 3, "max_tasks": len(ids),
            "max_scanned": max_scanned, "max_reply_bytes": max_reply_bytes,
            "tenant_weights": tenant_weights,
            "lease_and_attempt_ids": [v for pair in ids for v in pair],
        })  # fmt: skip

    async def claim_admitted(
        self, partition: int, who: Claimer, lease_ttl_ms: int,
        triples: Sequence[tuple[str, str, str]], max_reply_bytes: int = 0,
    ) -> AdmittedBatch:  # fmt: skip
        """Lease the admitted heads `triples` (execution_id, lease_id, attempt_id) of one
        partition in one call, in order, the rows costing at most `max_reply_bytes`."""
        ctx = KeyCtx(tag=PartitionKeys.of(partition).tag, lane=who.lane_id)
        return await call(self.store, CLAIM_ADMITTED, ctx, {
            "worker_id": who.worker_id, "worker_instance_id": who.worker_instance_id,
            "lane_id": who.lane_id, "capability_hash": who.capability_hash,
            "worker_capabilities_csv": who.capabilities_csv, "lease_ttl_ms": lease_ttl_ms,
            "renew_before_ms": lease_ttl_ms * 2 // 3, "max_reply_bytes": max_reply_bytes,
            "execution_lease_attempt_ids": [v for t in triples for v in t],
        })  # fmt: skip

    async def promote_delayed(self, eid: ExecutionId, lane_id: str, now_ms: int) -> Outcome:
        values = {"execution_id": str(eid), "now_ms": now_ms}
        return await call(self.store, PROMOTE, exec_ctx(eid, lane=lane_id), values)

    async def change_priority(self, eid: ExecutionId, priority: int) -> PriorityChanged:
        values = {"execution_id": str(eid), "new_priority": priority}
        return await call(self.store, CHANGE_PRIORITY, exec_ctx(eid), values)
