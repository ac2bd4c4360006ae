"""The client's ScheduleService part: periodic work (docs/schedules.md).

`create_schedule` mints the id before the first attempt, so a retry after UNAVAILABLE answers the
existing schedule instead of creating a second one; `trigger_schedule` does the same with its
request id.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Literal

from flowfabric._transport import Connected, pages
from flowfabric.v1 import schedule_pb2

Overlap = Literal["skip", "allow", "cancel_previous"]
CatchUp = Literal["none", "last", "all"]
_OVERLAP = {"skip": 1, "allow": 2, "cancel_previous": 3}
_CATCH_UP = {"none": 1, "last": 2, "all": 3}


@dataclass(frozen=True)
class Schedule:
    """A schedule as stored; `next_fire_times` only from `schedule()`."""

    schedule_id: str
    state: str
    cron: str
    time_zone: str
    interval_ms: int
    execution_kind: str
    lane_id: str
    overlap: str
    catch_up: str
    next_fire_at: int
    fire_count: int
    skip_count: int
    last_execution_id: str
    next_fire_times: tuple[int, ...] = ()

    @classmethod
    def from_proto(cls, m: schedule_pb2.Schedule, nxt: tuple[int, ...] = ()) -> Schedule:
        s = m.spec
        return cls(
            schedule_id=m.schedule_id, state=m.state, cron=s.cron, time_zone=s.time_zone,
            interval_ms=s.interval_ms, execution_kind=s.template.execution_kind,
            lane_id=s.template.lane_id,
            overlap={v: k for k, v in _OVERLAP.items()}.get(s.overlap, "skip"),
            catch_up={v: k for k, v in _CATCH_UP.items()}.get(s.catch_up, "none"),
            next_fire_at=m.next_fire_at, fire_count=m.fire_count, skip_count=m.skip_count,
            last_execution_id=m.last_execution_id, next_fire_times=nxt,
        )  # fmt: skip


class SchedulesMixin(Connected):
    """Schedules (ScheduleService)."""

    async def create_schedule(
        self,
        kind: str,
        *,
        cron: str = "",
        interval_ms: int = 0,
        time_zone: str = "",
        lane: str = "default",
        payload: bytes = b"",
        priority: int = 0,
        policy_json: str = "",
        overlap: Overlap = "skip",
        catch_up: CatchUp = "none",
        catch_up_window_ms: int = 0,
        schedule_id: str | None = None,
    ) -> tuple[str, bool]:
        """Create a schedule submitting `kind` on `cron` (5 fields, in `time_zone`) or every
        `interval_ms`; returns (schedule id, created). The same id and spec again answers
        created=False.

        Raises:
            InvalidArgument: `invalid_cron` (ErrorInfo `field` names the cron field),
                `invalid_time_zone`, `invalid_schedule`, `invalid_policy_json`.
            AlreadyExists: `schedule_exists` (the id holds another spec).
        """
        spec = schedule_pb2.ScheduleSpec(
            time_zone=time_zone,
            template=schedule_pb2.ExecutionTemplate(
                execution_kind=kind, lane_id=lane, input_payload=payload, priority=priority,
                policy_json=policy_json,
            ),
            overlap=_OVERLAP[overlap],  # type: ignore[arg-type]
            catch_up=_CATCH_UP[catch_up],  # type: ignore[arg-type]
            catch_up_window_ms=catch_up_window_ms,
        )  # fmt: skip
        if cron:
            spec.cron = cron
        if interval_ms:
            spec.interval_ms = interval_ms
        request = schedule_pb2.CreateScheduleRequest(
            schedule_id=schedule_id or str(uuid.uuid4()), spec=spec
        )
        t = self._transport
        reply = await t.unary(t.schedules.CreateSchedule, request)
        return reply.schedule_id, reply.created

    async def schedule(self, schedule_id: str, *, next_count: int = 5) -> Schedule:
        """The schedule and its next `next_count` fire times (epoch ms).

        Raises:
            NotFound: `schedule_not_found`.
        """
        t = self._transport
        reply = await t.unary(
            t.schedules.GetSchedule,
            schedule_pb2.GetScheduleRequest(schedule_id=schedule_id, next_count=next_count),
        )
        return Schedule.from_proto(reply.schedule, tuple(reply.next_fire_times))

    async def schedules(self, *, page_size: int = 100) -> AsyncGenerator[Schedule, None]:
        """Every schedule, page by page."""
        t = self._transport

        async def fetch(token: str) -> schedule_pb2.ListSchedulesResponse:
            request = schedule_pb2.ListSchedulesRequest(page_size=page_size, page_token=token)
            return await t.unary(t.schedules.ListSchedules, request)

        async for page in pages(fetch):
            for m in page.schedules:
                yield Schedule.from_proto(m)

    async def pause_schedule(self, schedule_id: str) -> None:
        t = self._transport
        await t.unary(
            t.schedules.PauseSchedule, schedule_pb2.PauseScheduleRequest(schedule_id=schedule_id)
        )

    async def resume_schedule(self, schedule_id: str) -> int:
        """Resume from the first slot after now; returns that slot (epoch ms)."""
        t = self._transport
        reply = await t.unary(
            t.schedules.ResumeSchedule, schedule_pb2.ResumeScheduleRequest(schedule_id=schedule_id)
        )
        return reply.next_fire_at

    async def delete_schedule(self, schedule_id: str) -> None:
        t = self._transport
        await t.unary(
            t.schedules.DeleteSchedule, schedule_pb2.DeleteScheduleRequest(schedule_id=schedule_id)
        )

    async def trigger_schedule(
        self, schedule_id: str, *, request_id: str | None = None
    ) -> tuple[str, bool]:
        """Submit the template now; returns (execution id, duplicate)."""
        t = self._transport
        request = schedule_pb2.TriggerScheduleRequest(
            schedule_id=schedule_id, request_id=request_id or str(uuid.uuid4())
        )
        reply = await t.unary(t.schedules.TriggerSchedule, request)
        return reply.execution_id, reply.duplicate
