"""ScheduleService over gRPC, both topologies, with the scanner ticked by the test's clock
(docs/schedules.md)."""

from __future__ import annotations

import uuid

import grpc

from flowfabric.v1 import schedule_pb2 as pb
from flowfabric.v1 import schedule_pb2_grpc
from tests.api.util import expect_error, keyspace_dump
from tests.conftest import Api

C = grpc.StatusCode
MIN = 60_000


def stub(api: Api) -> schedule_pb2_grpc.ScheduleServiceStub:
    return schedule_pb2_grpc.ScheduleServiceStub(api.channel)


def spec(**kw: object) -> pb.ScheduleSpec:
    base: dict[str, object] = {
        "cron": "* * * * *",
        "template": pb.ExecutionTemplate(execution_kind="report", lane_id="reports"),
    }
    return pb.ScheduleSpec(**{**base, **kw})  # type: ignore[arg-type]


async def test_create_get_list_tick_trigger(api: Api) -> None:
    s, md = stub(api), api.metadata
    sid = str(uuid.uuid4())
    made = await s.CreateSchedule(
        pb.CreateScheduleRequest(schedule_id=sid, spec=spec()), metadata=md
    )
    assert (made.schedule_id, made.created) == (sid, True)
    again = await s.CreateSchedule(
        pb.CreateScheduleRequest(schedule_id=sid, spec=spec()), metadata=md
    )
    assert again.created is False
    await expect_error(
        s.CreateSchedule(
            pb.CreateScheduleRequest(schedule_id=sid, spec=spec(cron="*/2 * * * *")), metadata=md
        ),
        C.ALREADY_EXISTS,
        "schedule_exists",
    )
    got = await s.GetSchedule(pb.GetScheduleRequest(schedule_id=sid, next_count=3), metadata=md)
    first = got.schedule.next_fire_at
    assert list(got.next_fire_times) == [first, first + MIN, first + 2 * MIN]
    assert got.schedule.spec.overlap == pb.OVERLAP_POLICY_SKIP
    other = await s.CreateSchedule(
        pb.CreateScheduleRequest(spec=spec(interval_ms=5_000)), metadata=md
    )
    page1 = await s.ListSchedules(pb.ListSchedulesRequest(page_size=1), metadata=md)
    page2 = await s.ListSchedules(
        pb.ListSchedulesRequest(page_size=1, page_token=page1.next_page_token), metadata=md
    )
    ids = {x.schedule_id for x in [*page1.schedules, *page2.schedules]}
    assert ids == {sid, other.schedule_id}
    await s.DeleteSchedule(pb.DeleteScheduleRequest(schedule_id=other.schedule_id), metadata=md)
    # the scanner, ticked at the slot by two "replicas": one execution
    eng = api.server.schedules
    fired = [*await eng.tick(first), *await eng.tick(first)]
    assert [(f.schedule_id, f.outcome) for f in fired] == [(sid, "created")]
    await s.PauseSchedule(pb.PauseScheduleRequest(schedule_id=sid), metadata=md)
    assert await eng.tick(first + 5 * MIN) == []
    resumed = await s.ResumeSchedule(pb.ResumeScheduleRequest(schedule_id=sid), metadata=md)
    assert resumed.next_fire_at == first + MIN  # the cursor never moves back
    t1 = await s.TriggerSchedule(
        pb.TriggerScheduleRequest(schedule_id=sid, request_id="r"), metadata=md
    )
    t2 = await s.TriggerSchedule(
        pb.TriggerScheduleRequest(schedule_id=sid, request_id="r"), metadata=md
    )
    assert t1.execution_id == t2.execution_id and (t1.duplicate, t2.duplicate) == (False, True)
    await expect_error(
        s.GetSchedule(pb.GetScheduleRequest(schedule_id=str(uuid.uuid4())), metadata=md),
        C.NOT_FOUND,
        "schedule_not_found",
    )


async def test_bad_input_is_invalid_argument_and_writes_nothing(api: Api) -> None:
    s, md = stub(api), api.metadata
    before = await keyspace_dump(api.store)
    cases = [
        (spec(cron="* * 32 * *"), "invalid_cron", "cron.day_of_month"),
        (spec(time_zone="Mars/Base"), "invalid_time_zone", "time_zone"),
        (spec(interval_ms=10), "invalid_schedule", "interval"),
        (pb.ScheduleSpec(cron="* * * * *"), "invalid_schedule", "template.execution_kind"),
    ]
    for bad, reason, field in cases:
        info = await expect_error(
            s.CreateSchedule(pb.CreateScheduleRequest(spec=bad), metadata=md),
            C.INVALID_ARGUMENT,
            reason,
        )
        assert info.metadata["field"] == field
    await expect_error(
        s.CreateSchedule(pb.CreateScheduleRequest(schedule_id="nope", spec=spec()), metadata=md),
        C.INVALID_ARGUMENT,
        "invalid_input",
    )
    await expect_error(
        s.ListSchedules(pb.ListSchedulesRequest(page_token="!!"), metadata=md),
        C.INVALID_ARGUMENT,
        "invalid_input",
    )
    assert await keyspace_dump(api.store) == before
