"""Two server processes with scanners on one Valkey, both stopped (one killed outright) and
started again while slots fall due: an interval schedule with catch-up `all` fires every slot
exactly once, the missed ones included (docs/schedules.md#exactly-once)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import grpc
import pytest
import redis.asyncio as aioredis

from flowfabric.server.embedded import ValkeyProcess
from flowfabric.server.valkey.ids import solo_partition
from flowfabric.server.valkey.keys import PartitionKeys
from flowfabric.v1 import schedule_pb2 as pb
from flowfabric.v1 import schedule_pb2_grpc

LANE = "sched-procs"
CLI = [sys.executable, "-c", "from flowfabric.cli import main; main()"]
PARTITIONS = 16


class Servers:
    """Server processes on one Valkey that a test can stop and start again."""

    def __init__(self, valkey: ValkeyProcess, logs: Path) -> None:
        self.env = {**os.environ, "FF_VALKEY_URL": valkey.url,
                    "FF_FLOW_PARTITIONS": str(PARTITIONS),
                    "FF_WAITPOINT_HMAC_SECRET": "ab" * 32}  # fmt: skip
        self.logs = logs
        self.procs: list[subprocess.Popen[str]] = []
        self.files: list[IO[str]] = []
        self.addresses: list[str] = []

    def start(self) -> str:
        log = self.logs / f"server{len(self.procs)}.log"
        self.files.append(log.open("w"))
        proc = subprocess.Popen(
            [*CLI, "serve", "--listen-addr", "127.0.0.1:0"],
            env=self.env, stdout=subprocess.PIPE, stderr=self.files[-1], text=True,
        )  # fmt: skip
        self.procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening on" in line, log.read_text()
        address = line.strip().rsplit(" ", 1)[1]
        self.addresses.append(address)
        return address

    def stop_all(self, kill_first: bool = False) -> None:
        for i, proc in enumerate(self.procs):
            if proc.poll() is None:
                proc.kill() if kill_first and i == 0 else proc.terminate()
        for proc in self.procs:
            proc.wait(30)
            if proc.stdout:
                proc.stdout.close()
        for f in self.files:
            f.close()


@pytest.fixture
def valkey(tmp_path: Path) -> Iterator[ValkeyProcess]:
    proc = ValkeyProcess(tmp_path / "valkey", persistent=False).start()
    yield proc
    proc.stop()


@pytest.fixture
def servers(valkey: ValkeyProcess, tmp_path: Path) -> Iterator[Servers]:
    s = Servers(valkey, tmp_path)
    yield s
    s.stop_all()


async def _fire_count(address: str, sid: str) -> int:
    async with grpc.aio.insecure_channel(address) as ch:
        stub = schedule_pb2_grpc.ScheduleServiceStub(ch)
        reply = await stub.GetSchedule(pb.GetScheduleRequest(schedule_id=sid))
        return reply.schedule.fire_count


async def _wait_for_fires(addresses: list[str], sid: str, at_least: int) -> int:
    async with asyncio.timeout(60):  # a safety net, not an assertion on timing
        while True:
            for a in addresses:  # read through every replica in turn
                count = await _fire_count(a, sid)
                if count >= at_least:
                    return count
            await asyncio.sleep(0.2)


async def test_two_servers_and_a_restart_fire_each_slot_once(
    servers: Servers, valkey: ValkeyProcess
) -> None:
    first = [servers.start(), servers.start()]
    spec = pb.ScheduleSpec(
        interval_ms=1_000, overlap=pb.OVERLAP_POLICY_ALLOW,
        catch_up=pb.CATCH_UP_POLICY_ALL, catch_up_window_ms=600_000,
        template=pb.ExecutionTemplate(execution_kind="tick", lane_id=LANE),
    )  # fmt: skip
    async with grpc.aio.insecure_channel(first[0]) as ch:
        stub = schedule_pb2_grpc.ScheduleServiceStub(ch)
        sid = (await stub.CreateSchedule(pb.CreateScheduleRequest(spec=spec))).schedule_id
    before = await _wait_for_fires(first, sid, 2)

    # downtime: one replica killed outright, the other stopped; slots fall due meanwhile
    servers.stop_all(kill_first=True)
    await asyncio.sleep(2.5)
    second = [servers.start(), servers.start()]
    await _wait_for_fires(second, sid, before + 5)

    r = aioredis.Redis(port=valkey.port)
    try:
        async with grpc.aio.insecure_channel(second[1]) as ch:
            stub = schedule_pb2_grpc.ScheduleServiceStub(ch)
            await stub.PauseSchedule(pb.PauseScheduleRequest(schedule_id=sid))
            s = (await stub.GetSchedule(pb.GetScheduleRequest(schedule_id=sid))).schedule
        slots = (s.next_fire_at - s.spec.anchor_ms) // 1_000
        # every slot up to the cursor fired once: none skipped (the downtime is inside the
        # catch-up window), none twice (the count would pass the number of slots)
        assert s.skip_count == 0
        assert s.fire_count == slots
        assert slots >= before + 5
        index = PartitionKeys.of(solo_partition(LANE, PARTITIONS)).all_executions
        kind = (await r.type(index)).decode()
        count = await (r.zcard(index) if kind == "zset" else r.scard(index))
        assert count == s.fire_count  # one execution per slot
    finally:
        await r.aclose()
