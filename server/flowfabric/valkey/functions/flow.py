"""`lua/flow.lua`: flows, dependency edges, their resolution and a whole DAG in one call
(docs/flows.md)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from flowfabric.server.valkey.functions.core import (
    Decl,
    KeyCtx,
    Outcome,
    arg,
    call,
    ek,
    exec_ctx,
    fk,
    ok,
    pk,
    record,
    tail,
)
from flowfabric.server.valkey.ids import ExecutionId
from flowfabric.server.valkey.store import Store

# Bounds of one SubmitFlow call (the Lua function enforces the same).
MAX_SUBMIT_MEMBERS = 1000
MAX_SUBMIT_EDGES = 5000
# Member ids per ff_cancel_flow_members call (lua/flow.lua CANCEL_BATCH).
CANCEL_BATCH = 500


@dataclass(frozen=True)
class FlowId:
    flow_id: str


@dataclass(frozen=True)
class Membership:
    """`OK eid node_count` (added) or `ALREADY_SATISFIED eid node_count` (already a member)."""

    execution_id: str
    node_count: int


@dataclass(frozen=True)
class AlreadyMember(Membership):
    pass


@dataclass(frozen=True)
class Staged:
    edge_id: str
    new_graph_revision: int


@dataclass(frozen=True)
class Applied:
    unsatisfied_count: int


@dataclass(frozen=True)
class Resolved:
    """`satisfied|impossible effect`; effect released | skipped | ""."""

    result: str
    effect: str = ""


@dataclass(frozen=True)
class Outgoing:
    """What one ff_resolve_outgoing call did."""

    resolved: int
    released: int
    skipped: int
    pending: int


@dataclass(frozen=True)
class FlowCancelled:
    cancellation_policy: str
    members: tuple[str, ...] = ()


@dataclass(frozen=True)
class MembersCancelled:
    """One ff_cancel_flow_members call: cancelled now, already done, still owed."""

    cancelled: int
    already_done: int
    remaining: int


@dataclass(frozen=True)
class CancelFailed:
    """`retry n` (still owed) or `gave_up n` (dropped from the backlog)."""

    outcome: str
    attempts: int = 0


@dataclass(frozen=True)
class Reconciled:
    """One ff_reconcile_dependencies call: edges resolved now; released | skipped | ""."""

    resolved: int
    effect: str = ""


@dataclass(frozen=True)
class Projected:
    """One ff_project_flow call: the flow's state; whether a counter was repaired."""

    public_flow_state: str
    repaired: int = 0


@dataclass(frozen=True)
class FlowReplayed:
    """`OK state reopened_edges eid*` (the re-run members)."""

    public_flow_state: str
    reopened_edges: int
    execution_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class NothingToReplay:
    """ALREADY_SATISFIED `nothing_to_replay state`."""

    reason: str
    public_flow_state: str = ""


@dataclass(frozen=True)
class TagsSet:
    count: int


@dataclass(frozen=True)
class SubmitMember:
    """One member of a SubmitFlow: created with the flow, on its partition."""

    key: str
    execution_id: ExecutionId
    lane_id: str
    execution_kind: str
    input_payload: bytes = b""
    priority: int = 0
    creator_identity: str = ""
    policy_json: str = ""
    payload_encoding: str = ""
    tags: Mapping[str, str] = field(default_factory=dict)
    join_kind: str = ""
    join_quorum: int = 0
    join_expected_edges: int = 0
    quota_policy_id: str = ""
    concurrency_key: str = ""
    trace_context: str = ""  # stored form (valkey/tracecontext.py); "" = none


@dataclass(frozen=True)
class SubmitEdge:
    edge_id: str
    upstream_key: str
    downstream_key: str
    dependency_kind: str = ""
    data_passing_ref: str = ""


@dataclass(frozen=True)
class Submitted:
    """`OK flow_id graph_revision (key eid public_state)*`."""

    flow_id: str
    graph_revision: int
    rest: tuple[str, ...] = ()

    def members(self) -> list[tuple[str, str, str]]:
        """(key, execution id, public state; "" when the flow already existed)."""
        step = 2 if isinstance(self, AlreadySubmitted) else 3
        rows = [self.rest[i : i + step] for i in range(0, len(self.rest), step)]
        return [(r[0], r[1], r[2] if len(r) > 2 else "") for r in rows]


