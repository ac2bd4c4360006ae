"""`flowfabric worker` in a subprocess (docs/tasks.md#run-a-worker-from-the-shell): --burst
exits once the lanes are empty; SIGTERM mid-task drains (the task completes) and exits 0."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from flowfabric import Client, ExecutionState
from tests.conftest import API_TOKEN, Api
from tests.sdk.conftest import eventually

# What runs here is the command's process handling, the same on either topology: standalone only.
standalone = pytest.mark.parametrize("valkey_url", ["standalone"], indirect=True)
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
from tasks_app import add, slow  # noqa: E402


async def _start(api: Api, *args: str) -> asyncio.subprocess.Process:
    env = {**os.environ, "FF_TARGET": api.address, "FF_API_TOKEN": API_TOKEN}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "flowfabric.cli", "worker", "examples.tasks_app", *args,
        cwd=ROOT, env=env, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


@standalone
async def test_burst_runs_the_module_tasks_and_exits(api: Api, client: Client) -> None:
    handles = [await add.submit(client, a=i, b=1) for i in range(3)]
    proc = await _start(api, "--burst", "--concurrency", "2", "--summary-every", "0.2")
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    text = err.decode()
    assert proc.returncode == 0, text
    assert "kinds add,greet,slow, concurrency 2, burst" in text, text
    assert "flowfabric worker stopped: 3 completed, 0 failed" in text, text
    assert "in flight" in text, text  # a periodic summary ran (every 0.2 s, burst takes longer)
    assert [await h.result(timeout=5) for h in handles] == [1, 2, 3]


@standalone
async def test_sigterm_drains_the_task_in_flight(api: Api, client: Client) -> None:
    handle = await slow.submit(client, steps=8)
    proc = await _start(api)
    await eventually(
        lambda: client.state(handle.execution_id), lambda s: s == ExecutionState.ACTIVE, 30
    )
    proc.send_signal(signal.SIGTERM)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert await handle.result(timeout=5) == 8  # finished within the grace, not lost
    assert "1 completed, 0 failed, 0 handed back" in err.decode(), err.decode()


@standalone
async def test_a_second_sigint_hands_the_task_back_at_once(api: Api, client: Client) -> None:
    handle = await slow.submit(client, steps=600)  # a minute, in a thread
    proc = await _start(api)
    await eventually(
        lambda: client.state(handle.execution_id), lambda s: s == ExecutionState.ACTIVE, 30
    )
    proc.send_signal(signal.SIGINT)
    assert proc.stderr is not None
    head = b""
    while b"stopping" not in head:  # two signals at once would be delivered as one
        line = await asyncio.wait_for(proc.stderr.readline(), 30)
        assert line, head.decode()
        head += line
    proc.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    text = (head + err).decode()
    assert proc.returncode == 0, text
    assert "stopping" in text and "SIGINT again" in text, text
    assert "0 completed, 0 failed, 1 handed back" in text, text
    assert await client.state(handle.execution_id) != ExecutionState.ACTIVE


def test_an_app_that_cannot_be_imported_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "broken_app.py").write_text("raise RuntimeError('boom')\n")
    done = subprocess.run(
        [sys.executable, "-m", "flowfabric.cli", "worker", "broken_app"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "Error: cannot import 'broken_app': RuntimeError: boom" in done.stderr
    assert "Traceback" not in done.stderr
