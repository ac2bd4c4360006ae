"""Client: submit, reads, operator calls, pagination, watch/wait, typed errors, retries."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from typing import Any

import grpc
import pytest

from flowfabric import (
    Client,
    ExecutionNotActive,
    ExecutionState,
    InvalidArgument,
    NotFound,
    ResultNotReady,
    RetryPolicy,
    Unauthenticated,
    Unavailable,
    Worker,
)
from flowfabric.v1 import types_pb2
from tests.conftest import API_TOKEN, Api
from tests.sdk.conftest import running

LANE = "sdk"


def missing_id() -> str:
    return f"{{fp:0}}:{uuid.uuid4()}"


async def test_submit_idempotency_key_answers_duplicate(client: Client) -> None:
    first = await client.submit("job", b"x", lane=LANE, idempotency_key="k-1")
    again = await client.submit("job", b"y", lane=LANE, idempotency_key="k-1")
    assert not first.duplicate and first.state is ExecutionState.WAITING
    assert again.duplicate and again.execution_id == first.execution_id
    assert again.state is ExecutionState.WAITING


async def test_submit_options_and_reads(client: Client) -> None:
    sub = await client.submit(
        "job",
        {"n": 1},
        lane=LANE,
        priority=7,
        tags={"app.owner": "me"},
        policy=RetryPolicy.fixed(2, 50),
        delay_until=timedelta(hours=1),
    )
    assert sub.state is ExecutionState.DELAYED
    info = await client.get(sub.execution_id)
    assert info.execution_kind == "job" and info.priority == 7 and info.lane_id == LANE
    assert info.public_state == types_pb2.PUBLIC_STATE_DELAYED
    snap = await client.describe(sub.execution_id)
    assert dict(snap.tags) == {"app.owner": "me"}


async def test_result_bytes_verbatim_and_not_ready(api: Api, client: Client) -> None:
    blob = bytes(range(256)) * 3
    sub = await client.submit("blob", lane=LANE)
    with pytest.raises(ResultNotReady) as caught:
        await client.result(sub.execution_id)
    assert caught.value.reason == "result_not_found"
    assert caught.value.code is grpc.StatusCode.NOT_FOUND

    worker = Worker(client, lanes=[LANE], concurrency=1, claim_wait_ms=100)

    @worker.handler("blob")
    async def blob_handler(ctx: Any) -> bytes:
        return blob

    async with running(worker):
        assert await client.wait(sub.execution_id, timeout=10) is ExecutionState.COMPLETED
    assert await client.result(sub.execution_id) == blob


async def test_typed_errors(api: Api, client: Client) -> None:
    with pytest.raises(NotFound) as caught:
        await client.get(missing_id())
    assert caught.value.reason == "execution_not_found"
    assert caught.value.metadata["class"] == "terminal" and not caught.value.retryable

    with pytest.raises(InvalidArgument) as bad:
        await client.submit("job", tags={"Bad Key": "v"}, lane=LANE)
    assert bad.value.reason == "invalid_tag_key"

    async with Client(api.address) as anonymous:
        with pytest.raises(Unauthenticated) as unauth:
            await anonymous.submit("job", lane=LANE)
    assert unauth.value.reason == "unauthenticated"
    assert unauth.value.code is grpc.StatusCode.UNAUTHENTICATED

    async with Client(api.address, token="wrong") as wrong:
        with pytest.raises(Unauthenticated):
            await wrong.get(missing_id())


async def test_cancel_replay_priority(client: Client) -> None:
    sub = await client.submit("job", lane=LANE)
    await client.change_priority(sub.execution_id, 100)
    assert (await client.get(sub.execution_id)).priority == 100
    assert await client.cancel(sub.execution_id, "no longer needed") is ExecutionState.CANCELLED
    with pytest.raises(ExecutionNotActive) as caught:
        await client.cancel(sub.execution_id)
    assert caught.value.terminal_outcome == "cancelled"
    assert await client.replay(sub.execution_id) is ExecutionState.WAITING


async def test_list_pages_and_iterator(client: Client) -> None:
    ids = {
        s.execution_id
        for s in await asyncio.gather(*(client.submit("job", lane=LANE) for _ in range(25)))
    }
    first = await client.list(lane=LANE, limit=10)
    assert len(first.executions) == 10 and first.next_page_token
    seen = [row.execution_id async for row in client.list_all(lane=LANE, page_size=7)]
    assert len(seen) == 25 and set(seen) == ids
    assert [r async for r in client.list_all(lane=LANE, state="terminal")] == []


async def test_watch_and_wait(client: Client) -> None:
    sub = await client.submit("job", lane=LANE)
    states: list[int] = []
    first = asyncio.Event()

    async def watch() -> None:
        async for message in client.watch(sub.execution_id, timeout=10):
            states.append(message.public_state)
            first.set()

    watcher = asyncio.create_task(watch())
    waiter = asyncio.create_task(client.wait(sub.execution_id, timeout=10))
    await asyncio.wait_for(first.wait(), 10)
    await client.cancel(sub.execution_id)
    assert await waiter is ExecutionState.CANCELLED
    await watcher
    assert states == [types_pb2.PUBLIC_STATE_WAITING, types_pb2.PUBLIC_STATE_CANCELLED]

    other = await client.submit("job", lane=LANE)
    with pytest.raises(TimeoutError):
        await client.wait(other.execution_id, timeout=0.3)


class FailFirstCreate(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Answers the first CreateExecution with UNAVAILABLE without sending it."""

    def __init__(self) -> None:
        self.creates = 0

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        if method.endswith("/CreateExecution"):
            self.creates += 1
            if self.creates == 1:
                raise grpc.aio.AioRpcError(
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.aio.Metadata(),
                    grpc.aio.Metadata(),
                    details="injected: connection dropped",
                )
        return await continuation(details, request)


