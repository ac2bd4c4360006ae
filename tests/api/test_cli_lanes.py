"""`flowfabric lanes` and `flowfabric bulk` against a server with its scanners (and so the
bulk runner) running (docs/lanes.md#cli); standalone only, as the other CLI tests. The
commands run in-process (click's runner, in a thread so the server's loop keeps serving):
a process per command costs seconds on a loaded machine, and tests/api/test_cli_client.py
already covers the process entry point."""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass

import pytest
from click.testing import CliRunner

from flowfabric.cli import main
from flowfabric.v1 import execution_pb2 as epb
from flowfabric.v1 import types_pb2 as t
from tests.conftest import API_TOKEN, Api

standalone = pytest.mark.parametrize("valkey_url", ["standalone"], indirect=True)


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


async def cli(api: Api, *args: str) -> Result:
    runner = CliRunner()
    base = ["--target", api.address, "--token", API_TOKEN]
    got = await asyncio.to_thread(runner.invoke, main, [*base, *args], prog_name="flowfabric")
    return Result(got.exit_code, got.stdout, got.stderr)


@standalone
async def test_lane_and_bulk_commands(engine_api: Api) -> None:
    api = engine_api
    lane = f"cli-{uuid.uuid4().hex[:8]}"
    eids = []
    for _ in range(3):
        reply = await api.execution.CreateExecution(
            epb.CreateExecutionRequest(execution_kind="k", lane_id=lane), metadata=api.metadata
        )
        eids.append(reply.created.execution_id)
    paused = await cli(api, "lanes", "pause", lane, "--reason", "deploy")
    assert paused.returncode == 0, paused.stderr
    assert "paused" in paused.stdout and "eligible=3" in paused.stdout, paused.stdout
    shown = json.loads((await cli(api, "--json", "lanes", "get", lane)).stdout)
    assert (shown["control"], shown["reason"], shown["depth"]["eligible"]) == (
        "paused", "deploy", 3,
    )  # fmt: skip
    empty = await cli(api, "bulk", "cancel")
    assert empty.returncode == 2 and "empty filter" in empty.stderr, empty.stderr
    assert "Traceback" not in empty.stderr
    bad = await cli(api, "bulk", "cancel", "--lane", lane, "--older-than", "soon")
    assert bad.returncode == 2 and "--older-than" in bad.stderr, bad.stderr
    dry = await cli(api, "--json", "bulk", "cancel", "--lane", lane, "--dry-run")
    assert json.loads(dry.stdout) == {"matched": 3}, dry.stderr
    done = await cli(api, "bulk", "cancel", "--lane", lane, "--state", "waiting", "--wait")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].endswith(
        "cancel completed: 3/3 (done 3, skipped 0, failed 0)"
    ), done.stdout
    for eid in eids:
        got = await api.execution.GetExecution(
            epb.GetExecutionRequest(execution_id=eid), metadata=api.metadata
        )
        assert got.execution.public_state == t.PUBLIC_STATE_CANCELLED
