"""A bulk cancel survives its server being killed mid-job: `flowfabric serve` is killed
outright mid-job, and another server's bulk runner (in this process) on the same Valkey takes
the job over once the dead server's lease runs out and resumes at the stored cursor, so every
match ends cancelled and no item is acted on twice (docs/lanes.md#how-a-job-runs)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from flowfabric.server.embedded import ValkeyProcess
from flowfabric.server.engine.bulk import BulkJobs, BulkRunner
from flowfabric.server.valkey.functions import Functions
from flowfabric.server.valkey.ids import parse_execution_id
from flowfabric.server.valkey.keys import BulkKeys, ExecKeys
from flowfabric.server.valkey.store import Store
from flowfabric.v1 import execution_pb2 as epb
from flowfabric.v1 import execution_pb2_grpc, lane_pb2_grpc
from flowfabric.v1 import lane_pb2 as lpb
from tests.schedules.test_schedule_processes import PARTITIONS, Servers

LANE = "bulk-procs"
ITEMS, PAGE = 60, 5


@pytest.fixture
def valkey(tmp_path: Path) -> Iterator[ValkeyProcess]:
    proc = ValkeyProcess(tmp_path / "valkey", persistent=False).start()
    yield proc
    proc.stop()


@pytest.fixture
def servers(valkey: ValkeyProcess, tmp_path: Path) -> Iterator[Servers]:
    s = Servers(valkey, tmp_path)
    # small pages with a pause between them, so the kill lands mid-job; a short job lease,
    # so the second server takes over soon after
    s.env |= {"FF_BULK_PAGE_SIZE": str(PAGE), "FF_BULK_PAGE_PAUSE_MS": "150",
              "FF_BULK_LEASE_MS": "1000"}  # fmt: skip
    yield s
    s.stop_all()


async def _done(address: str, bid: str) -> int:
    async with grpc.aio.insecure_channel(address) as ch:
        stub = lane_pb2_grpc.LaneServiceStub(ch)
        reply = await stub.GetBulkAction(lpb.GetBulkActionRequest(bulk_action_id=bid))
        return reply.bulk_action.done


async def test_a_killed_server_s_job_is_resumed_by_another(
    servers: Servers, valkey: ValkeyProcess, caplog: pytest.LogCaptureFixture
) -> None:
    first = servers.start()
    async with grpc.aio.insecure_channel(first) as ch:
        ex = execution_pb2_grpc.ExecutionServiceStub(ch)
        made = await ex.CreateExecutions(epb.CreateExecutionsRequest(items=[
            epb.CreateExecutionRequest(execution_kind="k", lane_id=LANE) for _ in range(ITEMS)
        ]))  # fmt: skip
        eids = [r.created.execution_id for r in made.results]
        assert len(eids) == ITEMS and all(eids)
        started = await lane_pb2_grpc.LaneServiceStub(ch).StartBulkAction(
            lpb.StartBulkActionRequest(
                filter=lpb.BulkFilter(lane_id=LANE), action=lpb.BULK_ACTION_KIND_CANCEL,
                request_id=str(uuid.uuid4()),
            )
        )  # fmt: skip
    bid = started.bulk_action.bulk_action_id
    assert started.matched == ITEMS
    async with asyncio.timeout(60):  # a safety net, not an assertion on timing
        while True:
            if await _done(first, bid) >= 2 * PAGE:
                break
            await asyncio.sleep(0.05)
    servers.procs[0].kill()
    servers.procs[0].wait(30)

    # the second server's runner, in this process: it takes the job over once the dead
    # server's lease has run out
    store = Store.from_url(valkey.url)
    try:
        jobs = BulkJobs(store, Functions(store, "ab" * 32), PARTITIONS, PAGE)
        at_kill = await jobs.read(bid)
        assert at_kill is not None and at_kill.state == "running" and at_kill.done < ITEMS
        async with asyncio.timeout(60):  # a safety net, not an assertion on timing
            while True:
                if not await store.call("EXISTS", BulkKeys(bid).lease):
                    break
                await asyncio.sleep(0.1)
        caplog.set_level(logging.INFO, logger="flowfabric.bulk")
        await BulkRunner(jobs, lease_ms=1000).run_cycle()
        job = await jobs.read(bid)
        assert job is not None and job.state == "completed"
        # nothing redone: the runner met no item already acted on, and at most the page in
        # flight at the kill went uncounted
        assert (job.skipped, job.failed) == (0, 0)
        assert ITEMS - PAGE <= job.done <= ITEMS and job.done >= at_kill.done
        assert any(f"bulk {bid}: resuming at" in r.getMessage() for r in caplog.records)
        for eid in eids:
            state = await store.call("HGET", ExecKeys(parse_execution_id(eid, PARTITIONS)).core,
                                     "public_state")  # fmt: skip
            assert state == b"cancelled", eid
    finally:
        await store.close()
