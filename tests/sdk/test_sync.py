"""SyncClient: the blocking wrapper, driven from a plain thread (the server runs on the test's
event loop, so the blocking calls must not run on it)."""

from __future__ import annotations

import asyncio

import pytest

from flowfabric import ExecutionState, NotFound, SyncClient
from tests.conftest import API_TOKEN, Api

LANE = "sdk-sync"


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
