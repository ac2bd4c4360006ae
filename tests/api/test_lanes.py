"""Lane control and bulk actions (docs/lanes.md): a paused or draining lane hands out nothing on
any claim path and keeps its work; ListLanes/GetLane show depth by state and the control
state; bulk cancel / replay by filter run as durable jobs (driven here by one runner cycle)
with a dry-run count, an empty filter refused, idempotent starts and an audit line each."""

from __future__ import annotations

import asyncio
import logging
import uuid

import grpc
import pytest

from flowfabric.server.api.interceptors import FlowFabricInterceptor
from flowfabric.server.engine import lanes as lane_engine
from flowfabric.v1 import execution_pb2 as epb
from flowfabric.v1 import lane_pb2 as lpb
from flowfabric.v1 import lane_pb2_grpc
from flowfabric.v1 import types_pb2 as t
from flowfabric.v1 import worker_pb2 as wpb
from tests.api.util import expect_error, keyspace_dump
from tests.conftest import Api


def lanes(api: Api) -> lane_pb2_grpc.LaneServiceStub:
    return lane_pb2_grpc.LaneServiceStub(api.channel)


async def create(api: Api, lane: str, kind: str = "k", **tags: str) -> str:
    reply = await api.execution.CreateExecution(
        epb.CreateExecutionRequest(
            execution_kind=kind, lane_id=lane, tags={f"app.{k}": v for k, v in tags.items()}
        ),
        metadata=api.metadata,
    )
    return str(reply.created.execution_id)


async def claim(api: Api, lane: str) -> wpb.ClaimNextResponse:
    return await api.worker.ClaimNext(
        wpb.ClaimNextRequest(
            worker_id="w", worker_instance_id="w-1", lane_ids=[lane], lease_ttl_ms=30_000
        ),
        metadata=api.metadata,
    )


async def state(api: Api, eid: str) -> int:
    reply = await api.execution.GetExecution(
        epb.GetExecutionRequest(execution_id=eid), metadata=api.metadata
    )
    return int(reply.execution.public_state)


