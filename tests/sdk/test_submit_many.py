"""Client.submit_many / SyncClient.submit_many: one CreateExecutions per chunk, one answer per
job in order (Submitted or the job's error object), never raising for one bad job."""

from __future__ import annotations

import asyncio

import pytest

from flowfabric import Client, ExecutionState, FlowFabricError, InvalidArgument, SyncClient
from flowfabric import _client_executions as ce
from tests.conftest import API_TOKEN, Api


async def test_submit_many_answers_each_job_in_order(client: Client) -> None:
    answers = await client.submit_many([
        {"kind": "email", "payload": {"to": "a"}, "idempotency_key": "a"},
        {"kind": "email", "tags": {"Bad Key": "x"}},
        {"kind": "email", "payload": {"to": "a again"}, "idempotency_key": "a"},
        {"kind": "report", "lane": "other", "priority": 5},
    ])  # fmt: skip
    first, bad, dup, other = answers
    assert not isinstance(first, FlowFabricError) and first.state is ExecutionState.WAITING
    assert isinstance(bad, InvalidArgument) and bad.reason == "invalid_tag_key"
    assert not isinstance(dup, FlowFabricError)
    assert dup.duplicate and dup.execution_id == first.execution_id
    assert dup.state is ExecutionState.WAITING
    assert not isinstance(other, FlowFabricError) and not other.duplicate
    assert (await client.get(other.execution_id)).lane_id == "other"


async def test_submit_many_rejects_an_unknown_argument_before_sending(client: Client) -> None:
    with pytest.raises(TypeError):
        await client.submit_many([{"kind": "a"}, {"kind": "b", "colour": "red"}])
    assert (await client.submit_many([{"kind": "a"}]))[0].duplicate is False  # type: ignore[union-attr]


def test_chunks_cut_by_count_and_bytes() -> None:
    small = [ce.create_request("k") for _ in range(2500)]
    assert [len(c) for c in ce.chunks(small)] == [1000, 1000, 500]
    big = [ce.create_request("k", b"x" * (900 << 10)) for _ in range(3)]
    assert [len(c) for c in ce.chunks(big)] == [2, 1]


def _blocking(address: str) -> list[str]:
    with SyncClient(address, token=API_TOKEN) as sync:
        answers = sync.submit_many([{"kind": "a", "idempotency_key": "s"}] * 2)
        return [str(getattr(a, "duplicate", a)) for a in answers]


async def test_sync_client_submit_many(api: Api) -> None:
    assert await asyncio.to_thread(_blocking, api.address) == ["False", "True"]
