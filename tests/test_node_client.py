"""The Node.js example client (examples/node-client) against a real server, on both topologies.

It loads the protos with @grpc/proto-loader, so this also checks that the contract works for a
second-language client: submit, claim, complete, read back, and the error path with a bad token.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from flowfabric.v1 import execution_pb2, types_pb2
from tests.conftest import API_TOKEN, Api

CLIENT_DIR = Path(__file__).resolve().parent.parent / "examples" / "node-client"
NODE = shutil.which("node")
NPM = shutil.which("npm")

pytestmark = [
    pytest.mark.skipif(
        NODE is None or NPM is None, reason="node and npm must be on PATH for the Node.js client"
    ),
    # The first test may run `npm ci` (up to 300 s) inside its setup.
    pytest.mark.timeout(420),
]


@pytest.fixture(scope="module")
async def node_client() -> Path:
    """examples/node-client with its dependencies installed from package-lock.json."""
    if not (CLIENT_DIR / "node_modules").is_dir():
        assert NPM is not None
        proc = await asyncio.to_thread(
            subprocess.run,
            [NPM, "ci", "--no-audit", "--no-fund", "--ignore-scripts"],
            cwd=CLIENT_DIR,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, f"npm ci failed:\n{proc.stdout}\n{proc.stderr}"
    return CLIENT_DIR / "client.js"


async def run_client(client: Path, *args: str, token: str) -> subprocess.CompletedProcess[str]:
    assert NODE is not None
    return await asyncio.to_thread(
        subprocess.run,
        [NODE, str(client), *args],
        cwd=client.parent,
        env={**os.environ, "FF_API_TOKEN": token},
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_node_client_submits_claims_and_completes(api: Api, node_client: Path) -> None:
    proc = await run_client(node_client, api.address, f"node-{uuid.uuid4()}", token=API_TOKEN)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["public_state"] == "PUBLIC_STATE_COMPLETED"
    assert out["result"] == "hello from node, done"

    # The same execution, seen through the Python stubs.
    eid = out["execution_id"]
    got = await api.execution.GetExecution(
        execution_pb2.GetExecutionRequest(execution_id=eid), metadata=api.metadata
    )
    assert got.execution.execution_id == eid
    assert got.execution.public_state == types_pb2.PUBLIC_STATE_COMPLETED
    assert got.execution.execution_kind == "node-demo"
    assert got.execution.lane_id == "node"
    result = await api.execution.GetExecutionResult(
        execution_pb2.GetExecutionResultRequest(execution_id=eid), metadata=api.metadata
    )
    assert result.result_payload == b"hello from node, done"


async def test_node_client_wrong_token_is_unauthenticated(api: Api, node_client: Path) -> None:
    proc = await run_client(node_client, api.address, token="not-the-token")
    assert proc.returncode == 1, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.stdout == ""
    assert "UNAUTHENTICATED" in proc.stderr
    error = json.loads(proc.stderr.strip().splitlines()[-1])
    assert error["error"] == "UNAUTHENTICATED"
    assert error["status_details"][0]["reason"] == "unauthenticated"
