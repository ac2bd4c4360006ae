"""Class C reads of flows (docs/flows.md#reads): the flow record with its member counts and
first failures, one edge, and an execution's edges paged by edge id. No FCALL.

Stored values are parsed strictly: a malformed number or an edge whose endpoint does not match
the adjacency set it was listed from is a `corrupt_record` error, never a silent default.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from flowfabric.server.valkey.codec import hash_to_dict, text
from flowfabric.server.valkey.errors import FlowFabricError
from flowfabric.server.valkey.ids import ExecutionId
from flowfabric.server.valkey.keys import ExecKeys, FlowKeys
from flowfabric.server.valkey.store import Store
from flowfabric.v1 import flow_pb2 as fpb
from flowfabric.v1 import types_pb2 as t

MEMBER_STATES = (
    "waiting", "delayed", "waiting_children", "rate_limited", "active", "suspended",
    "completed", "failed", "cancelled", "expired", "skipped",
)  # fmt: skip
EDGE_FIELDS = frozenset(
    {
        "edge_id", "flow_id", "upstream_execution_id", "downstream_execution_id",
        "dependency_kind", "satisfaction_condition", "data_passing_ref", "edge_state",
        "created_at", "created_by",
    }
)  # fmt: skip


def _int(record: str, fields: dict[str, str], name: str) -> int:
    raw = fields.get(name, "")
    try:
        return int(raw)
    except ValueError:
        raise FlowFabricError(
            "corrupt_record", message=f"{record} field {name} is not an integer: {raw!r}"
        ) from None


@dataclass(frozen=True)
class FlowView:
    snapshot: t.FlowSnapshot
    members_by_state: dict[str, int]
    failures: list[fpb.FlowFailure]


async def describe_flow(store: Store, keys: FlowKeys) -> FlowView | None:
    """The flow record, or None when the flow does not exist."""
    pipe = store.pipeline()
    pipe.hgetall(keys.core)
    pipe.hgetall(keys.tags)
    pipe.lrange(keys.failures, 0, -1)
    core_raw, tags_raw, failures_raw = await store.run_pipeline(pipe)
    f = hash_to_dict(core_raw)
    if not f:
        return None
    snap = t.FlowSnapshot(
        flow_id=f.get("flow_id", ""),
        flow_kind=f.get("flow_kind", ""),
        namespace=f.get("namespace", ""),
        public_flow_state=f.get("public_flow_state", ""),
        graph_revision=_int("flow_core", f, "graph_revision"),
        node_count=_int("flow_core", f, "node_count"),
        edge_count=_int("flow_core", f, "edge_count"),
        created_at=_int("flow_core", f, "created_at"),
        last_mutation_at=_int("flow_core", f, "last_mutation_at"),
        tags=hash_to_dict(tags_raw),
        failure_policy=f.get("failure_policy", ""),
    )
    if f.get("cancelled_at"):
        snap.cancelled_at = _int("flow_core", f, "cancelled_at")
        snap.cancel_reason = f.get("cancel_reason", "")
        snap.cancellation_policy = f.get("cancellation_policy", "")
    counts = {}
    for state in MEMBER_STATES:
        n = _int("flow_core", f, f"members_{state}") if f.get(f"members_{state}") else 0
        if n:
            counts[state] = n
    failures = []
    for raw in failures_raw or ():
        try:
            rec = json.loads(text(raw))
        except ValueError:
            raise FlowFabricError("corrupt_record", message="flow failure is not JSON") from None
        failures.append(
            fpb.FlowFailure(
                execution_id=str(rec.get("execution_id", "")),
                public_state=str(rec.get("public_state", "")),
                reason=str(rec.get("reason", "")),
                at=int(rec.get("at", 0)),
            )
        )
    return FlowView(snap, counts, failures)


def edge_snapshot(fields: dict[str, str], where: str) -> t.EdgeSnapshot:
    extra = set(fields) - EDGE_FIELDS
    if extra:
        raise FlowFabricError("corrupt_record", message=f"{where}: unknown fields {sorted(extra)}")
    snap = t.EdgeSnapshot(
        edge_id=fields.get("edge_id", ""),
        flow_id=fields.get("flow_id", ""),
        upstream_execution_id=fields.get("upstream_execution_id", ""),
        downstream_execution_id=fields.get("downstream_execution_id", ""),
        dependency_kind=fields.get("dependency_kind", ""),
        satisfaction_condition=fields.get("satisfaction_condition", ""),
        edge_state=fields.get("edge_state", ""),
        created_at=_int(where, fields, "created_at"),
        created_by=fields.get("created_by", ""),
    )
    if fields.get("data_passing_ref"):
        snap.data_passing_ref = fields["data_passing_ref"]
    return snap


async def describe_edge(store: Store, keys: FlowKeys, edge_id: str) -> t.EdgeSnapshot | None:
    fields = hash_to_dict(await store.call("HGETALL", keys.edge(edge_id)))
    if not fields:
        return None
    return edge_snapshot(fields, f"edge {edge_id}")


async def list_edges(
    store: Store, keys: FlowKeys, subject: str, outgoing: bool, page_size: int, after: str
) -> tuple[list[t.EdgeSnapshot], str]:
    """The subject's edges on one side, by edge id, after `after`; (edges, next token)."""
    adjacency = keys.outgoing(subject) if outgoing else keys.incoming(subject)
    ids = sorted(text(m) for m in await store.call("SMEMBERS", adjacency))
    ids = [i for i in ids if i > after]
    page, more = ids[:page_size], len(ids) > page_size
    if not page:
        return [], ""
    pipe = store.pipeline()
    for edge_id in page:
        pipe.hgetall(keys.edge(edge_id))
    rows = await store.run_pipeline(pipe)
    out = []
    side = "upstream_execution_id" if outgoing else "downstream_execution_id"
    for edge_id, raw in zip(page, rows, strict=True):
        fields = hash_to_dict(raw)
        if not fields:
            raise FlowFabricError("corrupt_record", message=f"edge {edge_id} is listed but missing")
        if fields.get(side) != subject:
            raise FlowFabricError(
                "corrupt_record", message=f"edge {edge_id}: adjacency drift ({side} != {subject})"
            )
        out.append(edge_snapshot(fields, f"edge {edge_id}"))
    return out, (page[-1] if more else "")


async def replay_inbound_edges(store: Store, eid: ExecutionId) -> tuple[str, ...]:
    """A skipped flow member's inbound edge ids (its flow's `in:` set), which its replay
    reopens (docs/flows.md#replaying-a-skipped-member); () for anything else. Read by
    ReplayExecution and by bulk replay."""
    fid, outcome = await store.call("HMGET", ExecKeys(eid).core, "flow_id", "terminal_outcome")
    if not text(fid) or text(outcome) != "skipped":
        return ()
    members = await store.call("SMEMBERS", FlowKeys(eid.tag, text(fid)).incoming(str(eid)))
    return tuple(sorted(text(m) for m in members))
