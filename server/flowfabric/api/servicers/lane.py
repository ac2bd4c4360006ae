"""LaneService: lane control and bulk actions (docs/lanes.md) over `engine/lanes.py` and
`engine/bulk.py`; depth by state comes from `valkey/lane_reads.py`, the one depth read."""

from __future__ import annotations

from typing import Any

from flowfabric.server.api import limits
from flowfabric.server.api.servicers.base import ServerContext
from flowfabric.server.engine.bulk import BulkFilter, BulkJobs, Job
from flowfabric.server.engine.lanes import REASON_MAX, LaneControls, LaneState
from flowfabric.server.valkey import bounds, lane_reads
from flowfabric.server.valkey.errors import FlowFabricError, InvalidInput
from flowfabric.server.valkey.ids import (
    is_valid_tag_key,
    parse_uuid,
    validate_identifier,
    validate_lane,
)
from flowfabric.server.valkey.store import server_time_ms
from flowfabric.v1 import lane_pb2 as pb
from flowfabric.v1 import lane_pb2_grpc as rpc
from flowfabric.v1 import types_pb2 as t

CONTROL = {
    "active": pb.LANE_CONTROL_ACTIVE,
    "paused": pb.LANE_CONTROL_PAUSED,
    "draining": pb.LANE_CONTROL_DRAINING,
}
ACTION = {pb.BULK_ACTION_KIND_CANCEL: "cancel", pb.BULK_ACTION_KIND_REPLAY: "replay"}
ACTION_ENUM = {v: k for k, v in ACTION.items()}
JOB_STATE = {
    "running": pb.BULK_ACTION_STATE_RUNNING,
    "completed": pb.BULK_ACTION_STATE_COMPLETED,
    "cancelled": pb.BULK_ACTION_STATE_CANCELLED,
}
LIST_DEFAULT, LIST_MAX = 100, 1000
TAGS_MAX = 256


def _state_name(value: int) -> str:
    """PUBLIC_STATE_WAITING_CHILDREN -> waiting_children."""
    try:
        return t.PublicState.Name(value).removeprefix("PUBLIC_STATE_").lower()  # type: ignore[arg-type]
    except ValueError:
        raise InvalidInput("filter.states", f"unknown public state {value}") from None


def filter_of(m: pb.BulkFilter) -> BulkFilter:
    lane = validate_lane(m.lane_id, "filter.lane_id") if m.lane_id else ""
    if m.execution_kind:
        validate_identifier(m.execution_kind, "filter.execution_kind")
    if len(m.tags) > TAGS_MAX:
        raise InvalidInput("filter.tags", f"at most {TAGS_MAX} tags")
    for key in m.tags:
        if not is_valid_tag_key(key):
            raise InvalidInput("filter.tags", f"tag key {key!r} is not a namespace.key name")
    limits.check(bounds.HORIZON_MS, m.older_than_ms, "filter.older_than_ms")
    states = tuple(dict.fromkeys(_state_name(s) for s in m.states))
    if "unspecified" in states:
        raise InvalidInput("filter.states", "PUBLIC_STATE_UNSPECIFIED is not a state")
    return BulkFilter(lane, states, m.execution_kind, dict(m.tags), m.older_than_ms)


def filter_msg(f: BulkFilter) -> pb.BulkFilter:
    return pb.BulkFilter(
        lane_id=f.lane_id, execution_kind=f.execution_kind, tags=dict(f.tags),
        older_than_ms=f.older_than_ms,
        states=[t.PublicState.Value("PUBLIC_STATE_" + s.upper()) for s in f.states],
    )  # fmt: skip


def job_msg(j: Job) -> pb.BulkAction:
    return pb.BulkAction(
        bulk_action_id=j.bulk_id, action=ACTION_ENUM[j.action], filter=filter_msg(j.filter),
        state=JOB_STATE.get(j.state, pb.BULK_ACTION_STATE_UNSPECIFIED), total=j.total,
        done=j.done, skipped=j.skipped, failed=j.failed, last_error=j.last_error,
        reason=j.reason, created_at=j.created_at, updated_at=j.updated_at,
        finished_at=j.finished_at,
    )  # fmt: skip


def lane_msg(lane: str, control: LaneState, depth: lane_reads.LaneDepth, now: int) -> pb.Lane:
    return pb.Lane(
        lane_id=lane, control=CONTROL[control.state], reason=control.reason,
        control_changed_at=control.at, depth=depth.counts, head_age_ms=depth.head_age_ms(now),
        drained=control.state == "draining"
        and all(n == 0 for s, n in depth.counts.items() if s != "terminal"),
    )  # fmt: skip


def _reason(value: str) -> str:
    if len(value.encode()) > REASON_MAX:
        raise InvalidInput("reason", f"reason must be at most {REASON_MAX} bytes")
    return value


