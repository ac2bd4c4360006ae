"""Two server processes with scanners against one Valkey: 1,000 executions with short leases and
random worker deaths all end terminal exactly once (no double transitions, no lost work)."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from flowfabric.server.embedded import ValkeyProcess
from flowfabric.v1 import execution_pb2, execution_pb2_grpc, types_pb2, worker_pb2, worker_pb2_grpc

EXECUTIONS = 1000
WORKERS = 16
DEATH_RATE = 0.15
LEASE_TTL_MS = 400
CLI = [sys.executable, "-c", "from flowfabric.cli import main; main()"]
FAST = {
    "FF_LEASE_EXPIRY_INTERVAL_MS": "200",
    "FF_DELAYED_PROMOTER_INTERVAL_MS": "200",
    "FF_ATTEMPT_TIMEOUT_INTERVAL_S": "1",
    "FF_EXECUTION_DEADLINE_INTERVAL_S": "1",
}


@pytest.fixture
def valkey(tmp_path: Path) -> Iterator[ValkeyProcess]:
    proc = ValkeyProcess(tmp_path / "valkey", persistent=False).start()
    yield proc
    proc.stop()


@pytest.fixture
def servers(valkey: ValkeyProcess, tmp_path: Path) -> Iterator[list[str]]:
    env = {**os.environ, **FAST, "FF_VALKEY_URL": valkey.url, "FF_FLOW_PARTITIONS": "16",
           "FF_WAITPOINT_HMAC_SECRET": "ab" * 32}  # fmt: skip
    procs, addresses = [], []
    for i in range(2):
        log = (tmp_path / f"server{i}.log").open("w")
        proc = subprocess.Popen(
            [*CLI, "serve", "--listen-addr", "127.0.0.1:0"],
            env=env, stdout=subprocess.PIPE, stderr=log, text=True,
        )  # fmt: skip
        procs.append((proc, log))
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening on" in line, (tmp_path / f"server{i}.log").read_text()
        addresses.append(line.strip().rsplit(" ", 1)[1])
    yield addresses
    for proc, log in procs:
        proc.terminate()
        assert proc.wait(30) == 0
        if proc.stdout:
            proc.stdout.close()
        log.close()


async def test_two_servers_random_worker_deaths_complete_everything_once(
    servers: list[str],
) -> None:
    channels = [grpc.aio.insecure_channel(a) for a in servers]
    workers = [worker_pb2_grpc.WorkerServiceStub(c) for c in channels]
    execs = [execution_pb2_grpc.ExecutionServiceStub(c) for c in channels]
    rng = random.Random(7)
    try:
        ids: list[str] = []
        for start in range(0, EXECUTIONS, 100):
            replies = await asyncio.gather(
                *(execs[i % 2].CreateExecution(
                    execution_pb2.CreateExecutionRequest(execution_kind="job",
                                                         input_payload=str(i).encode()))
                  for i in range(start, start + 100))
            )  # fmt: skip
            ids += [r.created.execution_id for r in replies]
        completions: Counter[str] = Counter()
        deaths = 0
        done = asyncio.Event()

        async def worker(n: int) -> None:
            nonlocal deaths
            generation = 0
            while not done.is_set():
                stub = workers[(n + generation) % 2]
                reply = await stub.ClaimNext(
                    worker_pb2.ClaimNextRequest(
                        worker_id="pool", worker_instance_id=f"w{n}-{generation}",
                        lane_ids=["default"], lease_ttl_ms=LEASE_TTL_MS, wait_ms=300,
                    )
                )  # fmt: skip
                if reply.WhichOneof("outcome") != "task":
                    continue
                task = reply.task
                if rng.random() < DEATH_RATE:
                    deaths += 1
                    generation += 1  # this process "died": a new instance takes its slot
                    continue
                try:
                    result = await workers[rng.randrange(2)].CompleteExecution(
                        worker_pb2.CompleteExecutionRequest(
                            lease=task.lease, result_payload=task.payload + b"!"
                        )
                    )
                except grpc.aio.AioRpcError as exc:
                    # a lease that expired under a slow worker is a legitimate rejection
                    assert exc.code() in (grpc.StatusCode.ABORTED,
                                          grpc.StatusCode.FAILED_PRECONDITION), exc  # fmt: skip
                    continue
                assert not result.replayed
                completions[task.lease.execution_id] += 1
                if len(completions) == EXECUTIONS:
                    done.set()

        tasks = [asyncio.create_task(worker(n)) for n in range(WORKERS)]
        try:
            async with asyncio.timeout(240):
                await done.wait()
        finally:
            done.set()
            await asyncio.gather(*tasks, return_exceptions=True)
        assert deaths > 0
        assert set(completions) == set(ids)
        assert max(completions.values()) == 1, "an execution completed twice"
        for eid in rng.sample(ids, 50):
            info = await execs[0].GetExecution(execution_pb2.GetExecutionRequest(execution_id=eid))
            assert info.execution.public_state == types_pb2.PUBLIC_STATE_COMPLETED
            result = await execs[1].GetExecutionResult(
                execution_pb2.GetExecutionResultRequest(execution_id=eid)
            )
            assert result.result_payload.endswith(b"!")
    finally:
        for channel in channels:
            await channel.close()
