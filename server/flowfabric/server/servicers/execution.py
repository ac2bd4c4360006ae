"""ExecutionService: create, read, list and tag executions (spec 10 §2.1, §2.19, §2.20)."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format

from flowfabric.server import limits, reads
from flowfabric.server.codec import enum_text, enum_value
from flowfabric.server.errors import FlowFabricError, InvalidInput, not_implemented
from flowfabric.server.functions import NewExecution
from flowfabric.server.ids import (
    ExecutionId,
    mint_execution_id,
    solo_partition,
    validate_lane,
)
from flowfabric.server.servicers.base import ServerContext, pending
from flowfabric.v1 import execution_pb2 as pb
from flowfabric.v1 import execution_pb2_grpc as rpc
from flowfabric.v1 import types_pb2 as t

DEFAULT_LANE = "default"
DEFAULT_NAMESPACE = "default"


def policy_json(request: pb.CreateExecutionRequest) -> str:
    """The policy as the JSON the functions read (spec 00 §9): unset fields omitted."""
    which = request.WhichOneof("policy_spec")
    if which == "policy_json":
        return request.policy_json
    if which == "policy":
        return json_format.MessageToJson(
            request.policy, preserving_proto_field_name=True, indent=None, sort_keys=True
        )
    return ""


@pending(pb.DESCRIPTOR.services_by_name["ExecutionService"], "the core lifecycle work (issue 3)")
class ExecutionServicer(rpc.ExecutionServiceServicer):  # type: ignore[misc]
    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx

    def _new_id(self, request: pb.CreateExecutionRequest, lane: str) -> ExecutionId:
        if request.execution_id:
            eid = self.ctx.execution_id(request.execution_id)
            if request.HasField("partition_id") and request.partition_id != eid.partition:
                raise InvalidInput(
                    "partition_id",
                    f"partition_id {request.partition_id} does not match the execution id's "
                    f"partition {eid.partition}",
                )
            return eid
        partition = solo_partition(lane, self.ctx.partitions)
        if request.HasField("partition_id"):
            if request.partition_id >= self.ctx.partitions:
                raise InvalidInput("partition_id", "partition_id is out of range")
            partition = request.partition_id
        return mint_execution_id(partition)

    async def CreateExecution(
        self, request: pb.CreateExecutionRequest, context: Any
    ) -> pb.CreateExecutionResponse:
        lane = validate_lane(request.lane_id or DEFAULT_LANE)
        if not request.execution_kind:
            raise InvalidInput("execution_kind", "execution_kind is required")
        if len(request.input_payload) > limits.INPUT_PAYLOAD_MAX:
            raise FlowFabricError(
                "payload_too_large",
                message=f"input_payload is {len(request.input_payload)} bytes; the limit is "
                f"{limits.INPUT_PAYLOAD_MAX}",
                metadata={"limit_bytes": str(limits.INPUT_PAYLOAD_MAX)},
            )
        if request.HasField("flow_id"):
            raise not_implemented("CreateExecution with flow_id", "the flows work")
        eid = self._new_id(request, lane)
        reply = await self.ctx.functions.create_execution(
            NewExecution(
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
                tags=dict(request.tags),
                delay_until=request.delay_until if request.HasField("delay_until") else None,
                execution_deadline_at=(
                    request.execution_deadline_at
                    if request.HasField("execution_deadline_at")
                    else None
                ),
                quota_policy_id=request.quota_policy_id,
            )
        )
        if reply.status == "DUPLICATE":
            return pb.CreateExecutionResponse(
                duplicate=pb.CreateExecutionResponse.Duplicate(execution_id=reply.str(0))
            )
        return pb.CreateExecutionResponse(
            created=pb.CreateExecutionResponse.Created(
                execution_id=reply.str(0),
                public_state=enum_value(t.PublicState, reply.str(1)),
            )
        )

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
        snapshot = await reads.describe_execution(self.ctx.store, eid)
        return pb.DescribeExecutionResponse(snapshot=snapshot)

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
        reply = await self.ctx.functions.set_execution_tags(eid, dict(request.tags))
        return pb.SetExecutionTagsResponse(ok=pb.SetExecutionTagsResponse.Ok(count=reply.int(0)))