@dataclass(frozen=True)
class AlreadySubmitted(Submitted):
    """ALREADY_SATISFIED `flow_id graph_revision (key eid)*`: the flow existed; the pairs are
    the members of the submit that created it."""


CREATE_FLOW: Decl[FlowId] = Decl(
    "ff_create_flow",
    (fk("core"), pk("flow_index")),
    (arg("flow_id"), arg("flow_kind"), arg("namespace"), arg("failure_policy", default="")),
    {"OK": record(FlowId), "ALREADY_SATISFIED": record(FlowId)},
)
ADD_MEMBER: Decl[Membership] = Decl(
    "ff_add_execution_to_flow",
    (fk("core"), fk("members"), pk("flow_index"), ek("core")),
    (arg("flow_id"), arg("execution_id")),
    {"OK": record(Membership), "ALREADY_SATISFIED": record(AlreadyMember)},
)
STAGE: Decl[Staged] = Decl(
    "ff_stage_dependency_edge",
    (fk("core"), fk("members")),
    (arg("flow_id"), arg("edge_id"), arg("upstream_execution_id"),
     arg("downstream_execution_id"), arg("dependency_kind", default=""),
     arg("data_passing_ref", default=""), arg("expected_graph_revision", "int")),
    ok(record(Staged)),
)  # fmt: skip
APPLY: Decl[Applied | Outcome] = Decl(
    "ff_apply_dependency_to_child",
    (ek("core"), fk("core")),
    (arg("execution_id"), arg("flow_id"), arg("edge_id"), arg("join_kind", default=""),
     arg("join_quorum", default=""), arg("join_expected_edges", default="")),
    {"OK": record(Applied), "ALREADY_SATISFIED": record(Outcome)},
)  # fmt: skip
RESOLVE: Decl[Resolved | Outcome] = Decl(
    "ff_resolve_dependency",
    (ek("core"),),
    (arg("execution_id"), arg("edge_id"), arg("upstream_outcome")),
    {"OK": record(Resolved), "ALREADY_SATISFIED": record(Outcome)},
)
RESOLVE_OUTGOING: Decl[Outgoing | Outcome] = Decl(
    "ff_resolve_outgoing",
    (ek("core"), pk("deps_pending")),
    (arg("execution_id"),),
    {"OK": record(Outgoing), "ALREADY_SATISFIED": record(Outcome)},
)
PROMOTE: Decl[Outcome] = Decl(
    "ff_promote_blocked_to_eligible", (ek("core"),), (arg("execution_id"),), ok(record(Outcome))
)
EVALUATE: Decl[Outcome] = Decl(
    "ff_evaluate_flow_eligibility",
    (ek("core"), ek("deps_meta")),
    (arg("execution_id"),),
    ok(record(Outcome)),
    read_only=True,
)
CANCEL_FLOW: Decl[FlowCancelled] = Decl(
    "ff_cancel_flow",
    (fk("core"), fk("members"), fk("pending_cancels"), pk("cancel_backlog")),
    (arg("flow_id"), arg("reason"), arg("cancellation_policy"), arg("grace_ms", "int")),
    ok(record(FlowCancelled)),
)
CANCEL_MEMBERS: Decl[MembersCancelled | Outcome] = Decl(
    "ff_cancel_flow_members",
    (fk("core"), fk("pending_cancels"), pk("cancel_backlog"), fk("cancel_attempts")),
    (arg("flow_id"), tail("execution_ids")),
    {"OK": record(MembersCancelled), "ALREADY_SATISFIED": record(Outcome)},
)
CANCEL_FAILED: Decl[CancelFailed | Outcome] = Decl(
    "ff_cancel_member_failed",
    (fk("core"), fk("pending_cancels"), pk("cancel_backlog"), fk("cancel_attempts")),
    (arg("flow_id"), arg("execution_id"), arg("max_attempts", "int")),
    {"OK": record(CancelFailed), "ALREADY_SATISFIED": record(Outcome)},
)
SET_FLOW_TAGS: Decl[TagsSet] = Decl(
    "ff_set_flow_tags", (fk("core"), fk("tags")), (tail("pairs"),), ok(record(TagsSet))
)
SUBMIT: Decl[Submitted] = Decl(
    "ff_submit_flow",
    (fk("core"), fk("members"), pk("flow_index")),
    (arg("flow_id"), arg("flow_kind"), arg("namespace"), arg("partition_id", "int"),
     arg("members_json"), arg("edges_json"), arg("failure_policy", default=""),
     tail("input_payloads")),
    {"OK": record(Submitted), "ALREADY_SATISFIED": record(AlreadySubmitted)},
)  # fmt: skip

