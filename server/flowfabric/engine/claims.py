"""What a claim hands a worker (`Claimed`), what it asks for (`ClaimRequest`), and their
construction from the claim and reclaim function replies."""

from __future__ import annotations

from dataclasses import dataclass, field

from flowfabric.server.valkey.functions import Leased
from flowfabric.server.valkey.functions.lease import Reclaimed
from flowfabric.server.valkey.functions.scheduling import BatchClaim
from flowfabric.server.valkey.ids import ExecutionId, parse_execution_id

# claim and reclaim errors that only mean "not this one": the caller moves on
NO_MATCH = (
    "execution_not_eligible", "execution_not_in_eligible_set", "grant_already_exists",
    "execution_not_leaseable", "lease_conflict", "invalid_claim_grant", "claim_grant_expired",
    "execution_not_found", "use_claim_resumed_execution", "execution_not_reclaimable",
)  # fmt: skip


@dataclass(frozen=True)
class ClaimRequest:
    worker_id: str
    worker_instance_id: str
    lanes: tuple[str, ...]
    capabilities_csv: str
    lease_ttl_ms: int
    grant_ttl_ms: int = 10_000
    max_tasks: int = 1


@dataclass
class Claimed:
    """A leased execution with what the worker needs to run it."""

    execution_id: ExecutionId
    lane_id: str
    lease_id: str
    lease_epoch: int
    lease_expires_at: int
    attempt_id: str
    attempt_index: int
    attempt_type: str
    payload: bytes = b""
    payload_encoding: str = ""
    execution_kind: str = ""
    namespace: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    priority: int = 0
    flow_id: str = ""
    resumed: bool = False


def claimed_from_reply(eid: ExecutionId, lane: str, reply: Leased) -> Claimed:
    """A lease reply; a `Reclaimed` reply also carries the inputs."""
    claimed = Claimed(
        execution_id=eid,
        lane_id=lane,
        lease_id=reply.lease_id,
        lease_epoch=reply.lease_epoch,
        lease_expires_at=reply.lease_expires_at,
        attempt_id=reply.attempt_id,
        attempt_index=reply.attempt_index,
        attempt_type=reply.attempt_type or "initial",
    )
    if isinstance(reply, Reclaimed):
        claimed.payload, claimed.payload_encoding = reply.payload, reply.payload_encoding
        claimed.execution_kind, claimed.namespace = reply.execution_kind, reply.namespace
        claimed.tags, claimed.priority = dict(reply.tags), reply.priority
        claimed.flow_id = reply.flow_id
    return claimed


def claimed_from_row(row: BatchClaim, lane: str, partitions: int) -> Claimed:
    """One `claimed` row of ff_claim_batch."""
    return Claimed(
        execution_id=parse_execution_id(row.execution_id, partitions),
        lane_id=lane,
        lease_id=row.lease_id,
        lease_epoch=row.lease_epoch,
        lease_expires_at=row.lease_expires_at,
        attempt_id=row.attempt_id,
        attempt_index=row.attempt_index,
        attempt_type=row.attempt_type or "initial",
        payload=row.payload,
        payload_encoding=row.payload_encoding,
        execution_kind=row.execution_kind,
        namespace=row.namespace,
        tags=dict(row.tags),
        priority=row.priority,
        flow_id=row.flow_id,
        resumed=row.resumed,
    )
