"""A worker process killed (SIGKILL) mid-task: its lease expires, another worker reclaims the
execution and finishes it, and nothing completes twice."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections import Counter
from pathlib import Path

from flowfabric import Client, ExecutionState, TaskContext, Worker
from tests.conftest import API_TOKEN, Api
from tests.sdk.conftest import running

LANE = "sdk"
LEASE_TTL_MS = 1_000

CRASHING_WORKER = r"""
import asyncio, sys
from flowfabric import Worker

async def main(address: str, token: str, lane: str, ttl: str) -> None:
    worker = Worker(address, token=token, lanes=[lane], concurrency=1, lease_ttl_ms=int(ttl),
                    claim_wait_ms=200, worker_id="doomed")

    @worker.handler("crash")
    async def crash(ctx):
        print("started", ctx.execution_id, flush=True)
        await asyncio.sleep(60)

    async with worker:
        await worker.run()

asyncio.run(main(*sys.argv[1:]))
"""


async def test_killed_worker_task_is_finished_by_another(engine_api: Api, tmp_path: Path) -> None:
    async with Client(engine_api.address, token=API_TOKEN) as client:
        eid = (await client.submit("crash", b"{}", lane=LANE)).execution_id
        with (tmp_path / "worker.log").open("w") as log:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", CRASHING_WORKER,
                engine_api.address, API_TOKEN, LANE, str(LEASE_TTL_MS),
                stdout=asyncio.subprocess.PIPE, stderr=log,
            )  # fmt: skip
            try:
                assert proc.stdout is not None
                line = await asyncio.wait_for(proc.stdout.readline(), 30)
                assert line.decode().split() == ["started", eid], (
                    tmp_path / "worker.log"
                ).read_text()
                assert await client.state(eid) is ExecutionState.ACTIVE
            finally:
                proc.send_signal(signal.SIGKILL)
                assert await proc.wait() == -signal.SIGKILL

        runs: Counter[str] = Counter()
        attempt_types: list[str] = []
        survivor = Worker(client, lanes=[LANE], concurrency=1, claim_wait_ms=200)

        @survivor.handler("crash")
        async def finish(ctx: TaskContext) -> str:
            runs[ctx.execution_id] += 1
            attempt_types.append(ctx.attempt_type)
            return "finished by the survivor"

        async with running(survivor):
            assert await client.wait(eid, timeout=20) is ExecutionState.COMPLETED
        assert runs == {eid: 1} and attempt_types == ["reclaim"]
        assert survivor.stats.completed == 1
        snapshot = await client.describe(eid)
        assert snapshot.total_attempt_count == 2
        assert await client.result(eid) == b"finished by the survivor"
