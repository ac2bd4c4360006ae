"""SyncClient: the blocking wrapper, driven from a plain thread (the server runs on the test's
event loop, so the blocking calls must not run on it)."""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from flowfabric import Client, ExecutionState, NotFound, SyncClient
from tests.conftest import API_TOKEN, Api

LANE = "sdk-sync"
ROOT = Path(__file__).resolve().parents[2]


def blocking_session(address: str) -> None:
    with SyncClient(address, token=API_TOKEN) as client:
        sub = client.submit("job", "hello", lane=LANE, idempotency_key="sync-1")
        assert client.submit("job", "hello", lane=LANE, idempotency_key="sync-1").duplicate
        assert client.state(sub.execution_id) is ExecutionState.WAITING
        assert client.get(sub.execution_id).execution_kind == "job"
        assert [r.execution_id for r in client.list_all(lane=LANE)] == [sub.execution_id]
        assert client.cancel(sub.execution_id) is ExecutionState.CANCELLED
        assert client.wait(sub.execution_id, timeout=5) is ExecutionState.CANCELLED
        states = [ExecutionState(m.public_state) for m in client.watch(sub.execution_id, timeout=5)]
        assert states == [ExecutionState.CANCELLED]
        with pytest.raises(NotFound):
            client.get("{fp:0}:00000000-0000-4000-8000-000000000000")
    client.close()  # idempotent


async def test_sync_client_smoke(api: Api) -> None:
    await asyncio.to_thread(blocking_session, api.address)


# -- derived from Client: every method, with its signature --------------------------------------

NOT_CALLS = {"connect", "close"}  # the blocking client connects and closes on its own
BUILDERS = {"flow"}  # returns a builder at once; the blocking one's `submit()` blocks


def test_every_client_method_has_a_blocking_counterpart() -> None:
    names = [
        name
        for name, fn in inspect.getmembers(Client, inspect.isfunction)
        if not name.startswith("_") and name not in NOT_CALLS
    ]
    assert {"submit", "get", "tail", "watch_signals", "waitpoint_kids", "flow"} <= set(names)
    for name in names:
        fn = getattr(Client, name)
        is_async = inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn)
        assert is_async != (name in BUILDERS), name
        blocking = getattr(SyncClient, name)
        assert blocking.__wrapped__ is fn, name  # derived from exactly this method
        assert inspect.signature(blocking) == inspect.signature(fn), name
        assert not inspect.iscoroutinefunction(blocking), name


TYPED = """
from collections.abc import Iterator
from typing import assert_type

from flowfabric import (
    ExecutionState, FlowInfo, Page, SignalDelivery, SubmittedFlow, SyncClient, Submitted,
)
from flowfabric.v1 import execution_pb2, types_pb2

c = SyncClient("127.0.0.1:1")
assert_type(c.get("x"), types_pb2.ExecutionInfo)
assert_type(c.submit("kind", b"", lane="l", idempotency_key="k"), Submitted)
assert_type(c.state("x"), ExecutionState)
assert_type(c.list(lane="l"), Page)
assert_type(c.signal("x", "name", {"a": 1}), SignalDelivery)
assert_type(c.watch("x", timeout=1.0), Iterator[execution_pb2.WatchExecutionResponse])
assert_type(c.tail("x", after="0-0"), Iterator[types_pb2.StreamFrame])
f = c.flow("dag")
assert_type(f.submit(), SubmittedFlow)
assert_type(c.wait_flow("f", timeout=1.0), FlowInfo)
assert_type(c.edges("x", direction="incoming"), Iterator[types_pb2.EdgeSnapshot])
f.add("k", after=["not-a-handle"])  # E: after takes handles
c.get(1)  # E: the real parameter types are checked
c.cancel("x", reason="r", nope=True)  # E: and the real names
"""


def test_blocking_signatures_are_typed(tmp_path: Path) -> None:
    """mypy sees SyncClient's methods with Client's parameters and the awaited return types."""
    pkg = tmp_path / "flowfabric"
    pkg.mkdir()
    for entry in (ROOT / "sdk" / "flowfabric").iterdir():
        if entry.name != "__pycache__":
            (pkg / entry.name).symlink_to(entry)
    (pkg / "v1").symlink_to(ROOT / "generated" / "flowfabric" / "v1")
    (tmp_path / "check.py").write_text(TYPED)
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent",
         "--cache-dir", str(ROOT / ".mypy_cache"), "check.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    out = done.stdout.splitlines()
    errors = [line for line in out if line.startswith("check.py:") and ": error:" in line]
    lines = TYPED.splitlines()
    flagged = sorted({int(line.split(":")[1]) for line in errors})
    expected = [n for n, text in enumerate(lines, 1) if "# E:" in text]
    assert flagged == expected, done.stdout