async def test_pause_holds_every_claim_path_and_resume_releases(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    lane = f"pause-{uuid.uuid4().hex[:8]}"
    eid = await create(api, lane)
    svc = lanes(api)
    caplog.set_level(logging.INFO, logger="audit")
    paused = await svc.PauseLane(
        lpb.PauseLaneRequest(lane_id=lane, reason="deploy"), metadata=api.metadata
    )
    assert paused.lane.control == lpb.LANE_CONTROL_PAUSED and paused.lane.reason == "deploy"
    assert paused.lane.depth["eligible"] == 1
    assert (await claim(api, lane)).WhichOneof("outcome") == "no_work"
    grant = await api.worker.ClaimForWorker(
        wpb.ClaimForWorkerRequest(
            worker_id="w", worker_instance_id="w-1", lane_id=lane, grant_ttl_ms=5000
        ),
        metadata=api.metadata,
    )
    assert grant.WhichOneof("outcome") == "no_work"
    assert await state(api, eid) == t.PUBLIC_STATE_WAITING  # kept where it was
    described = await api.execution.DescribeExecution(
        epb.DescribeExecutionRequest(execution_id=eid), metadata=api.metadata
    )
    assert described.why.kind == epb.WhyNotRunning.KIND_LANE_PAUSED, described.why
    assert f"lane {lane} is paused: deploy" in described.why.summary
    listed = await svc.ListLanes(lpb.ListLanesRequest(), metadata=api.metadata)
    row = next(x for x in listed.lanes if x.lane_id == lane)
    assert row.control == lpb.LANE_CONTROL_PAUSED and row.depth["eligible"] == 1
    resumed = await svc.ResumeLane(lpb.ResumeLaneRequest(lane_id=lane), metadata=api.metadata)
    assert resumed.lane.control == lpb.LANE_CONTROL_ACTIVE
    described = await api.execution.DescribeExecution(
        epb.DescribeExecutionRequest(execution_id=eid), metadata=api.metadata
    )
    assert described.why.kind == epb.WhyNotRunning.KIND_WAITING_FOR_WORKER
    got = await claim(api, lane)
    assert got.task.lease.execution_id == eid
    lines = [r.getMessage() for r in caplog.records if r.name == "audit"]
    assert any(f"method=PauseLane lane_id={lane} outcome=ok" in x for x in lines), lines
    assert any(f"method=ResumeLane lane_id={lane} outcome=ok" in x for x in lines), lines


async def test_stream_work_honours_a_pause(api: Api) -> None:
    lane = f"stream-{uuid.uuid4().hex[:8]}"
    svc = lanes(api)
    await svc.PauseLane(lpb.PauseLaneRequest(lane_id=lane), metadata=api.metadata)
    eid = await create(api, lane)
    call = api.worker.StreamWork(
        wpb.StreamWorkRequest(worker_id="w", worker_instance_id="w-s", lane_ids=[lane]),
        metadata=api.metadata,
    )
    try:
        first = asyncio.ensure_future(call.read())
        await asyncio.sleep(0.3)  # the stream's claim passes run meanwhile
        assert not first.done() and await state(api, eid) == t.PUBLIC_STATE_WAITING
        await svc.ResumeLane(lpb.ResumeLaneRequest(lane_id=lane), metadata=api.metadata)
        async with asyncio.timeout(30):  # a safety net, not an assertion on timing
            got = await first
        assert got.task.lease.execution_id == eid
    finally:
        call.cancel()


async def test_drain_refuses_creates_hands_out_the_rest_and_reports_drained(api: Api) -> None:
    lane = f"drain-{uuid.uuid4().hex[:8]}"
    running = await create(api, lane)
    waiting = await create(api, lane)
    assert (await claim(api, lane)).task.lease.execution_id == running
    svc = lanes(api)
    drained = await svc.DrainLane(
        lpb.DrainLaneRequest(lane_id=lane, reason="retire"), metadata=api.metadata
    )
    assert drained.lane.control == lpb.LANE_CONTROL_DRAINING and not drained.lane.drained
    assert drained.lane.depth["active"] == 1 and drained.lane.depth["eligible"] == 1
    info = await expect_error(
        create(api, lane), grpc.StatusCode.FAILED_PRECONDITION, "lane_draining"
    )
    assert info.metadata["lane_id"] == lane
    batch = await api.execution.CreateExecutions(
        epb.CreateExecutionsRequest(items=[
            epb.CreateExecutionRequest(execution_kind="k", lane_id=lane),
            epb.CreateExecutionRequest(execution_kind="k", lane_id=f"{lane}-other"),
        ]),
        metadata=api.metadata,
    )  # fmt: skip
    assert batch.results[0].error.reason == "lane_draining"
    assert batch.results[1].HasField("created")
    assert (await claim(api, lane)).task.lease.execution_id == waiting  # the rest is handed out
    for eid in (running, waiting):
        await api.execution.CancelExecution(
            epb.CancelExecutionRequest(execution_id=eid), metadata=api.metadata
        )
    got = await svc.GetLane(lpb.GetLaneRequest(lane_id=lane), metadata=api.metadata)
    assert got.lane.drained and got.lane.depth["terminal"] == 2 and got.lane.reason == "retire"
    await svc.ResumeLane(lpb.ResumeLaneRequest(lane_id=lane), metadata=api.metadata)
    assert await create(api, lane)


async def test_a_pause_through_another_server_is_seen_within_the_cache_ttl(api: Api) -> None:
    controls = lane_engine.LaneControls(api.store)
    lane = f"ttl-{uuid.uuid4().hex[:8]}"
    assert await controls.claimable([lane]) == [lane]
    other = lane_engine.LaneControls(api.store)
    await other.set(lane, "paused")
    controls._read_at -= lane_engine.CACHE_TTL_S  # the copy's age passes the TTL
    assert await controls.claimable([lane, "x"]) == ["x"]
    await other.set(lane, "active")


async def test_bad_lane_input_is_refused_and_changes_nothing(api: Api) -> None:
    svc = lanes(api)
    before = await keyspace_dump(api.store)
    await expect_error(
        svc.PauseLane(lpb.PauseLaneRequest(lane_id=""), metadata=api.metadata),
        grpc.StatusCode.INVALID_ARGUMENT, "invalid_input",
    )  # fmt: skip
    await expect_error(
        svc.DrainLane(lpb.DrainLaneRequest(lane_id="l", reason="x" * 300), metadata=api.metadata),
        grpc.StatusCode.INVALID_ARGUMENT, "invalid_input",
    )  # fmt: skip
    cancel = lpb.BULK_ACTION_KIND_CANCEL
    for flt, action in [
        (lpb.BulkFilter(), cancel),  # empty
        (lpb.BulkFilter(lane_id="l"), lpb.BULK_ACTION_KIND_UNSPECIFIED),
        (lpb.BulkFilter(states=[t.PUBLIC_STATE_COMPLETED]), cancel),
        (lpb.BulkFilter(tags={"nodot": "v"}), cancel),
    ]:
        info = await expect_error(
            svc.StartBulkAction(
                lpb.StartBulkActionRequest(
                    filter=flt, action=action, request_id=str(uuid.uuid4())
                ),
                metadata=api.metadata,
            ),
            grpc.StatusCode.INVALID_ARGUMENT, "invalid_input",
        )  # fmt: skip
        assert info.metadata["field"] in ("filter", "action", "filter.states", "filter.tags")
    await expect_error(
        svc.GetBulkAction(
            lpb.GetBulkActionRequest(bulk_action_id=str(uuid.uuid4())), metadata=api.metadata
        ),
        grpc.StatusCode.NOT_FOUND, "bulk_action_not_found",
    )  # fmt: skip
    assert await keyspace_dump(api.store) == before


async def test_bulk_cancel_then_replay_by_filter(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    lane = f"bulk-{uuid.uuid4().hex[:8]}"
    hit = [await create(api, lane, "mail", team="a") for _ in range(5)]
    other_kind = await create(api, lane, "sms", team="a")
    other_tag = await create(api, lane, "mail", team="b")
    svc = lanes(api)
    flt = lpb.BulkFilter(lane_id=lane, execution_kind="mail", tags={"app.team": "a"})
    cancel = lpb.BULK_ACTION_KIND_CANCEL
    dry = await svc.StartBulkAction(
        lpb.StartBulkActionRequest(filter=flt, action=cancel, dry_run=True),
        metadata=api.metadata,
    )
    assert dry.matched == 5 and not dry.HasField("bulk_action")
    assert {await state(api, e) for e in hit} == {t.PUBLIC_STATE_WAITING}
    caplog.set_level(logging.INFO, logger="audit")
    request = lpb.StartBulkActionRequest(
        filter=flt, action=cancel, reason="bad batch", request_id=str(uuid.uuid4())
    )
    started = await svc.StartBulkAction(request, metadata=api.metadata)
    job = started.bulk_action
    assert started.matched == 5 and job.total == 5
    assert job.state == lpb.BULK_ACTION_STATE_RUNNING
    again = await svc.StartBulkAction(request, metadata=api.metadata)
    assert again.duplicate and again.bulk_action.bulk_action_id == job.bulk_action_id
    runner = api.server.bulk_runner
    runner.jobs.page_size = 2  # several pages, each followed by a cursor write
    await runner.run_cycle()
    runner.jobs.page_size = 100
    done = await svc.GetBulkAction(
        lpb.GetBulkActionRequest(bulk_action_id=job.bulk_action_id), metadata=api.metadata
    )
    assert done.bulk_action.state == lpb.BULK_ACTION_STATE_COMPLETED
    assert (done.bulk_action.done, done.bulk_action.skipped, done.bulk_action.failed) == (5, 0, 0)
    assert {await state(api, e) for e in hit} == {t.PUBLIC_STATE_CANCELLED}
    assert await state(api, other_kind) == t.PUBLIC_STATE_WAITING
    assert await state(api, other_tag) == t.PUBLIC_STATE_WAITING
    lines = [r.getMessage() for r in caplog.records if r.name == "audit"]
    assert any(
        "method=StartBulkAction" in x and f"lane_id={lane}" in x and job.bulk_action_id in x
        and "outcome=ok" in x for x in lines
    ), lines  # fmt: skip
    assert any(f"bulk_action_finished bulk_action_id={job.bulk_action_id}" in x for x in lines)

    replay = await svc.StartBulkAction(
        lpb.StartBulkActionRequest(
            filter=lpb.BulkFilter(lane_id=lane, states=[t.PUBLIC_STATE_CANCELLED]),
            action=lpb.BULK_ACTION_KIND_REPLAY, request_id=str(uuid.uuid4()),
        ),
        metadata=api.metadata,
    )  # fmt: skip
    assert replay.matched == 5
    await runner.run_cycle()
    assert {await state(api, e) for e in hit} == {t.PUBLIC_STATE_WAITING}
    listed = await svc.ListBulkActions(lpb.ListBulkActionsRequest(), metadata=api.metadata)
    assert [j.bulk_action_id for j in listed.bulk_actions][:2] == [
        replay.bulk_action.bulk_action_id, job.bulk_action_id,
    ]  # fmt: skip
    assert listed.bulk_actions[0].done == 5


async def test_cancel_bulk_action_stops_it(api: Api) -> None:
    lane = f"stop-{uuid.uuid4().hex[:8]}"
    eids = [await create(api, lane) for _ in range(3)]
    svc = lanes(api)
    started = await svc.StartBulkAction(
        lpb.StartBulkActionRequest(
            filter=lpb.BulkFilter(lane_id=lane), action=lpb.BULK_ACTION_KIND_CANCEL,
            request_id=str(uuid.uuid4()),
        ),
        metadata=api.metadata,
    )  # fmt: skip
    bid = started.bulk_action.bulk_action_id
    stopped = await svc.CancelBulkAction(
        lpb.CancelBulkActionRequest(bulk_action_id=bid), metadata=api.metadata
    )
    assert stopped.bulk_action.state == lpb.BULK_ACTION_STATE_CANCELLED
    await api.server.bulk_runner.run_cycle()
    assert {await state(api, e) for e in eids} == {t.PUBLIC_STATE_WAITING}
    again = await svc.CancelBulkAction(
        lpb.CancelBulkActionRequest(bulk_action_id=bid), metadata=api.metadata
    )
    assert again.bulk_action.state == lpb.BULK_ACTION_STATE_CANCELLED


def test_lane_service_is_operator_only_under_an_admin_token() -> None:
    guard = FlowFabricInterceptor("api-token", "admin-token")
    method = "/flowfabric.v1.LaneService/StartBulkAction"
    denied = guard._deny(method, (("authorization", "Bearer api-token"),))
    assert denied is not None and denied.code == "admin_token_required"
    assert guard._deny(method, (("authorization", "Bearer admin-token"),)) is None
    # without an admin token the API token is enough, as for AdminService
    assert (
        FlowFabricInterceptor("api-token")._deny(method, (("authorization", "Bearer api-token"),))
        is None
    )