class LaneServicer(rpc.LaneServiceServicer):
    def __init__(self, ctx: ServerContext, controls: LaneControls, jobs: BulkJobs) -> None:
        self.ctx, self.controls, self.jobs = ctx, controls, jobs

    async def _lane(self, lane: str) -> pb.Lane:
        now = await server_time_ms(self.ctx.store)
        depths = await lane_reads.lane_depths(
            self.ctx.store, range(self.ctx.partitions), lanes=[lane], now_ms=now
        )
        return lane_msg(lane, await self.controls.get(lane), depths[lane], now)

    async def _set(self, lane_id: str, state: str, reason: str = "") -> pb.Lane:
        lane = validate_lane(lane_id)
        await self.controls.set(lane, state, _reason(reason))
        return await self._lane(lane)

    async def PauseLane(self, request: pb.PauseLaneRequest, context: Any) -> pb.PauseLaneResponse:
        return pb.PauseLaneResponse(lane=await self._set(request.lane_id, "paused", request.reason))

    async def ResumeLane(
        self, request: pb.ResumeLaneRequest, context: Any
    ) -> pb.ResumeLaneResponse:
        return pb.ResumeLaneResponse(lane=await self._set(request.lane_id, "active"))

    async def DrainLane(self, request: pb.DrainLaneRequest, context: Any) -> pb.DrainLaneResponse:
        return pb.DrainLaneResponse(
            lane=await self._set(request.lane_id, "draining", request.reason)
        )

    async def ListLanes(self, request: pb.ListLanesRequest, context: Any) -> pb.ListLanesResponse:
        now = await server_time_ms(self.ctx.store)
        controls = await self.controls.all()
        parts = range(self.ctx.partitions)
        known = await lane_reads.known_lanes(self.ctx.store, parts)
        depths = await lane_reads.lane_depths(
            self.ctx.store, parts, lanes=known | set(controls), now_ms=now
        )
        return pb.ListLanesResponse(
            lanes=[
                lane_msg(lane, controls.get(lane, LaneState()), depths[lane], now)
                for lane in sorted(depths)
            ]
        )

    async def GetLane(self, request: pb.GetLaneRequest, context: Any) -> pb.GetLaneResponse:
        return pb.GetLaneResponse(lane=await self._lane(validate_lane(request.lane_id)))

    async def StartBulkAction(
        self, request: pb.StartBulkActionRequest, context: Any
    ) -> pb.StartBulkActionResponse:
        action = ACTION.get(request.action)
        if action is None:
            raise InvalidInput("action", "action must be BULK_ACTION_KIND_CANCEL or _REPLAY")
        flt = filter_of(request.filter)
        reason = _reason(request.reason)
        if request.dry_run:
            return pb.StartBulkActionResponse(matched=await self.jobs.dry_run(action, flt))
        if not request.request_id:
            raise InvalidInput("request_id", "request_id is required (mint a UUID once)")
        request_id = parse_uuid(request.request_id, "request_id")
        job, duplicate = await self.jobs.start(action, flt, reason, request_id)
        return pb.StartBulkActionResponse(
            matched=job.total, bulk_action=job_msg(job), duplicate=duplicate
        )

    async def _job(self, bulk_id: str) -> Job:
        job = await self.jobs.read(parse_uuid(bulk_id, "bulk_action_id"))
        if job is None:
            raise FlowFabricError("bulk_action_not_found", message=f"no bulk action {bulk_id}")
        return job

    async def GetBulkAction(
        self, request: pb.GetBulkActionRequest, context: Any
    ) -> pb.GetBulkActionResponse:
        job = await self._job(request.bulk_action_id)
        return pb.GetBulkActionResponse(bulk_action=job_msg(job))

    async def ListBulkActions(
        self, request: pb.ListBulkActionsRequest, context: Any
    ) -> pb.ListBulkActionsResponse:
        size = request.page_size or LIST_DEFAULT
        if size > LIST_MAX:
            raise InvalidInput("page_size", f"page_size must be at most {LIST_MAX}")
        token = request.page_token
        if token and not (token.isdigit() and len(token) <= 12):
            raise InvalidInput("page_token", "malformed page_token")
        offset = int(token or 0)
        jobs, more = await self.jobs.list_jobs(offset, size)
        return pb.ListBulkActionsResponse(
            bulk_actions=[job_msg(j) for j in jobs],
            next_page_token=str(offset + size) if more else "",
        )

    async def CancelBulkAction(
        self, request: pb.CancelBulkActionRequest, context: Any
    ) -> pb.CancelBulkActionResponse:
        await self._job(request.bulk_action_id)
        job = await self.jobs.cancel(request.bulk_action_id)
        assert job is not None
        return pb.CancelBulkActionResponse(bulk_action=job_msg(job))
