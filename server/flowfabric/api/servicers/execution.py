"""ExecutionService: create, read, list and tag executions (docs/lifecycle.md#create,
docs/lifecycle.md#tags, docs/lifecycle.md#reads)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from google.protobuf import json_format

from flowfabric.server.api import limits
from flowfabric.server.api.limits import bounds
from flowfabric.server.api.servicers.base import ServerContext
from flowfabric.server.engine.events import EventHub
from flowfabric.server.engine.lane_partitions import LanePartitions
from flowfabric.server.valkey import flow_reads, reads, tracecontext
from flowfabric.server.valkey.codec import cancel_source, enum_text, enum_value, text
from flowfabric.server.valkey.errors import FlowFabricError, InvalidInput
from flowfabric.server.valkey.functions import Fence, Functions, NewExecution
from flowfabric.server.valkey.functions.execution import Created, Duplicate
from flowfabric.server.valkey.functions.lease import Revoked
from flowfabric.server.valkey.ids import (
    ExecutionId,
    flow_partition,
    mint_execution_id,
    parse_uuid,
    validate_lane,
)
from flowfabric.server.valkey.keys import ExecKeys, FlowKeys, PartitionKeys
from flowfabric.server.valkey.why import Places
from flowfabric.v1 import execution_pb2 as pb
from flowfabric.v1 import execution_pb2_grpc as rpc
from flowfabric.v1 import types_pb2 as t

DEFAULT_LANE = "default"
MAX_CREATES = bounds.BATCH_ITEMS.hi
DEFAULT_NAMESPACE = "default"


def policy_json(request: pb.CreateExecutionRequest) -> str:
    """The policy as the JSON the functions read (docs/lifecycle.md#execution-policy): unset fields
    omitted."""
    which = request.WhichOneof("policy_spec")
    if which == "policy_json":
        return request.policy_json
    if which == "policy":
        return json_format.MessageToJson(
            request.policy, preserving_proto_field_name=True, indent=None, sort_keys=True
        )
    return ""


TERMINAL_PUBLIC = frozenset(
    {
        t.PUBLIC_STATE_COMPLETED,
        t.PUBLIC_STATE_FAILED,
        t.PUBLIC_STATE_CANCELLED,
        t.PUBLIC_STATE_EXPIRED,
        t.PUBLIC_STATE_SKIPPED,
    }
)
WATCH_BACKSTOP_S = 30.0
RESUME_TRIGGERS = ("operator", "auto_resume", "signal")
# CreateExecution's labels, each within LABEL_BYTES.
CREATE_LABELS = (
    "namespace", "execution_kind", "idempotency_key", "payload_encoding", "creator_identity",
    "quota_policy_id",
)  # fmt: skip


def create_item_error(exc: FlowFabricError) -> pb.CreateExecutionsResponse.ItemError:
    """One CreateExecutions item's failure: the status CreateExecution would have ended with."""
    from google.rpc import error_details_pb2

    status = exc.to_status()
    info = error_details_pb2.ErrorInfo()
    status.details[0].Unpack(info)
    return pb.CreateExecutionsResponse.ItemError(
        code=status.code, reason=exc.code, message=exc.describe(), metadata=dict(info.metadata)
    )


def create_result(
    one: Created | Duplicate | FlowFabricError,
) -> pb.CreateExecutionsResponse.Result:
    """One `ff_create_executions` item outcome as its CreateExecutions result."""
    result = pb.CreateExecutionsResponse.Result
    if isinstance(one, FlowFabricError):
        return result(error=create_item_error(one))
    if isinstance(one, Duplicate):
        return result(duplicate=pb.CreateExecutionResponse.Duplicate(execution_id=one.existing_id))
    return result(created=pb.CreateExecutionResponse.Created(
        execution_id=one.execution_id, public_state=enum_value(t.PublicState, one.public_state)
    ))  # fmt: skip


def tags_of(tags: Any, field: str = "tags") -> dict[str, str]:
    """A request's tags map: at most TAGS entries, keys and values within their sizes (the key
    rule itself is the function's, `invalid_tag_key`)."""
    limits.check_count(bounds.TAGS, len(tags), field)
    for key, value in tags.items():
        limits.check_size(bounds.TAG_KEY_BYTES, key, f"{field} key")
        limits.check_size(bounds.TAG_VALUE_BYTES, value, f"{field}[{key[:64]}]")
    return dict(tags)


def check_create(request: pb.CreateExecutionRequest) -> None:
    """The bounds of a create beyond its payload (docs/architecture.md#limits)."""
    limits.control_part(request, request.input_payload, "input_payload")
    for name in CREATE_LABELS:
        limits.check_size(bounds.LABEL_BYTES, getattr(request, name), name)
    # the horizon from now is the function's check: only it reads Valkey's clock
    limits.optional(bounds.TIMESTAMP_MS, request, "delay_until")
    limits.optional(bounds.TIMESTAMP_MS, request, "execution_deadline_at")
    limits.concurrency_key(request.concurrency_key, request.quota_policy_id)


class ExecutionServicer(rpc.ExecutionServiceServicer):
    def __init__(
        self, ctx: ServerContext, hub: EventHub | None = None, on_created: Any = None,
        intake: Any = None,
    ) -> None:  # fmt: skip
        self.ctx = ctx
        self.hub = hub
        self.on_created = on_created
        # one set per process, shared with the scheduler (docs/lifecycle.md#lanes-across-a-cluster)
        self.lane_parts = ctx.lane_partitions or LanePartitions(ctx.partitions)
        self.intake = intake  # async (lane) -> None: refuses a draining lane (docs/lanes.md)

    @property
    def fn(self) -> Functions:
        return self.ctx.functions

    async def _flow_of(self, request: pb.CreateExecutionRequest) -> tuple[str, int] | None:
        """(flow id, partition) of a member's create, checked to be a live flow before anything
        is written; None without `flow_id`."""
        if not request.HasField("flow_id"):
            if request.blocked_by_dependencies:
                raise InvalidInput(
                    "blocked_by_dependencies", "blocked_by_dependencies needs a flow_id"
                )
            return None
        fid = parse_uuid(request.flow_id, "flow_id")
        p = flow_partition(fid, self.ctx.partitions)
        state = await self.ctx.store.call(
            "HGET", FlowKeys(f"{{fp:{p}}}", fid).core, "public_flow_state"
        )
        if state is None:
            raise FlowFabricError("flow_not_found", message=f"no flow {fid}")
        if text(state) in ("cancelled", "completed", "failed"):
            raise FlowFabricError("flow_already_terminal", [text(state)])
        return fid, p

    def _new_id(
        self,
        request: pb.CreateExecutionRequest,
        lane: str,
        flow_partition_id: int | None,
        turn: int,
    ) -> ExecutionId:
        if request.execution_id:
            eid = self.ctx.execution_id(request.execution_id)
            if flow_partition_id is not None and eid.partition != flow_partition_id:
                raise FlowFabricError(
                    "partition_mismatch",
                    message=f"execution_id is on partition {eid.partition} but the flow is on "
                    f"partition {flow_partition_id}: mint the id for the flow",
                    metadata={"field": "execution_id"},
                )
            if request.HasField("partition_id") and request.partition_id != eid.partition:
                raise InvalidInput(
                    "partition_id",
                    f"partition_id {request.partition_id} does not match the execution id's "
                    f"partition {eid.partition}",
                )
            return eid
        if flow_partition_id is not None:
            return mint_execution_id(flow_partition_id)
        if request.HasField("partition_id"):
            if request.partition_id >= self.ctx.partitions:
                raise InvalidInput("partition_id", "partition_id is out of range")
            return mint_execution_id(request.partition_id)
        namespace = request.namespace or DEFAULT_NAMESPACE
        return mint_execution_id(
            self.lane_parts.for_create(lane, namespace, request.idempotency_key, turn)
        )

    async def _decode_create(
        self, request: pb.CreateExecutionRequest, turn: int
    ) -> tuple[NewExecution, tuple[str, int] | None]:
        """A CreateExecution's (or a CreateExecutions item's) validated create and its flow.
        `turn`: the request's pick of the lane's partitions (LanePartitions.for_create)."""
        lane = validate_lane(request.lane_id or DEFAULT_LANE)
        if self.intake is not None:
            await self.intake(lane)
        if not request.execution_kind:
            raise InvalidInput("execution_kind", "execution_kind is required")
        if len(request.input_payload) > limits.INPUT_PAYLOAD_MAX:
            raise FlowFabricError(
                "payload_too_large",
                message=f"input_payload is {len(request.input_payload)} bytes; the limit is "
                f"{limits.INPUT_PAYLOAD_MAX}",
                metadata={"limit_bytes": str(limits.INPUT_PAYLOAD_MAX)},
            )
        check_create(request)
        tags = tags_of(request.tags)
        flow = await self._flow_of(request)
        eid = self._new_id(request, lane, flow[1] if flow else None, turn)
        new = NewExecution(
            execution_id=eid,
            namespace=request.namespace or DEFAULT_NAMESPACE,
            lane_id=lane,
            execution_kind=request.execution_kind,
            input_payload=request.input_payload,
            priority=request.priority,
            creator_identity=request.creator_identity,
            policy_json=policy_json(request),
            payload_encoding=request.payload_encoding,
            idempotency_key=request.idempotency_key,
            tags=tags,
            delay_until=request.delay_until if request.HasField("delay_until") else None,
            execution_deadline_at=(
                request.execution_deadline_at if request.HasField("execution_deadline_at") else None
            ),
            quota_policy_id=request.quota_policy_id,
            concurrency_key=request.concurrency_key,
            blocked_by_dependencies=request.blocked_by_dependencies,
            trace_context=tracecontext.encode(request.trace_context, "trace_context"),
        )
        return new, flow

    async def CreateExecution(
        self, request: pb.CreateExecutionRequest, context: Any
    ) -> pb.CreateExecutionResponse:
        new, flow = await self._decode_create(request, self.lane_parts.next_create())
        reply = await self.fn.execution.create_execution(new)
        if flow is not None:
            # Both calls are idempotent, so a retry converges (docs/flows.md#building-a-flow).
            created = reply.existing_id if isinstance(reply, Duplicate) else reply.execution_id
            await self.fn.flow.add_execution_to_flow(flow[0], self.ctx.execution_id(created))
        if isinstance(reply, Duplicate):
            return pb.CreateExecutionResponse(
                duplicate=pb.CreateExecutionResponse.Duplicate(execution_id=reply.existing_id)
            )
        if self.on_created is not None:
            self.on_created()
        return pb.CreateExecutionResponse(
            created=pb.CreateExecutionResponse.Created(
                execution_id=reply.execution_id,
                public_state=enum_value(t.PublicState, reply.public_state),
            )
        )

    async def _decode_item(
        self, item: pb.CreateExecutionRequest, limit: int, turn: int
    ) -> NewExecution:
        """One CreateExecutions item, decoded as CreateExecution (no flow members)."""
        if item.ByteSize() > limit:
            raise FlowFabricError(
                "payload_too_large",
                message=f"item is {item.ByteSize()} bytes; the limit is {limit}",
                metadata={"limit_bytes": str(limit)},
            )
        if item.HasField("flow_id"):
            raise InvalidInput(
                "flow_id", "a flow member is created with CreateExecution or SubmitFlow"
            )
        new, _ = await self._decode_create(item, turn)
        return new

    async def CreateExecutions(
        self, request: pb.CreateExecutionsRequest, context: Any
    ) -> pb.CreateExecutionsResponse:
        """Each item decoded as CreateExecution; one `ff_create_executions` per partition (the
        partitions concurrently); one result per item, in order (docs/lifecycle.md#batch-create).
        """
        if not request.items:
            raise InvalidInput("items", "at least one create is required")
        if len(request.items) > MAX_CREATES:
            raise InvalidInput("items", f"at most {MAX_CREATES} creates per call")
        limit = limits.REQUEST_LIMITS["/flowfabric.v1.ExecutionService/CreateExecution"]
        result = pb.CreateExecutionsResponse.Result
        results: list[pb.CreateExecutionsResponse.Result | None] = [None] * len(request.items)
        groups: dict[int, list[tuple[int, NewExecution]]] = {}
        # one turn for the batch: its items of one lane without an idempotency key share a
        # partition, so the batch stays one call per lane (docs/lifecycle.md#lanes-across-a-cluster)
        turn = self.lane_parts.next_create()
        for i, item in enumerate(request.items):
            try:
                new = await self._decode_item(item, limit, turn)
            except FlowFabricError as exc:
                results[i] = result(error=create_item_error(exc))
                continue
            groups.setdefault(new.execution_id.partition, []).append((i, new))
        created = False

        async def run(partition: int, entries: list[tuple[int, NewExecution]]) -> None:
            nonlocal created
            try:
                many = await self.fn.execution.create_executions(
                    entries[0][1].execution_id.tag, partition, [x for _, x in entries]
                )
                answers: list[Any] = list(many.results)
            except FlowFabricError as exc:  # the partition's call failed as a whole
                answers = [exc] * len(entries)
            for (i, _), one in zip(entries, answers, strict=True):
                answer = results[i] = create_result(one)
                created = created or answer.HasField("created")

        await asyncio.gather(*(run(p, entries) for p, entries in groups.items()))
        if created and self.on_created is not None:
            self.on_created()
        return pb.CreateExecutionsResponse(results=[r for r in results if r is not None])

    async def GetExecution(
        self, request: pb.GetExecutionRequest, context: Any
    ) -> pb.GetExecutionResponse:
        eid = self.ctx.execution_id(request.execution_id)
        return pb.GetExecutionResponse(execution=await reads.get_execution(self.ctx.store, eid))

    async def GetExecutionState(
        self, request: pb.GetExecutionStateRequest, context: Any
    ) -> pb.GetExecutionStateResponse:
        eid = self.ctx.execution_id(request.execution_id)
        state = await reads.get_public_state(self.ctx.store, eid)
        return pb.GetExecutionStateResponse(public_state=state)  # type: ignore[arg-type]

    async def DescribeExecution(
        self, request: pb.DescribeExecutionRequest, context: Any
    ) -> pb.DescribeExecutionResponse:
        eid = self.ctx.execution_id(request.execution_id)
        cfg = self.ctx.config
        places = Places(cfg.budget_partitions, cfg.quota_partitions)
        snapshot, why = await reads.describe_execution(self.ctx.store, eid, places)
        return pb.DescribeExecutionResponse(snapshot=snapshot, why=why)

    async def GetExecutionResult(
        self, request: pb.GetExecutionResultRequest, context: Any
    ) -> pb.GetExecutionResultResponse:
        eid = self.ctx.execution_id(request.execution_id)
        payload, encoding = await reads.get_result(self.ctx.store, eid)
        return pb.GetExecutionResultResponse(result_payload=payload, result_encoding=encoding)

    async def ListExecutions(
        self, request: pb.ListExecutionsRequest, context: Any
    ) -> pb.ListExecutionsResponse:
        lane = validate_lane(request.lane or DEFAULT_LANE, "lane")
        if request.state not in pb.ExecutionIndex.values():
            raise InvalidInput("state", f"unknown state {request.state}")
        state = enum_text(pb.ExecutionIndex, request.state) or "eligible"
        limit = request.limit or limits.LIST_PAGE_DEFAULT
        if limit > limits.LIST_PAGE_MAX:
            raise InvalidInput("limit", f"limit must be at most {limits.LIST_PAGE_MAX}")
        partition = request.partition if request.HasField("partition") else None
        if partition is not None and partition >= self.ctx.partitions:
            raise InvalidInput("partition", "partition is out of range")
        bounds.check_count(bounds.LIST_ITEMS, len(request.public_states), "public_states")
        public_states = frozenset(request.public_states)
        if (
            public_states - set(t.PublicState.values())
            or t.PUBLIC_STATE_UNSPECIFIED in public_states
        ):
            raise InvalidInput("public_states", "public_states holds an unknown public state")
        page = reads.Page.parse(request.page_token) if request.page_token else None
        if page and partition is not None and page.partition != partition:
            raise InvalidInput("page_token", "page_token belongs to another partition")
        if page and not 0 <= page.partition < self.ctx.partitions:
            raise InvalidInput("page_token", "page_token is out of range")
        rows, next_page = await reads.list_executions(
            self.ctx.store,
            num_partitions=self.ctx.partitions,
            lane=lane,
            state=state,
            limit=limit,
            partition=partition,
            page=page,
            public_states=public_states,
        )
        return pb.ListExecutionsResponse(
            executions=rows,
            total_returned=len(rows),
            next_page_token=next_page.token() if next_page else "",
        )

    async def SetExecutionTags(
        self, request: pb.SetExecutionTagsRequest, context: Any
    ) -> pb.SetExecutionTagsResponse:
        eid = self.ctx.execution_id(request.execution_id)
        if not request.tags:
            raise InvalidInput("tags", "tags must be non-empty")
        reply = await self.fn.execution.set_execution_tags(eid, tags_of(request.tags))
        return pb.SetExecutionTagsResponse(ok=pb.SetExecutionTagsResponse.Ok(count=reply.count))

    async def CancelExecution(
        self, request: pb.CancelExecutionRequest, context: Any
    ) -> pb.CancelExecutionResponse:
        """Operator cancel (operator_override) unless the caller names another source."""
        eid = self.ctx.execution_id(request.execution_id)
        source = cancel_source(request.source, "operator_override")
        fence = Fence(
            request.lease_id,
            request.lease_epoch if request.HasField("lease_epoch") else None,
            request.attempt_id,
        )
        await self.fn.execution.cancel_execution(
            eid, request.reason or "cancelled by operator", source, fence
        )
        return pb.CancelExecutionResponse(
            cancelled=pb.CancelExecutionResponse.Cancelled(
                execution_id=str(eid), public_state=t.PUBLIC_STATE_CANCELLED
            )
        )

    async def ChangePriority(
        self, request: pb.ChangePriorityRequest, context: Any
    ) -> pb.ChangePriorityResponse:
        eid = self.ctx.execution_id(request.execution_id)
        await self.fn.scheduling.change_priority(eid, request.new_priority)
        return pb.ChangePriorityResponse(
            changed=pb.ChangePriorityResponse.Changed(execution_id=str(eid))
        )

    async def ReplayExecution(
        self, request: pb.ReplayExecutionRequest, context: Any
    ) -> pb.ReplayExecutionResponse:
        eid = self.ctx.execution_id(request.execution_id)
        inbound = await flow_reads.replay_inbound_edges(self.ctx.store, eid)
        reply = await self.fn.execution.replay_execution(eid, inbound)
        if self.on_created is not None:
            self.on_created()
        return pb.ReplayExecutionResponse(
            replayed=pb.ReplayExecutionResponse.Replayed(
                public_state=enum_value(t.PublicState, reply.public_state)
            )
        )

    async def ResumeExecution(
        self, request: pb.ResumeExecutionRequest, context: Any
    ) -> pb.ResumeExecutionResponse:
        """Operator resume of a suspended execution (docs/suspension.md#resume); the trigger is
        recorded as
        the waitpoint's close reason."""
        eid = self.ctx.execution_id(request.execution_id)
        trigger = request.trigger_type or "operator"
        if trigger not in RESUME_TRIGGERS:
            raise InvalidInput(
                "trigger_type", f"trigger_type must be one of {', '.join(RESUME_TRIGGERS)}"
            )
        limits.check(bounds.HORIZON_MS, request.resume_delay_ms, "resume_delay_ms")
        reply = await self.fn.suspension.resume_execution(eid, trigger, request.resume_delay_ms)
        if self.on_created is not None:
            self.on_created()
        return pb.ResumeExecutionResponse(
            resumed=pb.ResumeExecutionResponse.Resumed(
                public_state=enum_value(t.PublicState, reply.public_state)
            )
        )

    async def RevokeLease(
        self, request: pb.RevokeLeaseRequest, context: Any
    ) -> pb.RevokeLeaseResponse:
        eid = self.ctx.execution_id(request.execution_id)
        # No holder: answered by the server without calling (docs/lifecycle.md#revoke,
        # docs/lifecycle.md#revoke).
        phase, holder = await self.ctx.store.call(
            "HMGET", ExecKeys(eid).core, "lifecycle_phase", "current_worker_instance_id"
        )
        if phase is None:
            raise FlowFabricError("execution_not_found", message=f"no execution {eid}")
        if not text(holder):
            raise FlowFabricError(
                "no_active_lease", message=f"execution {eid} has no lease holder to revoke"
            )
        reply = await self.fn.lease.revoke_lease(
            eid, request.expected_lease_id, request.reason or "operator_revoke"
        )
        if not isinstance(reply, Revoked):
            return pb.RevokeLeaseResponse(
                already_satisfied=pb.RevokeLeaseResponse.AlreadySatisfied(reason=reply.outcome)
            )
        return pb.RevokeLeaseResponse(
            revoked=pb.RevokeLeaseResponse.Revoked(
                lease_id=reply.lease_id, lease_epoch=reply.lease_epoch
            )
        )

    async def WatchExecution(
        self, request: pb.WatchExecutionRequest, context: Any
    ) -> AsyncIterator[pb.WatchExecutionResponse]:
        """The current state, then each public-state transition and progress update; ends after
        a terminal state (docs/lifecycle.md#priority-and-progress).

        Event-driven: the function making a change publishes on the partition's channel. The
        stored state is read after subscribing, so nothing between the read and the first
        event is missed; every event triggers a re-read of the record (authoritative, never
        out of order), so a slow watcher gets the latest state rather than every intermediate.
        """
        eid = self.ctx.execution_id(request.execution_id)
        if self.hub is None:
            raise FlowFabricError("backend_unavailable", message="watches are not available")
        channel = PartitionKeys(eid.tag).exec_events
        changed = asyncio.Event()

        def on_event(event: dict[str, Any]) -> None:
            if event.get("execution_id") == str(eid) or event.get("type") == "resync":
                changed.set()

        async with self.hub.listen(channel, on_event):
            async with asyncio.timeout(5):
                await self.hub.wait_subscribed(channel)
            last: int | None = None
            last_progress: bytes | None = None
            while True:
                # cleared before the read: an event landing during the read or the yield
                # below triggers another read instead of being lost
                changed.clear()
                info = await reads.get_execution(self.ctx.store, eid)
                at, pct, msg, progress_at = await self.ctx.store.call(
                    "HMGET", ExecKeys(eid).core, "last_transition_at", "progress_pct",
                    "progress_message", "progress_updated_at",
                )  # fmt: skip
                if info.public_state != last or progress_at != last_progress:
                    last, last_progress = info.public_state, progress_at
                    out = pb.WatchExecutionResponse(
                        public_state=info.public_state, at=int(text(at) or 0), execution=info
                    )
                    if text(progress_at):
                        out.progress_updated_at = int(text(progress_at))
                        if text(pct):
                            out.progress_pct = int(text(pct))
                        if msg is not None:
                            out.progress_message = text(msg)
                    yield out
                if last in TERMINAL_PUBLIC:
                    return
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(WATCH_BACKSTOP_S):
                        await changed.wait()