async def test_create_retried_only_when_idempotent(api: Api) -> None:
    flaky = FailFirstCreate()
    async with Client(api.address, token=API_TOKEN, interceptors=[flaky]) as c:
        sub = await c.submit("job", lane=LANE, idempotency_key="once")
        assert not sub.duplicate and flaky.creates == 2

    flaky = FailFirstCreate()
    async with Client(api.address, token=API_TOKEN, interceptors=[flaky]) as c:
        with pytest.raises(Unavailable):
            await c.submit("job", lane=LANE)
        assert flaky.creates == 1


async def test_ff_target_and_ff_api_token_are_the_defaults(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FF_TARGET", api.address)
    monkeypatch.setenv("FF_API_TOKEN", API_TOKEN)
    async with Client() as client:
        assert client.target == api.address
        submitted = await client.submit("env-default", lane="env-lane")
        assert (await client.get(submitted.execution_id)).execution_id == submitted.execution_id
    monkeypatch.setenv("FF_API_TOKEN", "wrong-token")
    async with Client() as client:
        with pytest.raises(Unauthenticated):
            await client.get(submitted.execution_id)
    monkeypatch.delenv("FF_TARGET")
    assert Client(token="t").target == "127.0.0.1:50051", "the CLI's default"


async def test_submit_policy_as_mapping_or_text(client: Client) -> None:
    """A policy's JSON shape is sent as `policy_json`; the server checks it and names the field."""
    sub = await client.submit(
        "job", lane=LANE, policy={"retry_policy": {"max_retries": 4}}, budgets=["b-sdk-map"]
    )
    snap = await client.describe(sub.execution_id)
    assert snap.execution_id == sub.execution_id
    with pytest.raises(InvalidArgument) as caught:
        await client.submit("job", lane=LANE, policy='{"retry_policy": {"max_retries": "x"}}')
    assert caught.value.reason == "invalid_policy_json"
    with pytest.raises(ValueError, match="not a JSON object"):
        await client.submit("job", lane=LANE, policy="[1, 2]", budgets=["b"])
