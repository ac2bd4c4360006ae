"""Event-driven unblock across two server processes on one Valkey
(docs/budgets.md#waking-blocked-work): the execution that holds a cap-1 quota slot completes
through server 1, and the execution blocked behind it is handed to a long poll waiting on
server 2. The unblock scanner runs once an hour here, so only the event path can bring it
back; the deadline is generous and nothing is timed."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from flowfabric.server.embedded import ValkeyProcess
from flowfabric.v1 import (
    budget_pb2,
    budget_pb2_grpc,
    execution_pb2,
    execution_pb2_grpc,
    types_pb2,
    worker_pb2,
    worker_pb2_grpc,
)

CLI = [sys.executable, "-c", "from flowfabric.cli import main; main()"]
NO_SCANNER = {"FF_UNBLOCK_INTERVAL_S": "3600", "FF_QUOTA_RECONCILER_INTERVAL_S": "3600"}


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[list[str]]:
    valkey = ValkeyProcess(tmp_path / "valkey", persistent=False).start()
    env = {**os.environ, **NO_SCANNER, "FF_VALKEY_URL": valkey.url, "FF_FLOW_PARTITIONS": "16",
           "FF_WAITPOINT_HMAC_SECRET": "ab" * 32}  # fmt: skip
    procs, addresses = [], []
    try:
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
    finally:
        for proc, log in procs:
            proc.terminate()
            assert proc.wait(30) == 0
            if proc.stdout:
                proc.stdout.close()
            log.close()
        valkey.stop()


def claim(instance: str, wait_ms: int = 0) -> worker_pb2.ClaimNextRequest:
    return worker_pb2.ClaimNextRequest(
        worker_id="pool", worker_instance_id=instance, lane_ids=["default"],
        lease_ttl_ms=30_000, wait_ms=wait_ms,
    )  # fmt: skip


async def test_a_release_on_one_server_wakes_a_long_poll_on_the_other(
    servers: list[str],
) -> None:
    channels = [grpc.aio.insecure_channel(a) for a in servers]
    workers = [worker_pb2_grpc.WorkerServiceStub(c) for c in channels]
    execs = [execution_pb2_grpc.ExecutionServiceStub(c) for c in channels]
    try:
        qid = str(uuid.uuid4())
        await budget_pb2_grpc.BudgetServiceStub(channels[0]).CreateQuotaPolicy(
            budget_pb2.CreateQuotaPolicyRequest(
                quota_policy_id=qid, window_seconds=60, max_concurrent=1
            )
        )

        async def create() -> str:
            reply = await execs[0].CreateExecution(
                execution_pb2.CreateExecutionRequest(execution_kind="job", quota_policy_id=qid)
            )
            return str(reply.created.execution_id)

        first = await create()
        got = await workers[0].ClaimNext(claim("w-1"))
        assert got.task.lease.execution_id == first
        second = await create()
        none = await workers[1].ClaimNext(claim("w-2"))
        assert none.WhichOneof("outcome") != "task", "the cap holds it back"
        info = await execs[1].GetExecution(execution_pb2.GetExecutionRequest(execution_id=second))
        assert (
            info.execution.state_vector.eligibility_state
            == types_pb2.ELIGIBILITY_STATE_BLOCKED_BY_QUOTA
        )
        poll = asyncio.ensure_future(workers[1].ClaimNext(claim("w-2", wait_ms=25_000)))
        await asyncio.sleep(0.3)  # the long poll is waiting (no timing asserted)
        assert not poll.done()
        await workers[0].CompleteExecution(
            worker_pb2.CompleteExecutionRequest(lease=got.task.lease, result_payload=b"ok")
        )
        reply = await asyncio.wait_for(poll, 60)
        assert reply.WhichOneof("outcome") == "task", "woken through the store, not a scanner"
        assert reply.task.lease.execution_id == second
    finally:
        for channel in channels:
            await channel.close()
