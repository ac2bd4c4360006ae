"""What a claim hands a worker (`Claimed`), what it asks for (`ClaimRequest`), and their
construction from the claim and reclaim function replies."""

from __future__ import annotations

from dataclasses import dataclass, field

from flowfabric.server.valkey.codec import text
from flowfabric.server.valkey.errors import FlowFabricError
from flowfabric.server.valkey.functions import Leased
from flowfabric.server.valkey.functions.lease import Reclaimed
from flowfabric.server.valkey.functions.scheduling import BatchClaim
from flowfabric.server.valkey.ids import ExecutionId, parse_execution_id
from flowfabric.server.valkey.keys import ExecKeys
from flowfabric.server.valkey.store import Store

# claim and reclaim errors that only mean "not this one": the caller moves on
NO_MATCH = (
    "execution_not_eligible", "execution_not_in_eligible_set", "grant_already_exists",
    "execution_not_leaseable", "lease_conflict", "invalid_claim_grant", "claim_grant_expired",
    "execution_not_found", "use_claim_resumed_execution", "execution_not_reclaimable",
)  # fmt: skip


# Fixed cost of one claimed task in a reply on top of its payload, tags, kind, namespace, flow
# id and encoding: ids, numbers and framing (docs/lifecycle.md#claim-reply-size). ff_claim_batch
# counts rows the same way (ROW_BYTES in lua/scheduling.lua).
ROW_BYTES = 512


@dataclass(frozen=True)
class ClaimRequest:
    worker_id: str
    worker_instance_id: str
    lanes: tuple[str, ...]
    capabilities_csv: str
    lease_ttl_ms: int
    grant_ttl_ms: int = 10_000
    max_tasks: int = 1
    # The most the claimed tasks of one reply may cost (row_cost); None = no cap
    max_reply_bytes: int | None = None


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
    trace_context: str = ""  # stored form (valkey/tracecontext.py); "" = none


class Budget:
    """What is left of one reply's byte budget (docs/lifecycle.md#claim-reply-size), spent as
    claims come back: ff_claim_batch reports what its rows cost, the one-at-a-time paths read
    each candidate's cost first (row_costs). None = no cap."""

    def __init__(self, cap: int | None) -> None:
        self.left = cap
        # An admission check that failed in this pass (docs/budgets.md#admission): the pass
        # hands over what it already leased, and raises it only when it leased nothing.
        self.failure: FlowFabricError | None = None
        # heads the admission checks blocked in this call (they left the eligible set)
        self.blocked = 0

    @property
    def cap(self) -> int:
        """The ff_claim_batch max_reply_bytes ARGV: 0 = no cap."""
        return 0 if self.left is None else self.left

    @property
    def spent(self) -> bool:
        """Not even a task with nothing but its fixed cost fits any more."""
        return self.left is not None and self.left < ROW_BYTES

    def fits(self, cost: int) -> bool:
        return self.left is None or cost <= self.left

    def spend(self, cost: int) -> None:
        if self.left is not None:
            self.left -= cost


async def row_costs(store: Store, eids: list[ExecutionId]) -> list[int]:
    """What each execution would cost as a claimed task, counted as ff_claim_batch counts a
    row, read before claiming it: for the claim paths that lease one execution per call."""
    if not eids:
        return []
    pipe = store.pipeline()
    for eid in eids:
        k = ExecKeys(eid)
        pipe.strlen(k.payload)
        pipe.hmget(
            k.core,
            ["payload_encoding", "execution_kind", "namespace", "flow_id", "trace_context"],
        )
        pipe.hgetall(k.tags)
    rows = await store.run_pipeline(pipe)
    out = []
    for i in range(len(eids)):
        size, fields, tags = rows[3 * i : 3 * i + 3]
        variable = sum(len(text(v).encode()) for v in fields or [])
        flat = [v for kv in tags.items() for v in kv] if isinstance(tags, dict) else tags or []
        out.append(ROW_BYTES + int(size or 0) + variable + sum(len(v) for v in flat))
    return out


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
        claimed.flow_id, claimed.trace_context = reply.flow_id, reply.trace_context
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
        trace_context=row.trace_context,
    )
