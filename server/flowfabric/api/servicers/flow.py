"""FlowService: flows, their members and dependency edges (docs/flows.md).

Each RPC decodes and validates the request (ids, partitions, bounds), then runs one Valkey
Function on the flow's partition; AddDependency threads the graph revision through stage and
apply, CancelFlow with `cancel_all` has the engine's canceller drain the members owed a cancel
(inline with `wait`, else in the background), and WatchFlow follows the partition's event
channel."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

from google.protobuf import json_format

from flowfabric.server.api import limits
from flowfabric.server.api.servicers.base import ServerContext
from flowfabric.server.engine.events import EventHub
from flowfabric.server.engine.flows import FlowCanceller, cancel_grace_ms
from flowfabric.server.valkey import bounds, flow_reads, tracecontext
from flowfabric.server.valkey.codec import enum_value, text
from flowfabric.server.valkey.errors import FlowFabricError, InvalidInput
from flowfabric.server.valkey.functions import Functions
from flowfabric.server.valkey.functions.flow import (
    MAX_SUBMIT_EDGES,
    MAX_SUBMIT_MEMBERS,
    AlreadyMember,
    AlreadySubmitted,
    Applied,
    FlowReplayed,
    SubmitEdge,
    SubmitMember,
)
from flowfabric.server.valkey.ids import (
    ExecutionId,
    flow_partition,
    mint_execution_id,
    parse_uuid,
    validate_lane,
)
from flowfabric.server.valkey.keys import ExecKeys, FlowKeys, PartitionKeys
from flowfabric.v1 import flow_pb2 as pb
from flowfabric.v1 import flow_pb2_grpc as rpc
from flowfabric.v1 import types_pb2 as t

DEFAULT_LANE = "default"
MEMBER_KEY_MAX = 64
LIST_EDGES_MAX = 1000
CANCEL_REPEAT_MEMBERS_MAX = 1000
STAGE_RETRIES = 3
JOIN_KINDS = {
    pb.Join.KIND_UNSPECIFIED: "",
    pb.Join.KIND_ALL: "all",
    pb.Join.KIND_ANY: "any",
    pb.Join.KIND_QUORUM: "quorum",
}
EDGE_KINDS = {
    pb.DEPENDENCY_KIND_UNSPECIFIED: "success",
    pb.DEPENDENCY_KIND_SUCCESS: "success",
    pb.DEPENDENCY_KIND_COMPLETION: "completion",
}
TERMINAL_FLOW = frozenset({"completed", "failed", "cancelled"})
TERMINAL_MEMBER = frozenset({"completed", "failed", "cancelled", "expired", "skipped"})
# A watch re-reads at least this often even without events (pub/sub is at-most-once).
WATCH_BACKSTOP_S = 30.0


def join_of(join: pb.Join, field: str) -> tuple[str, int, int]:
    if join.kind not in JOIN_KINDS:
        raise InvalidInput(field, f"{field}.kind {join.kind} is not a known join")
    return JOIN_KINDS[join.kind], join.quorum, join.expected_edges


def member_policy_json(m: pb.SubmitFlowRequest.Member) -> str:
    which = m.WhichOneof("policy_spec")
    if which == "policy_json":
        return m.policy_json
    if which == "policy":
        return json_format.MessageToJson(
            m.policy, preserving_proto_field_name=True, indent=None, sort_keys=True
        )
    return ""


class FlowServicer(rpc.FlowServiceServicer):
    def __init__(
        self,
        ctx: ServerContext,
        hub: EventHub | None = None,
        canceller: FlowCanceller | None = None,
        on_eligible: Any = None,
    ) -> None:
        self.ctx = ctx
        self.hub = hub
        self.canceller = canceller or FlowCanceller(ctx.store, ctx.functions)
        self.on_eligible = on_eligible

    @property
    def fn(self) -> Functions:
        return self.ctx.functions

    # -- ids and partitions -----------------------------------------------------------------

    def _flow(self, flow_id: str, field: str = "flow_id") -> tuple[str, int, str]:
        """(flow id, partition, tag)."""
        fid = parse_uuid(flow_id, field)
        p = flow_partition(fid, self.ctx.partitions)
        return fid, p, f"{{fp:{p}}}"

    def _member(self, value: str, partition: int, field: str) -> ExecutionId:
        eid = self.ctx.execution_id(value, field)
        if eid.partition != partition:
            raise FlowFabricError(
                "partition_mismatch",
                message=f"{field} is on partition {eid.partition} but the flow is on partition "
                f"{partition}: mint the id for the flow (or create it with the flow's id)",
                metadata={"field": field, "flow_partition": str(partition)},
            )
        return eid

    def _woke(self) -> None:
        if self.on_eligible is not None:
            self.on_eligible()

    # -- create and build ---------------------------------------------------------------------

    async def CreateFlow(
        self, request: pb.CreateFlowRequest, context: Any
    ) -> pb.CreateFlowResponse:
        fid, _, tag = self._flow(request.flow_id)
        if not request.flow_kind or not request.namespace:
            raise InvalidInput("flow_kind", "flow_kind and namespace are required")
        existed = await self.ctx.store.call("EXISTS", FlowKeys(tag, fid).core)
        await self.fn.flow.create_flow(
            tag, fid, request.flow_kind, request.namespace, request.failure_policy
        )
        if existed:
            return pb.CreateFlowResponse(
                already_satisfied=pb.CreateFlowResponse.AlreadySatisfied(flow_id=fid)
            )
        return pb.CreateFlowResponse(created=pb.CreateFlowResponse.Created(flow_id=fid))

    async def SubmitFlow(
        self, request: pb.SubmitFlowRequest, context: Any
    ) -> pb.SubmitFlowResponse:
        fid, p, tag = self._flow(request.flow_id or str(uuid.uuid4()))
        if not request.flow_kind or not request.namespace:
            raise InvalidInput("flow_kind", "flow_kind and namespace are required")
        if not 1 <= len(request.members) <= MAX_SUBMIT_MEMBERS:
            raise InvalidInput(
                "members", f"a submit has 1..{MAX_SUBMIT_MEMBERS} members; build larger flows "
                "incrementally (CreateExecution with flow_id, AddDependency)",
            )  # fmt: skip
        if len(request.edges) > MAX_SUBMIT_EDGES:
            raise InvalidInput(
                "edges", f"a submit has at most {MAX_SUBMIT_EDGES} edges; add more with "
                "AddDependency",
            )  # fmt: skip
        # the first PARENTED_MEMBERS join the submitter's trace, the rest link to it
        # (docs/observability.md#traces)
        traces = (
            tracecontext.encode(request.trace_context, "trace_context"),
            tracecontext.encode(request.trace_context, "trace_context", link=True),
        )
        members = [
            self._submit_member(m, i, p, traces[i >= tracecontext.PARENTED_MEMBERS])
            for i, m in enumerate(request.members)
        ]
        edges = [self._submit_edge(e, i) for i, e in enumerate(request.edges)]
        reply = await self.fn.flow.submit_flow(
            tag, p, fid, request.flow_kind, request.namespace, members, edges,
            request.failure_policy,
        )  # fmt: skip
        rows = [
            pb.SubmitFlowResponse.SubmittedMember(
                key=key, execution_id=eid,
                public_state=enum_value(t.PublicState, state) if state else 0,  # type: ignore[arg-type]
            )
            for key, eid, state in reply.members()
        ]  # fmt: skip
        if isinstance(reply, AlreadySubmitted):
            return pb.SubmitFlowResponse(
                already_submitted=pb.SubmitFlowResponse.AlreadySubmitted(
                    flow_id=fid, graph_revision=reply.graph_revision, members=rows
                )
            )
        self._woke()
        return pb.SubmitFlowResponse(
            submitted=pb.SubmitFlowResponse.Submitted(
                flow_id=fid, graph_revision=reply.graph_revision, members=rows
            )
        )

    def _submit_member(
        self, m: pb.SubmitFlowRequest.Member, i: int, p: int, trace: str = ""
    ) -> SubmitMember:
        field = f"members[{i}]"
        if not 1 <= len(m.key.encode()) <= MEMBER_KEY_MAX:
            raise InvalidInput(f"{field}.key", f"{field}.key must be 1..{MEMBER_KEY_MAX} bytes")
        if not m.execution_kind:
            raise InvalidInput(f"{field}.execution_kind", f"{field}.execution_kind is required")
        if len(m.input_payload) > limits.INPUT_PAYLOAD_MAX:
            raise FlowFabricError(
                "payload_too_large",
                message=f"{field}.input_payload is {len(m.input_payload)} bytes; the limit is "
                f"{limits.INPUT_PAYLOAD_MAX}",
                metadata={"limit_bytes": str(limits.INPUT_PAYLOAD_MAX), "field": field},
            )
        eid = (
            self._member(m.execution_id, p, f"{field}.execution_id")
            if m.execution_id
            else mint_execution_id(p)
        )
        join, quorum, expected = join_of(m.join, f"{field}.join")
        limits.check_size(bounds.LABEL_BYTES, m.quota_policy_id, f"{field}.quota_policy_id")
        key = limits.concurrency_key(
            m.concurrency_key, m.quota_policy_id, f"{field}.concurrency_key"
        )
        return SubmitMember(
            key=m.key, execution_id=eid,
            lane_id=validate_lane(m.lane_id or DEFAULT_LANE, f"{field}.lane_id"),
            execution_kind=m.execution_kind, input_payload=m.input_payload, priority=m.priority,
            creator_identity=m.creator_identity, policy_json=member_policy_json(m),
            payload_encoding=m.payload_encoding, tags=dict(m.tags), join_kind=join,
            join_quorum=quorum, join_expected_edges=expected, quota_policy_id=m.quota_policy_id,
            concurrency_key=key, trace_context=trace,
        )  # fmt: skip

    def _submit_edge(self, e: pb.SubmitFlowRequest.Edge, i: int) -> SubmitEdge:
        field = f"edges[{i}]"
        if e.kind not in EDGE_KINDS:
            raise InvalidInput(f"{field}.kind", f"{field}.kind {e.kind} is not a known kind")
        return SubmitEdge(
            edge_id=parse_uuid(e.edge_id, f"{field}.edge_id") if e.edge_id else str(uuid.uuid4()),
            upstream_key=e.upstream_key, downstream_key=e.downstream_key,
            dependency_kind=EDGE_KINDS[e.kind], data_passing_ref=e.data_passing_ref,
        )  # fmt: skip

    async def AddExecutionToFlow(
        self, request: pb.AddExecutionToFlowRequest, context: Any
    ) -> pb.AddExecutionToFlowResponse:
        fid, p, _ = self._flow(request.flow_id)
        eid = self._member(request.execution_id, p, "execution_id")
        reply = await self.fn.flow.add_execution_to_flow(fid, eid)
        if isinstance(reply, AlreadyMember):
            return pb.AddExecutionToFlowResponse(
                already_member=pb.AddExecutionToFlowResponse.AlreadyMember(
                    execution_id=str(eid), node_count=reply.node_count
                )
            )
        return pb.AddExecutionToFlowResponse(
            added=pb.AddExecutionToFlowResponse.Added(
                execution_id=str(eid), new_node_count=reply.node_count
            )
        )

    def _edge_ends(self, p: int, upstream: str, downstream: str) -> tuple[ExecutionId, ExecutionId]:
        return (
            self._member(upstream, p, "upstream_execution_id"),
            self._member(downstream, p, "downstream_execution_id"),
        )

    async def StageDependencyEdge(
        self, request: pb.StageDependencyEdgeRequest, context: Any
    ) -> pb.StageDependencyEdgeResponse:
        fid, p, _ = self._flow(request.flow_id)
        up, down = self._edge_ends(
            p, request.upstream_execution_id, request.downstream_execution_id
        )
        edge = parse_uuid(request.edge_id, "edge_id") if request.edge_id else str(uuid.uuid4())
        staged = await self.fn.flow.stage_dependency_edge(
            fid, edge, up, down, request.dependency_kind, request.data_passing_ref,
            request.expected_graph_revision,
        )  # fmt: skip
        return pb.StageDependencyEdgeResponse(
            staged=pb.StageDependencyEdgeResponse.Staged(
                edge_id=staged.edge_id, new_graph_revision=staged.new_graph_revision
            )
        )

    async def ApplyDependencyToChild(
        self, request: pb.ApplyDependencyToChildRequest, context: Any
    ) -> pb.ApplyDependencyToChildResponse:
        fid, p, _ = self._flow(request.flow_id)
        child = self._member(request.downstream_execution_id, p, "downstream_execution_id")
        edge = parse_uuid(request.edge_id, "edge_id")
        join, quorum, expected = join_of(request.join, "join")
        reply = await self.fn.flow.apply_dependency_to_child(
            fid, edge, child, join, quorum, expected
        )
        self._woke()
        if isinstance(reply, Applied):
            return pb.ApplyDependencyToChildResponse(
                applied=pb.ApplyDependencyToChildResponse.Applied(
                    unsatisfied_count=reply.unsatisfied_count
                )
            )
        return pb.ApplyDependencyToChildResponse(
            already_applied=pb.ApplyDependencyToChildResponse.AlreadyApplied()
        )

    async def AddDependency(
        self, request: pb.AddDependencyRequest, context: Any
    ) -> pb.AddDependencyResponse:
        fid, p, tag = self._flow(request.flow_id)
        up, down = self._edge_ends(
            p, request.upstream_execution_id, request.downstream_execution_id
        )
        edge = parse_uuid(request.edge_id, "edge_id") if request.edge_id else str(uuid.uuid4())
        join, quorum, expected = join_of(request.join, "join")
        given = request.HasField("expected_graph_revision")
        for attempt in range(1 if given else STAGE_RETRIES):
            revision = request.expected_graph_revision if given else await self._revision(tag, fid)
            try:
                staged = await self.fn.flow.stage_dependency_edge(
                    fid, edge, up, down, request.dependency_kind, request.data_passing_ref,
                    revision,
                )  # fmt: skip
                break
            except FlowFabricError as exc:
                if exc.code != "stale_graph_revision" or given or attempt == STAGE_RETRIES - 1:
                    raise
        reply = await self.fn.flow.apply_dependency_to_child(
            fid, edge, down, join, quorum, expected
        )
        self._woke()
        unsatisfied = reply.unsatisfied_count if isinstance(reply, Applied) else 0
        return pb.AddDependencyResponse(
            edge_id=edge, new_graph_revision=staged.new_graph_revision,
            unsatisfied_count=unsatisfied,
        )  # fmt: skip

    async def _revision(self, tag: str, fid: str) -> int:
        raw = await self.ctx.store.call("HGET", FlowKeys(tag, fid).core, "graph_revision")
        if raw is None:
            raise FlowFabricError("flow_not_found", message=f"no flow {fid}")
        return int(text(raw))

    async def PromoteBlockedToEligible(
        self, request: pb.PromoteBlockedToEligibleRequest, context: Any
    ) -> pb.PromoteBlockedToEligibleResponse:
        eid = self.ctx.execution_id(request.execution_id)
        await self.fn.flow.promote_blocked_to_eligible(eid)
        self._woke()
        return pb.PromoteBlockedToEligibleResponse(
            promoted=pb.PromoteBlockedToEligibleResponse.Promoted(execution_id=str(eid))
        )

    # -- cancel and tags ----------------------------------------------------------------------

    async def CancelFlow(
        self, request: pb.CancelFlowRequest, context: Any
    ) -> pb.CancelFlowResponse:
        fid, _, tag = self._flow(request.flow_id)
        reason = request.reason or "flow cancelled"
        policy = request.cancellation_policy
        try:
            done = await self.fn.flow.cancel_flow(
                tag, fid, reason, policy, cancel_grace_ms(self.ctx.config)
            )
        except FlowFabricError as exc:
            if exc.code != "flow_already_terminal" or exc.details[:1] != ["cancelled"]:
                raise
            raw = await self.ctx.store.call("SMEMBERS", FlowKeys(tag, fid).members)
            ids = sorted(text(m) for m in raw)[:CANCEL_REPEAT_MEMBERS_MAX]
            stored = exc.details[1] if len(exc.details) > 1 else ""
            return pb.CancelFlowResponse(
                cancelled=pb.CancelFlowResponse.Cancelled(
                    cancellation_policy=stored or policy, member_execution_ids=ids
                )
            )
        members = list(done.members)
        if done.cancellation_policy != "cancel_all" or not members:
            return pb.CancelFlowResponse(
                cancelled=pb.CancelFlowResponse.Cancelled(
                    cancellation_policy=done.cancellation_policy, member_execution_ids=members
                )
            )
        if not request.wait:
            self.canceller.schedule(tag, fid)
            return pb.CancelFlowResponse(
                cancellation_scheduled=pb.CancelFlowResponse.CancellationScheduled(
                    cancellation_policy=done.cancellation_policy, member_count=len(members),
                    member_execution_ids=members,
                )
            )  # fmt: skip
        failed = set(await self.canceller.drain(tag, fid, await self.canceller.owed(tag, fid)))
        if failed:
            return pb.CancelFlowResponse(
                partially_cancelled=pb.CancelFlowResponse.PartiallyCancelled(
                    cancellation_policy=done.cancellation_policy, member_execution_ids=members,
                    failed_member_execution_ids=[m for m in members if m in failed],
                )
            )  # fmt: skip
        return pb.CancelFlowResponse(
            cancelled=pb.CancelFlowResponse.Cancelled(
                cancellation_policy=done.cancellation_policy, member_execution_ids=members
            )
        )

    async def ReplayFlow(
        self, request: pb.ReplayFlowRequest, context: Any
    ) -> pb.ReplayFlowResponse:
        fid, _, tag = self._flow(request.flow_id)
        limits.check_size(limits.bounds.LABEL_BYTES, request.reason, "reason")
        reply = await self.fn.flow.replay_flow(tag, fid, request.reason)
        if isinstance(reply, FlowReplayed):
            self._woke()
            return pb.ReplayFlowResponse(
                replayed=pb.ReplayFlowResponse.Replayed(
                    execution_ids=list(reply.execution_ids),
                    reopened_edge_count=reply.reopened_edges,
                    public_flow_state=reply.public_flow_state,
                )
            )
        return pb.ReplayFlowResponse(
            nothing_to_replay=pb.ReplayFlowResponse.NothingToReplay(
                public_flow_state=reply.public_flow_state
            )
        )

    async def SetFlowTags(
        self, request: pb.SetFlowTagsRequest, context: Any
    ) -> pb.SetFlowTagsResponse:
        fid, _, tag = self._flow(request.flow_id)
        if not request.tags:
            raise InvalidInput("tags", "tags must be non-empty")
        reply = await self.fn.flow.set_flow_tags(tag, fid, dict(request.tags))
        return pb.SetFlowTagsResponse(ok=pb.SetFlowTagsResponse.Ok(count=reply.count))

    # -- reads --------------------------------------------------------------------------------

    async def DescribeFlow(
        self, request: pb.DescribeFlowRequest, context: Any
    ) -> pb.DescribeFlowResponse:
        fid, _, tag = self._flow(request.flow_id)
        view = await flow_reads.describe_flow(self.ctx.store, FlowKeys(tag, fid))
        if view is None:
            raise FlowFabricError("flow_not_found", message=f"no flow {fid}")
        return pb.DescribeFlowResponse(
            flow=view.snapshot, members_by_state=view.members_by_state, failures=view.failures
        )

    async def DescribeEdge(
        self, request: pb.DescribeEdgeRequest, context: Any
    ) -> pb.DescribeEdgeResponse:
        fid, _, tag = self._flow(request.flow_id)
        edge = parse_uuid(request.edge_id, "edge_id")
        snap = await flow_reads.describe_edge(self.ctx.store, FlowKeys(tag, fid), edge)
        if snap is None:
            raise FlowFabricError("edge_not_found", message=f"no edge {edge} in flow {fid}")
        return pb.DescribeEdgeResponse(edge=snap)

    async def ListEdges(self, request: pb.ListEdgesRequest, context: Any) -> pb.ListEdgesResponse:
        which = request.direction.WhichOneof("direction")
        if which is None:
            raise InvalidInput("direction", "direction (outgoing or incoming) is required")
        node = (
            request.direction.outgoing.from_node
            if which == "outgoing"
            else request.direction.incoming.to_node
        )
        eid = self.ctx.execution_id(node, f"direction.{which}")
        size = request.page_size or LIST_EDGES_MAX
        if size > LIST_EDGES_MAX:
            raise InvalidInput("page_size", f"page_size must be at most {LIST_EDGES_MAX}")
        after = parse_uuid(request.page_token, "page_token") if request.page_token else ""
        if request.flow_id:
            fid, p, tag = self._flow(request.flow_id)
        else:
            core = await self.ctx.store.call("HGET", ExecKeys(eid).core, "flow_id")
            if not text(core):
                return pb.ListEdgesResponse()
            fid, p, tag = self._flow(text(core))
        if p != eid.partition:
            return pb.ListEdgesResponse()
        edges, token = await flow_reads.list_edges(
            self.ctx.store, FlowKeys(tag, fid), str(eid), which == "outgoing", size, after
        )
        return pb.ListEdgesResponse(edges=edges, next_page_token=token)

    # -- watch --------------------------------------------------------------------------------

    async def WatchFlow(
        self, request: pb.WatchFlowRequest, context: Any
    ) -> AsyncIterator[pb.WatchFlowResponse]:
        """The flow, every member, `synced`, then each change; ends once the flow and every
        member have ended (docs/flows.md#watching-a-flow).

        Event-driven like WatchExecution: member transitions publish on the partition's
        channel (every member shares the flow's tag). The stored states are read after
        subscribing; an event marks its member dirty and the next read sends its latest state
        only if it differs from the last one sent, so a slow reader gets the latest state of
        each member, never a duplicate. A lost subscription (resync) re-reads everything.
        """
        fid, _, tag = self._flow(request.flow_id)
        if self.hub is None:
            raise FlowFabricError("backend_unavailable", message="watches are not available")
        watch = _FlowWatch(self.ctx, FlowKeys(tag, fid))
        channel = PartitionKeys(tag).exec_events
        async with self.hub.listen(channel, watch.on_event):
            async with asyncio.timeout(5):
                await self.hub.wait_subscribed(channel)
            async for message in watch.run():
                yield message


class _FlowWatch:
    """One WatchFlow: what was sent, what is dirty."""

    def __init__(self, ctx: ServerContext, keys: FlowKeys) -> None:
        self.ctx, self.keys = ctx, keys
        self.changed = asyncio.Event()
        self.resync = True
        self.dirty: set[str] = set()
        self.sent: dict[str, str] = {}
        self.flow_sent: tuple[str, tuple[tuple[str, int], ...]] | None = None

    def on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "resync":
            self.resync = True
        elif kind == "flow_changed":
            if event.get("flow_id") != self.keys.flow_id:
                return
        elif isinstance(event.get("execution_id"), str):
            self.dirty.add(event["execution_id"])
        else:
            return
        self.changed.set()

    async def run(self) -> AsyncIterator[pb.WatchFlowResponse]:
        while True:
            # cleared before the reads: an event landing meanwhile triggers another pass
            self.changed.clear()
            full, self.resync = self.resync, False
            view = await flow_reads.describe_flow(self.ctx.store, self.keys)
            if view is None:
                raise FlowFabricError("flow_not_found", message=f"no flow {self.keys.flow_id}")
            shown = (view.snapshot.public_flow_state, tuple(sorted(view.members_by_state.items())))
            if shown != self.flow_sent:
                self.flow_sent = shown
                yield pb.WatchFlowResponse(
                    flow=pb.WatchFlowResponse.FlowChanged(
                        flow=view.snapshot, members_by_state=view.members_by_state
                    )
                )
            async for message in self._members(full):
                yield message
            if full:
                yield pb.WatchFlowResponse(synced=pb.WatchFlowResponse.Synced())
            if view.snapshot.public_flow_state in TERMINAL_FLOW and self._all_ended():
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(WATCH_BACKSTOP_S):
                    await self.changed.wait()

    def _all_ended(self) -> bool:
        return all(s in TERMINAL_MEMBER for s in self.sent.values())

    async def _members(self, full: bool) -> AsyncIterator[pb.WatchFlowResponse]:
        store = self.ctx.store
        if full:
            ids = sorted(text(m) for m in await store.call("SMEMBERS", self.keys.members))
        else:
            dirty, self.dirty = sorted(self.dirty), set()
            known = [m for m in dirty if m in self.sent]
            pipe = store.pipeline()
            for m in dirty:
                if m not in self.sent:
                    pipe.sismember(self.keys.members, m)
            fresh = iter(await store.run_pipeline(pipe)) if len(known) < len(dirty) else iter(())
            ids = [m for m in dirty if m in self.sent or next(fresh)]
        if not ids:
            return
        pipe = store.pipeline()
        for m in ids:
            eid = self.ctx.execution_id(m)
            pipe.hmget(ExecKeys(eid).core, "public_state", "last_transition_at")
        rows = await store.run_pipeline(pipe)
        for m, (state, at) in zip(ids, rows, strict=True):
            state = text(state)
            if not state or self.sent.get(m) == state:
                continue
            self.sent[m] = state
            yield pb.WatchFlowResponse(
                member=pb.WatchFlowResponse.MemberChanged(
                    execution_id=m,
                    public_state=enum_value(t.PublicState, state),
                    at=int(text(at) or 0),
                )
            )