RECONCILE: Decl[Reconciled | Outcome] = Decl(
    "ff_reconcile_dependencies",
    (ek("core"),),
    (arg("execution_id"), arg("min_age_ms", "int")),
    {"OK": record(Reconciled), "ALREADY_SATISFIED": record(Outcome)},
)
PROJECT: Decl[Projected | Outcome] = Decl(
    "ff_project_flow",
    (fk("core"), fk("members"), pk("flow_index")),
    (arg("flow_id"),),
    {"OK": record(Projected), "ALREADY_SATISFIED": record(Outcome)},
)
REPLAY_FLOW: Decl[FlowReplayed | NothingToReplay] = Decl(
    "ff_replay_flow",
    (fk("core"), fk("members"), pk("flow_index"), fk("pending_cancels"), pk("cancel_backlog")),
    (arg("flow_id"), arg("reason", default="")),
    {"OK": record(FlowReplayed), "ALREADY_SATISFIED": record(NothingToReplay)},
)

DECLS = (
    CREATE_FLOW, ADD_MEMBER, STAGE, APPLY, RESOLVE, RESOLVE_OUTGOING, PROMOTE, EVALUATE,
    CANCEL_FLOW, CANCEL_MEMBERS, CANCEL_FAILED, SET_FLOW_TAGS, SUBMIT, RECONCILE, PROJECT,
    REPLAY_FLOW,
)  # fmt: skip


def flow_ctx(tag: str, flow_id: str, eid: ExecutionId | None = None) -> KeyCtx:
    return KeyCtx(eid=eid, tag=tag, flow_id=flow_id)


