"""Worker completions are batched naturally: a completion with none in flight is sent at once,
completions that finish while a call is in flight share the next CompleteExecutions call, and
every handler still gets its own outcome; a server without the batch RPC gets single calls."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from flowfabric import Client, ExecutionState, TaskContext, Worker
from tests.conftest import API_TOKEN, Api
from tests.sdk.conftest import eventually, running

LANE = "batch-complete"


class CompletionCalls(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Records every completion RPC as (method, items) and holds the first CompleteExecutions
    until `release` is set, so completions finishing meanwhile must queue behind it. With
    `unimplemented`, answers CompleteExecutions as a server without it would."""

    def __init__(self, *, unimplemented: bool = False) -> None:
        self.calls: list[tuple[str, int]] = []
        self.release = asyncio.Event()
        self.unimplemented = unimplemented

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        name = method.rsplit("/", 1)[-1]
        if name == "CompleteExecution":
            self.calls.append((name, 1))
        elif name == "CompleteExecutions":
            self.calls.append((name, len(request.items)))
            if self.unimplemented:
                raise grpc.aio.AioRpcError(
                    grpc.StatusCode.UNIMPLEMENTED,
                    grpc.aio.Metadata(),
                    grpc.aio.Metadata(),
                    details="Method not found!",
                )
            if len(self.calls) == 1:
                await self.release.wait()
        return await continuation(details, request)


def queued(worker: Worker) -> int:
    """Completions waiting behind the call in flight (the batcher's queue)."""
    assert worker._completions is not None
    return len(worker._completions._queue)


async def test_completions_finishing_during_a_call_share_the_next_one(
    api: Api, client: Client
) -> None:
    n = 6
    subs = [await client.submit("echo", {"i": i}, lane=LANE) for i in range(n)]
    calls = CompletionCalls()
    started: list[int] = []
    go_first, go_rest = asyncio.Event(), asyncio.Event()
    async with Client(api.address, token=API_TOKEN, interceptors=[calls]) as worker_client:
        worker = Worker(worker_client, lanes=[LANE], concurrency=8, claim_wait_ms=100)

        @worker.handler("echo")
        async def echo(ctx: TaskContext) -> dict[str, Any]:
            i = ctx.json()["i"]
            started.append(i)
            await (go_first if i == 0 else go_rest).wait()
            return {"echo": i}

        async with running(worker):
            await eventually(lambda: asyncio.sleep(0, len(started)), lambda k: k == n)
            go_first.set()  # alone: sent at once (and held in flight by the interceptor)
            await eventually(lambda: asyncio.sleep(0, list(calls.calls)), lambda c: len(c) == 1)
            go_rest.set()  # these finish while it is in flight: they queue behind it
            await eventually(lambda: asyncio.sleep(0, queued(worker)), lambda q: q == n - 1)
            assert calls.calls == [("CompleteExecutions", 1)]
            calls.release.set()
            await eventually(lambda: asyncio.sleep(0, worker.stats), lambda s: s.completed == n)
    assert calls.calls == [("CompleteExecutions", 1), ("CompleteExecutions", n - 1)]
    assert worker.stats.completed == n and worker.stats.lease_lost == 0
    for i, sub in enumerate(subs):
        assert await client.state(sub.execution_id) is ExecutionState.COMPLETED
        assert await client.result(sub.execution_id) == f'{{"echo":{i}}}'.encode()


async def test_each_handler_gets_its_own_outcome_from_a_shared_call(
    api: Api, client: Client
) -> None:
    first, kept, cancelled = [await client.submit("step", {"id": k}, lane=LANE)
                              for k in ("first", "kept", "cancelled")]  # fmt: skip
    calls = CompletionCalls()
    go = {k: asyncio.Event() for k in ("first", "kept", "cancelled")}
    running_ids: set[str] = set()
    async with Client(api.address, token=API_TOKEN, interceptors=[calls]) as worker_client:
        worker = Worker(worker_client, lanes=[LANE], concurrency=4, claim_wait_ms=100)

        @worker.handler("step")
        async def step(ctx: TaskContext) -> str:
            key = ctx.json()["id"]
            running_ids.add(key)
            await go[key].wait()
            return f"done-{key}"

        async with running(worker):
            await eventually(lambda: asyncio.sleep(0, len(running_ids)), lambda k: k == 3)
            # the operator cancels one execution while its handler runs: its completion is
            # refused (the lease is gone), the others in the same call are not affected
            assert await client.cancel(cancelled.execution_id, "operator") is (
                ExecutionState.CANCELLED
            )
            go["first"].set()
            await eventually(lambda: asyncio.sleep(0, len(calls.calls)), lambda c: c == 1)
            go["kept"].set()
            go["cancelled"].set()
            await eventually(lambda: asyncio.sleep(0, queued(worker)), lambda q: q == 2)
            calls.release.set()
            await eventually(
                lambda: asyncio.sleep(0, worker.stats),
                lambda s: s.completed + s.lease_lost == 3,
            )
    assert calls.calls == [("CompleteExecutions", 1), ("CompleteExecutions", 2)]
    assert worker.stats.completed == 2 and worker.stats.lease_lost == 1
    assert worker.stats.failed == 0 and worker.stats.replayed == 0
    assert await client.result(first.execution_id) == b"done-first"
    assert await client.result(kept.execution_id) == b"done-kept"
    assert await client.state(cancelled.execution_id) is ExecutionState.CANCELLED


async def test_a_server_without_the_batch_call_gets_single_completions(
    api: Api, client: Client
) -> None:
    subs = [await client.submit("plain", lane=LANE) for _ in range(3)]
    calls = CompletionCalls(unimplemented=True)
    async with Client(api.address, token=API_TOKEN, interceptors=[calls]) as worker_client:
        worker = Worker(worker_client, lanes=[LANE], concurrency=4, claim_wait_ms=100)

        @worker.handler("plain")
        async def plain(ctx: TaskContext) -> str:
            return "ok"

        async with running(worker):
            await eventually(lambda: asyncio.sleep(0, worker.stats), lambda s: s.completed == 3)
    batches = [size for name, size in calls.calls if name == "CompleteExecutions"]
    singles = [size for name, size in calls.calls if name == "CompleteExecution"]
    assert len(batches) == 1 and singles == [1, 1, 1]  # asked once, then single calls only
    assert worker.stats.completed == 3 and worker.stats.lease_lost == 0
    for sub in subs:
        assert await client.result(sub.execution_id) == b"ok"


async def test_batch_completions_off_sends_one_call_per_handler(api: Api, client: Client) -> None:
    subs = [await client.submit("plain", lane=LANE) for _ in range(3)]
    calls = CompletionCalls()
    async with Client(api.address, token=API_TOKEN, interceptors=[calls]) as worker_client:
        worker = Worker(
            worker_client, lanes=[LANE], concurrency=4, claim_wait_ms=100, batch_completions=False
        )

        @worker.handler("plain")
        async def plain(ctx: TaskContext) -> str:
            return "ok"

        async with running(worker):
            await eventually(lambda: asyncio.sleep(0, worker.stats), lambda s: s.completed == 3)
    assert calls.calls == [("CompleteExecution", 1)] * 3
    for sub in subs:
        assert await client.state(sub.execution_id) is ExecutionState.COMPLETED
