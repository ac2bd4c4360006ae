"""ScheduleService: schedules over `engine/schedules.py` (docs/schedules.md)."""

from __future__ import annotations

from typing import Any

from flowfabric.server.api import limits
from flowfabric.server.api.servicers.base import ServerContext
from flowfabric.server.engine.schedules import (
    CATCH_UP,
    OVERLAP,
    ScheduleEngine,
    ScheduleSpec,
    Template,
)
from flowfabric.server.valkey import bounds, budget_reads
from flowfabric.server.valkey.errors import FlowFabricError, InvalidInput
from flowfabric.server.valkey.ids import SCHEDULE_PARTITIONS, parse_uuid
from flowfabric.server.valkey.keys import ScheduleKeys
from flowfabric.server.valkey.store import server_time_ms
from flowfabric.v1 import schedule_pb2 as pb
from flowfabric.v1 import schedule_pb2_grpc as rpc

LIST_DEFAULT = 100
NEXT_DEFAULT = 5
NEXT_MAX = 100
DAY_MS = 24 * 3600_000


def _enum(value: int, names: tuple[str, ...], field: str) -> str:
    """OVERLAP_POLICY_SKIP=1 -> names[0]; 0 = the default (names[0])."""
    if value == 0:
        return names[0]
    if not 1 <= value <= len(names):
        raise InvalidInput(field, f"{field} {value} is not a known value")
    return names[value - 1]


# proto enum order: SKIP, ALLOW, CANCEL_PREVIOUS / NONE, LAST, ALL
OVERLAP_ORDER = ("skip", "allow", "cancel_previous")
CATCH_UP_ORDER = ("none", "last", "all")
assert set(OVERLAP_ORDER) == set(OVERLAP) and set(CATCH_UP_ORDER) == set(CATCH_UP)


def spec_of(m: pb.ScheduleSpec, now_ms: int) -> ScheduleSpec:
    t = m.template
    if len(t.input_payload) > limits.INPUT_PAYLOAD_MAX:
        raise InvalidInput("spec.template.input_payload", "input_payload is too large")
    return ScheduleSpec(
        template=Template(
            execution_kind=t.execution_kind, lane_id=t.lane_id or "default",
            namespace=t.namespace or "default", input_payload=t.input_payload,
            priority=t.priority, policy_json=t.policy_json, payload_encoding=t.payload_encoding,
        ),
        cron=m.cron if m.WhichOneof("timetable") == "cron" else "",
        time_zone=m.time_zone,
        interval_ms=m.interval_ms if m.WhichOneof("timetable") == "interval_ms" else 0,
        anchor_ms=(m.anchor_ms or now_ms) if m.WhichOneof("timetable") == "interval_ms" else 0,
        overlap=_enum(m.overlap, OVERLAP_ORDER, "spec.overlap"),
        catch_up=_enum(m.catch_up, CATCH_UP_ORDER, "spec.catch_up"),
        catch_up_window_ms=m.catch_up_window_ms or DAY_MS,
    )  # fmt: skip


def spec_msg(s: ScheduleSpec) -> pb.ScheduleSpec:
    t = s.template
    m = pb.ScheduleSpec(
        time_zone=s.time_zone, anchor_ms=s.anchor_ms,
        template=pb.ExecutionTemplate(
            execution_kind=t.execution_kind, lane_id=t.lane_id, namespace=t.namespace,
            input_payload=t.input_payload, payload_encoding=t.payload_encoding,
            priority=t.priority, policy_json=t.policy_json,
        ),
        overlap=pb.OverlapPolicy.ValueType(OVERLAP_ORDER.index(s.overlap) + 1),
        catch_up=pb.CatchUpPolicy.ValueType(CATCH_UP_ORDER.index(s.catch_up) + 1),
        catch_up_window_ms=s.catch_up_window_ms,
    )  # fmt: skip
    if s.cron:
        m.cron = s.cron
    else:
        m.interval_ms = s.interval_ms
    return m


def schedule_msg(row: dict[str, str]) -> pb.Schedule:
    return pb.Schedule(
        schedule_id=row["schedule_id"], spec=spec_msg(ScheduleSpec.from_json(row["spec"])),
        state=row.get("state", ""), next_fire_at=int(row.get("cursor", "0")),
        fire_count=int(row.get("fire_count", "0")), skip_count=int(row.get("skip_count", "0")),
        last_execution_id=row.get("last_execution_id", ""),
        created_at=int(row.get("created_at", "0")),
    )  # fmt: skip