class FlowFunctions:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def create_flow(
        self, tag: str, flow_id: str, kind: str, namespace: str, failure_policy: str = ""
    ) -> FlowId:
        return await call(self.store, CREATE_FLOW, flow_ctx(tag, flow_id), {
            "flow_id": flow_id, "flow_kind": kind, "namespace": namespace,
            "failure_policy": failure_policy,
        })  # fmt: skip

    async def add_execution_to_flow(self, flow_id: str, eid: ExecutionId) -> Membership:
        ctx = flow_ctx(eid.tag, flow_id, eid)
        return await call(
            self.store, ADD_MEMBER, ctx, {"flow_id": flow_id, "execution_id": str(eid)}
        )

    async def stage_dependency_edge(
        self, flow_id: str, edge_id: str, upstream: ExecutionId, downstream: ExecutionId,
        kind: str, data_passing_ref: str, expected_graph_revision: int,
    ) -> Staged:  # fmt: skip
        return await call(self.store, STAGE, flow_ctx(upstream.tag, flow_id), {
            "flow_id": flow_id, "edge_id": edge_id, "upstream_execution_id": str(upstream),
            "downstream_execution_id": str(downstream), "dependency_kind": kind,
            "data_passing_ref": data_passing_ref,
            "expected_graph_revision": expected_graph_revision,
        })  # fmt: skip

    async def apply_dependency_to_child(
        self, flow_id: str, edge_id: str, child: ExecutionId, join_kind: str = "",
        join_quorum: int = 0, join_expected_edges: int = 0,
    ) -> Applied | Outcome:  # fmt: skip
        return await call(self.store, APPLY, flow_ctx(child.tag, flow_id, child), {
            "execution_id": str(child), "flow_id": flow_id, "edge_id": edge_id,
            "join_kind": join_kind, "join_quorum": str(join_quorum) if join_quorum else "",
            "join_expected_edges": str(join_expected_edges) if join_expected_edges else "",
        })  # fmt: skip

    async def resolve_dependency(
        self, child: ExecutionId, edge_id: str, upstream_outcome: str
    ) -> Resolved | Outcome:
        return await call(self.store, RESOLVE, exec_ctx(child), {
            "execution_id": str(child), "edge_id": edge_id, "upstream_outcome": upstream_outcome,
        })  # fmt: skip

    async def resolve_outgoing(self, upstream: ExecutionId) -> Outgoing | Outcome:
        return await call(
            self.store, RESOLVE_OUTGOING, exec_ctx(upstream), {"execution_id": str(upstream)}
        )

    async def promote_blocked_to_eligible(self, eid: ExecutionId) -> Outcome:
        return await call(self.store, PROMOTE, exec_ctx(eid), {"execution_id": str(eid)})

    async def evaluate_flow_eligibility(self, eid: ExecutionId) -> str:
        reply = await call(self.store, EVALUATE, exec_ctx(eid), {"execution_id": str(eid)})
        return reply.outcome

    async def cancel_flow(
        self, tag: str, flow_id: str, reason: str, policy: str, grace_ms: int
    ) -> FlowCancelled:
        return await call(self.store, CANCEL_FLOW, flow_ctx(tag, flow_id), {
            "flow_id": flow_id, "reason": reason, "cancellation_policy": policy,
            "grace_ms": grace_ms,
        })  # fmt: skip

    async def cancel_flow_members(
        self, tag: str, flow_id: str, execution_ids: Sequence[str]
    ) -> MembersCancelled | Outcome:
        return await call(self.store, CANCEL_MEMBERS, flow_ctx(tag, flow_id), {
            "flow_id": flow_id, "execution_ids": list(execution_ids),
        })  # fmt: skip

    async def cancel_member_failed(
        self, tag: str, flow_id: str, execution_id: str, max_attempts: int
    ) -> CancelFailed | Outcome:
        return await call(self.store, CANCEL_FAILED, flow_ctx(tag, flow_id), {
            "flow_id": flow_id, "execution_id": execution_id, "max_attempts": max_attempts,
        })  # fmt: skip

    async def set_flow_tags(self, tag: str, flow_id: str, tags: Mapping[str, str]) -> TagsSet:
        pairs = [v for k in sorted(tags) for v in (k, tags[k])]
        return await call(self.store, SET_FLOW_TAGS, flow_ctx(tag, flow_id), {"pairs": pairs})

    async def submit_flow(
        self, tag: str, partition: int, flow_id: str, kind: str, namespace: str,
        members: Sequence[SubmitMember], edges: Sequence[SubmitEdge], failure_policy: str = "",
    ) -> Submitted:  # fmt: skip
        mjson = [
            {
                "key": m.key, "id": str(m.execution_id), "lane": m.lane_id,
                "kind": m.execution_kind, "priority": m.priority, "creator": m.creator_identity,
                "policy": m.policy_json, "encoding": m.payload_encoding, "tags": dict(m.tags),
                "join": m.join_kind, "quorum": m.join_quorum,
                "expected_edges": m.join_expected_edges, "quota": m.quota_policy_id,
                "concurrency_key": m.concurrency_key, "trace_context": m.trace_context,
            }
            for m in members
        ]  # fmt: skip
        ejson = [
            {"id": e.edge_id, "up": e.upstream_key, "down": e.downstream_key,
             "kind": e.dependency_kind, "ref": e.data_passing_ref}
            for e in edges
        ]  # fmt: skip
        return await call(self.store, SUBMIT, flow_ctx(tag, flow_id), {
            "flow_id": flow_id, "flow_kind": kind, "namespace": namespace,
            "partition_id": partition, "members_json": json.dumps(mjson),
            "edges_json": json.dumps(ejson), "failure_policy": failure_policy,
            "input_payloads": [m.input_payload for m in members],
        })  # fmt: skip

    async def reconcile_dependencies(
        self, eid: ExecutionId, min_age_ms: int
    ) -> Reconciled | Outcome:
        return await call(self.store, RECONCILE, exec_ctx(eid), {
            "execution_id": str(eid), "min_age_ms": min_age_ms,
        })  # fmt: skip

    async def project_flow(self, tag: str, flow_id: str) -> Projected | Outcome:
        return await call(self.store, PROJECT, flow_ctx(tag, flow_id), {"flow_id": flow_id})

    async def replay_flow(
        self, tag: str, flow_id: str, reason: str = ""
    ) -> FlowReplayed | NothingToReplay:
        return await call(
            self.store, REPLAY_FLOW, flow_ctx(tag, flow_id), {"flow_id": flow_id, "reason": reason}
        )
