"""Worker: throughput with exactly-once completion, retries and handler-chosen outcomes, lease
loss on cancel, replay reconciliation of a lost reply, graceful shutdown release."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import grpc
import pytest

from flowfabric import (
    AlreadyExists,
    Client,
    ExecutionFailed,
    ExecutionState,
    NonRetryableError,
    ResultNotReady,
    RetryAfter,
    RetryPolicy,
    TaskContext,
    Worker,
)
from flowfabric._worker import MAX_TRACEBACK_BYTES, failure_details
from flowfabric.server.valkey.ids import parse_execution_id
from flowfabric.server.valkey.keys import ExecKeys
from flowfabric.server.valkey.store import Store
from tests.conftest import API_TOKEN, Api
from tests.sdk.conftest import eventually, running

LANE = "sdk"


async def attempt_field(store: Store, eid: str, index: int, field: str) -> str:
    """One field of an attempt record (read behind the server, to check what it stored)."""
    key = ExecKeys(parse_execution_id(eid, 1 << 16)).attempt(index)
    raw = await store.call("HGET", key, field)
    return raw.decode() if isinstance(raw, bytes) else str(raw)


async def test_thousand_executions_complete_exactly_once(client: Client) -> None:
    total = 1000
    ids: list[str] = []
    for start in range(0, total, 100):
        subs = await asyncio.gather(
            *(client.submit("count", {"i": i}, lane=LANE) for i in range(start, start + 100))
        )
        ids += [s.execution_id for s in subs]
    runs: Counter[str] = Counter()
    worker = Worker(client, lanes=[LANE], concurrency=16, claim_wait_ms=200)

    @worker.handler("count")
    async def count(ctx: TaskContext) -> dict[str, Any]:
        runs[ctx.execution_id] += 1
        await asyncio.sleep(0)
        return {"i": ctx.json()["i"]}

    async with running(worker):
        await eventually(lambda: asyncio.sleep(0, worker.stats.completed), lambda n: n >= total, 60)
    assert worker.stats.completed == total and worker.stats.failed == 0
    assert set(runs) == set(ids) and set(runs.values()) == {1}
    terminal = [row async for row in client.list_all(lane=LANE, state="terminal", page_size=500)]
    assert sorted(r.execution_id for r in terminal) == sorted(ids)
    assert {ExecutionState(r.public_state) for r in terminal} == {ExecutionState.COMPLETED}
    assert await client.result(ids[7]) == b'{"i":7}'


async def test_tasks_at_the_payload_maximum_run_on_their_first_attempt(
    api: Api, client: Client
) -> None:
    """16 tasks of 1 MiB: the worker's claims stay within what it can receive
    (docs/lifecycle.md#claim-reply-size), so every task runs on its first lease instead of
    waiting for a lease leaked in a dropped reply to expire."""
    ids = [
        (await client.submit("big", bytes([i]) * (1 << 20), lane=LANE)).execution_id
        for i in range(16)
    ]
    sizes: dict[str, int] = {}
    worker = Worker(client, lanes=[LANE], concurrency=16, claim_wait_ms=200)

    @worker.handler("big")
    async def big(ctx: TaskContext) -> bytes:
        sizes[ctx.execution_id] = len(ctx.payload)
        return b"ok"

    async with running(worker):
        await eventually(lambda: asyncio.sleep(0, worker.stats.completed), lambda n: n >= 16, 30)
    assert sizes == {eid: 1 << 20 for eid in ids}
    for eid in ids:
        assert await attempt_field(api.store, eid, 0, "attempt_state") == "ended_success"
        assert await attempt_field(api.store, eid, 1, "attempt_state") == "None"


async def test_failures_retry_per_policy_then_fail(engine_api: Api) -> None:
    async with Client(engine_api.address, token=API_TOKEN) as client:
        sub = await client.submit("flaky", lane=LANE, policy=RetryPolicy.fixed(2, 50))
        seen: list[tuple[int, str]] = []
        worker = Worker(client, lanes=[LANE], concurrency=2, claim_wait_ms=200)

        @worker.handler("flaky")
        async def flaky(ctx: TaskContext) -> None:
            seen.append((ctx.attempt_index, ctx.attempt_type))
            raise ValueError(f"boom {ctx.attempt_index}")

        async with running(worker):
            assert await client.wait(sub.execution_id, timeout=15) is ExecutionState.FAILED
        assert seen == [(0, "initial"), (1, "retry"), (2, "retry")]
        assert worker.stats.failed == 3


async def test_non_retryable_error_fails_at_once(api: Api, client: Client) -> None:
    sub = await client.submit("fatal", lane=LANE, policy=RetryPolicy.fixed(5, 10))
    attempts: list[int] = []
    worker = Worker(client, lanes=[LANE], concurrency=1, claim_wait_ms=100)

    @worker.handler("fatal")
    async def fatal(ctx: TaskContext) -> None:
        attempts.append(ctx.attempt_index)
        raise NonRetryableError("bad input", category="validation")

    async with running(worker):
        assert await client.wait(sub.execution_id, timeout=10) is ExecutionState.FAILED
    assert attempts == [0] and worker.stats.failed == 1
    assert await attempt_field(api.store, sub.execution_id, 0, "failure_category") == "validation"


async def test_unknown_kind_fails_non_retryably(api: Api, client: Client) -> None:
    sub = await client.submit("nobody-handles-this", lane=LANE, policy=RetryPolicy.fixed(5, 10))
    worker = Worker(client, lanes=[LANE], concurrency=1, claim_wait_ms=100)

    @worker.handler("other")
    async def other(ctx: TaskContext) -> None:
        raise AssertionError("not called")

    async with running(worker):
        assert await client.wait(sub.execution_id, timeout=10) is ExecutionState.FAILED
    eid = sub.execution_id
    assert await attempt_field(api.store, eid, 0, "failure_category") == "unknown_kind"
    assert "no handler for kind" in await attempt_field(api.store, eid, 0, "failure_reason")


async def test_retry_after_sets_the_retry_delay(engine_api: Api) -> None:
    policy_backoff_ms = 5_000
    async with Client(engine_api.address, token=API_TOKEN) as client:
        sub = await client.submit(
            "later", lane=LANE, policy=RetryPolicy.fixed(2, policy_backoff_ms)
        )
        eid = sub.execution_id
        worker = Worker(client, lanes=[LANE], concurrency=1, claim_wait_ms=200)

        @worker.handler("later")
        async def later(ctx: TaskContext) -> str:
            if ctx.attempt_index == 0:
                raise RetryAfter(300, "rate limited upstream")
            return "done"

        core = ExecKeys(parse_execution_id(eid, 1 << 16)).core
        async with running(worker):
            # the fail writes retry_count and delay_until in one atomic call
            await eventually(
                lambda: engine_api.store.call("HGET", core, "retry_count"),
                lambda v: v is not None and int(v) >= 1,
            )
            delay_until = int(await engine_api.store.call("HGET", core, "delay_until"))
            failed_at = int(await attempt_field(engine_api.store, eid, 0, "ended_at"))
            assert delay_until - failed_at == 300  # not the policy's 5 s backoff
            assert await client.wait(eid, timeout=10) is ExecutionState.COMPLETED
        retried_at = int(await attempt_field(engine_api.store, eid, 1, "started_at"))
        assert retried_at >= delay_until


async def test_cancel_stops_the_running_handler_within_one_renewal(client: Client) -> None:
    ttl_ms = 900  # renewal every 300 ms
    sub = await client.submit("slow", lane=LANE)
    started, stopped = asyncio.Event(), asyncio.Event()
    observed: dict[str, Any] = {}
    worker = Worker(client, lanes=[LANE], concurrency=1, lease_ttl_ms=ttl_ms, claim_wait_ms=100)

    @worker.handler("slow")
    async def slow(ctx: TaskContext) -> None:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            observed.update(at=time.monotonic(), lost=ctx.lease_lost.is_set(),
                            reason=ctx.lease_lost_reason, cancelled=ctx.cancelled)  # fmt: skip
            stopped.set()
            raise

    async with running(worker):
        await asyncio.wait_for(started.wait(), 10)
        cancelled_at = time.monotonic()
        assert await client.cancel(sub.execution_id, "operator") is ExecutionState.CANCELLED
        await asyncio.wait_for(stopped.wait(), 5)
    assert observed["lost"] and observed["cancelled"]
    assert observed["reason"] in {"execution_not_active", "lease_revoked", "stale_lease"}
    assert observed["at"] - cancelled_at <= ttl_ms / 3 / 1000 + 0.5
    assert worker.stats.lease_lost == 1 and worker.stats.completed == 0
    assert await client.state(sub.execution_id) is ExecutionState.CANCELLED


class LoseFirstCompleteReply(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Lets the first completion call (CompleteExecution or the worker's CompleteExecutions
    batch) reach the server and commit, then reports UNAVAILABLE to the caller as if the reply
    had been lost."""

    def __init__(self) -> None:
        self.completes = 0

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        call = await continuation(details, request)
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        if method.endswith(("/CompleteExecution", "/CompleteExecutions")):
            self.completes += 1
            if self.completes == 1:
                await call
                raise grpc.aio.AioRpcError(
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.aio.Metadata(),
                    grpc.aio.Metadata(),
                    details="injected: reply lost",
                )
        return call


async def test_lost_complete_reply_is_reconciled_as_replayed(api: Api, client: Client) -> None:
    sub = await client.submit("once", lane=LANE)
    lossy = LoseFirstCompleteReply()
    runs = 0
    async with Client(api.address, token=API_TOKEN, interceptors=[lossy]) as worker_client:
        worker = Worker(worker_client, lanes=[LANE], concurrency=1, claim_wait_ms=100)

        @worker.handler("once")
        async def once(ctx: TaskContext) -> bytes:
            nonlocal runs
            runs += 1
            return b"result"

        async with running(worker):
            assert await client.wait(sub.execution_id, timeout=10) is ExecutionState.COMPLETED
            await eventually(lambda: asyncio.sleep(0, worker.stats), lambda s: s.completed == 1)
    assert lossy.completes == 2 and runs == 1
    assert worker.stats.replayed == 1 and worker.stats.completed == 1
    assert await client.result(sub.execution_id) == b"result"


async def test_shutdown_releases_unfinished_work_to_another_worker(engine_api: Api) -> None:
    async with Client(engine_api.address, token=API_TOKEN) as client:
        sub = await client.submit("long", lane=LANE)
        started = asyncio.Event()
        first = Worker(client, lanes=[LANE], concurrency=1, claim_wait_ms=100,
                       shutdown_grace_s=0.2)  # fmt: skip

        @first.handler("long")
        async def hang(ctx: TaskContext) -> None:
            started.set()
            await asyncio.sleep(60)

        async with running(first):
            await asyncio.wait_for(started.wait(), 10)
        assert first.stats.released == 1
        assert await client.state(sub.execution_id) in (
            ExecutionState.DELAYED,
            ExecutionState.WAITING,
        )

        resumed: list[tuple[int, bool]] = []
        second = Worker(client, lanes=[LANE], concurrency=1, claim_wait_ms=100)

        @second.handler("long")
        async def finish(ctx: TaskContext) -> str:
            await ctx.progress(100, "done")
            resumed.append((ctx.attempt_index, ctx.resumed))
            return "ok"

        async with running(second):
            assert await client.wait(sub.execution_id, timeout=10) is ExecutionState.COMPLETED
        assert resumed == [(0, True)]
        assert await client.result(sub.execution_id) == b"ok"


async def test_registration_guards_the_instance_id_until_deregistered(client: Client) -> None:
    first = Worker(client, lanes=[LANE], worker_instance_id="only-one", claim_wait_ms=100)
    stop = asyncio.Event()
    async with first:
        runner = asyncio.create_task(first.run_until(stop))
        twin = Worker(client, lanes=[LANE], worker_instance_id="only-one")
        with pytest.raises(AlreadyExists) as caught:
            await twin.start()
        assert caught.value.reason == "duplicate_worker_instance"
        stop.set()
        await asyncio.wait_for(runner, 5)
    again = Worker(client, lanes=[LANE], worker_instance_id="only-one")
    async with again:  # DeregisterWorker on exit freed the id
        pass


async def test_result_encodings_and_unencodable_result(client: Client) -> None:
    text = await client.submit("echo", {"say": "héllo"}, lane=LANE)
    odd = await client.submit("odd", lane=LANE)
    worker = Worker(client, lanes=[LANE], concurrency=2, claim_wait_ms=100)

    @worker.handler("echo")
    async def echo(ctx: TaskContext) -> str:
        assert ctx.payload_encoding == "json" and ctx.kind == "echo" and ctx.lane == LANE
        return str(ctx.json()["say"])

    @worker.handler("odd")
    async def unencodable(ctx: TaskContext) -> Any:
        return {"not": object()}

    async with running(worker):
        assert await client.wait(text.execution_id, timeout=10) is ExecutionState.COMPLETED
        assert await client.wait(odd.execution_id, timeout=10) is ExecutionState.FAILED
    assert await client.result(text.execution_id) == "héllo".encode()


async def test_a_failing_handler_is_readable_from_get_describe_and_result(
    engine_api: Api,
) -> None:
    async with Client(engine_api.address, token=API_TOKEN) as client:
        await _failing_handler_is_readable(client)


async def _failing_handler_is_readable(client: Client) -> None:
    sub = await client.submit("explode", lane=LANE, policy=RetryPolicy.fixed(1, 10))
    worker = Worker(client, lanes=[LANE], concurrency=1, claim_wait_ms=100)

    @worker.handler("explode")
    async def explode(ctx: TaskContext) -> None:
        raise KeyError(f"missing-{ctx.attempt_index}")

    async with running(worker):
        assert await client.wait(sub.execution_id, timeout=10) is ExecutionState.FAILED
    info = await client.get(sub.execution_id)
    failure = info.last_failure
    assert failure.reason == "KeyError: 'missing-1'" and failure.category == "KeyError"
    assert failure.attempt_index == 1 and failure.worker_instance_id == worker.worker_instance_id
    assert "Traceback" in failure.details and "in explode" in failure.details
    assert failure.failed_at > 0
    snap = await client.describe(sub.execution_id)
    assert [(a.attempt_index, a.outcome) for a in snap.attempts] == [
        (0, "ended_failure"),
        (1, "ended_failure"),
    ]
    assert snap.attempts[0].failure_reason == "KeyError: 'missing-0'"
    assert snap.last_failure == failure
    with pytest.raises(ExecutionFailed) as caught:
        await client.result(sub.execution_id)
    assert caught.value.reason == "execution_failed" and caught.value.attempt_index == 1
    assert caught.value.failure_reason == "KeyError: 'missing-1'"


async def test_result_of_a_cancelled_or_unfinished_execution_says_which(client: Client) -> None:
    sub = await client.submit("never", lane=LANE)
    with pytest.raises(ResultNotReady):
        await client.result(sub.execution_id)
    await client.cancel(sub.execution_id, reason="no longer needed")
    with pytest.raises(ExecutionFailed) as caught:
        await client.result(sub.execution_id)
    assert caught.value.outcome == "cancelled"
    assert "no longer needed" in caught.value.failure_reason
    assert "no longer needed" in (await client.get(sub.execution_id)).last_failure.reason


def test_failure_details_keep_the_tail_of_a_long_traceback() -> None:
    try:
        raise RuntimeError("x" * 20_000 + " bottom")
    except RuntimeError as exc:
        details = failure_details(exc)
    assert len(details.encode()) <= MAX_TRACEBACK_BYTES
    assert details.startswith("...(traceback cut)") and details.endswith("x bottom\n")
    assert failure_details(RuntimeError("never raised")) == ""
