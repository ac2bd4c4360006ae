"""Tasks as functions (docs/tasks.md): typed submit and results, argument checks on both
sides, a plain `def` cancelled mid-run, and the `flowfabric.testing` harness."""

from __future__ import annotations

import asyncio
import sys
import threading
from pathlib import Path

import pytest

from flowfabric import Cancelled, Client, ExecutionState, SyncTaskContext, Task, Worker
from flowfabric.testing import Env
from tests.conftest import API_TOKEN, Api
from tests.sdk.conftest import eventually, running
from tests.sdk.test_worker import attempt_field

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from test_tasks_app import test_greet_and_add  # noqa: F401  (the documented example)

from flowfabric.testing import flowfabric_env  # noqa: F401


async def test_typed_task_round_trip_and_bad_arguments(api: Api, client: Client) -> None:
    worker = Worker(api.address, token=API_TOKEN, claim_wait_ms=200, handle_signals=False)

    @worker.task("typed.scale")
    async def scale(values: list[int], factor: float = 2.0) -> list[float]:
        return [v * factor for v in values]

    assert isinstance(scale, Task)
    with pytest.raises(TypeError, match="factr"):
        await scale.submit(client, [1], factr=3)
    with pytest.raises(TypeError, match=r"'values'\[1\]"):
        await scale.submit(client, [1, "two"])
    assert (await client.list(state="eligible")).executions == []  # nothing was created

    async with running(worker):
        ok = await scale.submit(client, [1, 2], factor=1.5)
        assert await ok.result(timeout=10) == [1.5, 3.0]
        # the string API bypasses the check: the worker refuses it once, for good
        raw = await client.submit(
            "typed.scale", {"values": "not a list"}, policy={"retry_policy": {"max_retries": 5}}
        )
        assert await client.wait(raw.execution_id, timeout=10) == ExecutionState.FAILED
    reason = await attempt_field(api.store, raw.execution_id, 0, "failure_reason")
    assert reason.startswith("bad_arguments: task typed.scale: 'values': expected list"), reason
    assert await attempt_field(api.store, raw.execution_id, 0, "failure_category") == (
        "bad_arguments"
    )


async def test_sync_task_observes_cancellation(api: Api, client: Client) -> None:
    # a short lease: the renewal that finds it revoked comes within 200 ms
    worker = Worker(
        api.address, token=API_TOKEN, claim_wait_ms=200, lease_ttl_ms=600, handle_signals=False
    )
    started, observed = threading.Event(), []

    @worker.task("typed.spin")
    def spin(ctx: SyncTaskContext, rounds: int) -> int:
        started.set()
        try:
            for _ in range(rounds):
                ctx.sleep(0.05)
        except Cancelled as exc:
            observed.append((threading.current_thread().name, str(exc)))
            raise
        return rounds

    async with running(worker):
        handle = await spin.submit(client, rounds=10_000)
        await asyncio.to_thread(started.wait, 10)
        await client.cancel(handle.execution_id)
        await eventually(lambda: asyncio.sleep(0, observed), bool)
    assert observed[0][0].startswith("flowfabric-task"), observed
    assert observed[0][1] == "task cancelled: execution_not_active", observed
    assert await client.state(handle.execution_id) == ExecutionState.CANCELLED


async def test_sync_task_calls_every_async_context_method_blocking(
    api: Api, client: Client
) -> None:
    worker = Worker(api.address, token=API_TOKEN, claim_wait_ms=200, handle_signals=False)

    @worker.task("typed.waitpoint")
    def make(ctx: SyncTaskContext) -> str:
        pending = ctx.create_waitpoint(key="wpk:sync")  # async on TaskContext, blocking here
        return str(pending.key)

    async with running(worker):
        handle = await make.submit(client)
        assert await handle.result(timeout=10) == "wpk:sync"


def test_a_task_names_no_positional_only_parameters() -> None:
    with pytest.raises(TypeError, match="positional-only"):
        Task(lambda a, /: a, "x", {})


async def test_env_fixture_is_fresh(flowfabric_env: Env) -> None:  # noqa: F811
    assert (await flowfabric_env.client.list(state="eligible")).executions == []