class ScheduleServicer(rpc.ScheduleServiceServicer):
    def __init__(self, ctx: ServerContext, engine: ScheduleEngine) -> None:
        self.ctx, self.engine = ctx, engine

    async def _row(self, schedule_id: str) -> dict[str, str]:
        row = await self.engine.read(parse_uuid(schedule_id, "schedule_id"))
        if row is None:
            raise FlowFabricError("schedule_not_found", message=f"no schedule {schedule_id}")
        return row

    async def CreateSchedule(
        self, request: pb.CreateScheduleRequest, context: Any
    ) -> pb.CreateScheduleResponse:
        sid = parse_uuid(request.schedule_id, "schedule_id") if request.schedule_id else ""
        now = await server_time_ms(self.ctx.store)
        spec = spec_of(request.spec, now)
        existed = bool(sid) and await self.engine.read(sid) is not None
        sid = await self.engine.create(spec, now, sid)
        return pb.CreateScheduleResponse(schedule_id=sid, created=not existed)

    async def GetSchedule(
        self, request: pb.GetScheduleRequest, context: Any
    ) -> pb.GetScheduleResponse:
        if request.next_count > NEXT_MAX:
            raise InvalidInput("next_count", f"next_count must be at most {NEXT_MAX}")
        row = await self._row(request.schedule_id)
        nxt = await self.engine.upcoming(row["schedule_id"], request.next_count or NEXT_DEFAULT)
        return pb.GetScheduleResponse(schedule=schedule_msg(row), next_fire_times=nxt)

    async def ListSchedules(
        self, request: pb.ListSchedulesRequest, context: Any
    ) -> pb.ListSchedulesResponse:
        if request.page_size > bounds.PAGE.hi:
            raise InvalidInput("page_size", f"page_size must be at most {bounds.PAGE.hi}")
        n = SCHEDULE_PARTITIONS
        page = budget_reads.Page.parse(request.page_token, n) if request.page_token else None

        async def read(part: int, sid: str) -> pb.Schedule | None:
            row = await self.engine.read(sid)
            return schedule_msg(row) if row else None

        rows, nxt = await budget_reads.list_page(
            self.ctx.store, n, lambda p: ScheduleKeys.of(p).all, read,
            request.page_size or LIST_DEFAULT, page,
        )  # fmt: skip
        return pb.ListSchedulesResponse(schedules=rows, next_page_token=nxt.token() if nxt else "")

    async def PauseSchedule(
        self, request: pb.PauseScheduleRequest, context: Any
    ) -> pb.PauseScheduleResponse:
        await self.engine.pause(parse_uuid(request.schedule_id, "schedule_id"))
        return pb.PauseScheduleResponse()

    async def ResumeSchedule(
        self, request: pb.ResumeScheduleRequest, context: Any
    ) -> pb.ResumeScheduleResponse:
        sid = parse_uuid(request.schedule_id, "schedule_id")
        await self.engine.resume(sid, await server_time_ms(self.ctx.store))
        row = await self._row(sid)
        return pb.ResumeScheduleResponse(next_fire_at=int(row["cursor"]))

    async def DeleteSchedule(
        self, request: pb.DeleteScheduleRequest, context: Any
    ) -> pb.DeleteScheduleResponse:
        await self.engine.delete(parse_uuid(request.schedule_id, "schedule_id"))
        return pb.DeleteScheduleResponse()

    async def TriggerSchedule(
        self, request: pb.TriggerScheduleRequest, context: Any
    ) -> pb.TriggerScheduleResponse:
        sid = parse_uuid(request.schedule_id, "schedule_id")
        hi = bounds.LABEL_BYTES.hi
        if not request.request_id or len(request.request_id.encode()) > hi:
            raise InvalidInput("request_id", f"request_id must be 1..{hi} bytes")
        fired = await self.engine.trigger(sid, request.request_id)
        return pb.TriggerScheduleResponse(
            execution_id=fired.execution_id, duplicate=fired.outcome == "duplicate"
        )
