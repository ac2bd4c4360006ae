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
        worker = Worker(
            worker_client, lanes=[LANE], concurrency=8, claim_wait_ms=100, completion_calls=1
        )

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
        worker = Worker(
            worker_client, lanes=[LANE], concurrency=4, claim_wait_ms=100, completion_calls=1
        )

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
    # asked once per call in flight (2 by default), then single calls only
    assert 1 <= len(batches) <= 2 and singles == [1, 1, 1]
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


class LeaseLedger(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """The worker's leases as its replies show them: a lease is held from the claim reply that
    brought it (ClaimNext or a CompleteExecutions with `claim`) until the reply of its
    completion; `peak` is the most held at once. Delays every CompleteExecutions by `delay`
    (wider windows for a ClaimNext to race it); with `fail_first`, the first one carrying a
    claim fails UNAVAILABLE before it reaches the server; `hold` parks that first one until set."""

    def __init__(self, delay: float = 0.0, *, fail_first: bool = False) -> None:
        self.held: set[str] = set()
        self.peak = 0
        self.claim_calls = 0
        self.claimed_with_completions = 0
        self.delay = delay
        self.fail_first = fail_first
        self.combined = 0
        self.hold: asyncio.Event | None = None
        self.holding = asyncio.Event()
        self.in_flight = self.most_in_flight = self.most_items = 0

    def _took(self, tasks: Any) -> None:
        self.held.update(task.lease.execution_id for task in tasks)
        self.peak = max(self.peak, len(self.held))

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        name = method.rsplit("/", 1)[-1]
        if name == "CompleteExecutions":
            self.most_items = max(self.most_items, len(request.items))
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            try:
                return await self._complete(continuation, details, request)
            finally:
                self.in_flight -= 1
        call = await continuation(details, request)
        if name == "ClaimNext":
            self.claim_calls += 1
            reply = await call
            which = reply.WhichOneof("outcome")
            self._took([reply.task] if which == "task" else reply.batch.tasks)
        elif name == "DelayExecution":  # released on shutdown
            await call
            self.held.discard(request.lease.execution_id)
        return call

    async def _complete(self, continuation: Any, details: Any, request: Any) -> Any:
        await asyncio.sleep(self.delay)
        if request.HasField("claim"):
            self.combined += 1
            if self.combined == 1 and self.fail_first:
                raise grpc.aio.AioRpcError(
                    grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata()
                )
            if self.combined == 1 and self.hold is not None:
                self.holding.set()
                await self.hold.wait()
        call = await continuation(details, request)
        reply = await call  # a completion call's reply: releases, then new leases
        for result in reply.results:
            self.held.discard(result.execution_id)
        self.claimed_with_completions += len(reply.claimed)
        self._took(reply.claimed)
        return call


async def drain_queue(
    api: Api, client: Client, n: int, concurrency: int, ledger: LeaseLedger, **options: Any
) -> Worker:
    """Submit `n` jobs of varied length, run a worker until all are completed."""
    subs = [await client.submit("vary", {"i": i}, lane=LANE) for i in range(n)]
    async with Client(api.address, token=API_TOKEN, interceptors=[ledger]) as worker_client:
        worker = Worker(
            worker_client, lanes=[LANE], concurrency=concurrency, claim_wait_ms=100, **options
        )

        @worker.handler("vary")
        async def vary(ctx: TaskContext) -> int:
            i = ctx.json()["i"]
            await asyncio.sleep((i % 4) * 0.003)
            return int(i)

        async with running(worker):
            await eventually(lambda: asyncio.sleep(0, worker.stats), lambda s: s.completed == n)
    for i, sub in enumerate(subs):
        assert await client.result(sub.execution_id) == str(i).encode()
    return worker


async def test_completion_calls_claim_for_the_slots_they_free_never_more(
    api: Api, client: Client
) -> None:
    n, concurrency = 60, 4
    combined = LeaseLedger(delay=0.005)
    worker = await drain_queue(api, client, n, concurrency, combined)
    assert worker.stats.claimed == n and worker.stats.lease_lost == 0
    assert combined.held == set()
    assert 0 < combined.peak <= concurrency
    assert combined.claimed_with_completions > 0
    # two completion calls in flight at most (the default), each of at most 4 / 2 items
    assert combined.most_in_flight <= 2 and 0 < combined.most_items <= 2
    # the same queue claimed through ClaimNext only: more ClaimNext round trips
    claim_next_only = LeaseLedger(delay=0.005)
    await drain_queue(api, client, n, concurrency, claim_next_only, claim_with_completions=False)
    assert claim_next_only.claimed_with_completions == 0 and claim_next_only.combined == 0
    assert 0 < claim_next_only.peak <= concurrency
    assert combined.claim_calls < claim_next_only.claim_calls
    # one call in flight: up to every slot's completion in one call
    one_call = LeaseLedger(delay=0.005)
    await drain_queue(api, client, n, concurrency, one_call, completion_calls=1)
    assert one_call.most_in_flight == 1 and one_call.most_items <= concurrency
    assert 0 < one_call.peak <= concurrency and one_call.claimed_with_completions > 0


async def test_a_failed_completion_call_hands_its_slots_back(api: Api, client: Client) -> None:
    n, concurrency = 24, 3
    ledger = LeaseLedger(delay=0.002, fail_first=True)
    worker = await drain_queue(api, client, n, concurrency, ledger)
    assert ledger.combined > 1  # the failed one, then the retries and the rest
    assert worker.stats.claimed == n and worker.stats.completed == n
    assert 0 < ledger.peak <= concurrency and ledger.held == set()


async def test_tasks_a_completion_call_brings_during_shutdown_are_drained(
    api: Api, client: Client
) -> None:
    subs = [await client.submit("quick", lane=LANE) for _ in range(8)]
    ledger = LeaseLedger()
    ledger.hold = asyncio.Event()
    async with Client(api.address, token=API_TOKEN, interceptors=[ledger]) as worker_client:
        worker = Worker(worker_client, lanes=[LANE], concurrency=2, claim_wait_ms=100)

        @worker.handler("quick")
        async def quick(ctx: TaskContext) -> str:
            return "ok"

        async with running(worker):
            await asyncio.wait_for(ledger.holding.wait(), 10)
            worker.stop()  # the completion call in flight claimed before the stop
            ledger.hold.set()
    assert ledger.claimed_with_completions > 0
    assert worker.stats.claimed == worker.stats.completed + worker.stats.released
    assert ledger.held == set()  # every lease it took was completed or released
    states = [await client.state(sub.execution_id) for sub in subs]
    assert ExecutionState.ACTIVE not in states
    assert states.count(ExecutionState.COMPLETED) == worker.stats.completed
