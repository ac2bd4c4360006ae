"""Suspension and signals through the SDK: a handler suspends, a signal resumes it and the re-run
handler sees the signal; early signals on a pending waitpoint; typed token errors; the watch
iterators; operator resume; HMAC key rotation; the blocking client."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import grpc
import pytest

from flowfabric import (
    Client,
    ExecutionState,
    FailedPrecondition,
    InvalidWaitpointToken,
    NotFound,
    PendingWaitpoint,
    Signal,
    SyncClient,
    TaskContext,
    Waitpoint,
    WaitpointClosed,
    WaitpointEvent,
    Worker,
)
from tests.conftest import API_TOKEN, Api
from tests.sdk.conftest import eventually, running

LANE = "sdk-signals"


def new_worker(client: Client) -> Worker:
    return Worker(client, lanes=[LANE], concurrency=4, claim_wait_ms=200)


async def active_waitpoint(client: Client, eid: str) -> Waitpoint:
    """The execution's waitpoint once it is suspended (read from the watch, the reviewer's way)."""
    async with contextlib.aclosing(client.watch_waitpoints(eid)) as events:
        async for event in events:
            if event.kind == "opened" and event.waitpoint and event.waitpoint.state == "active":
                return event.waitpoint
    raise AssertionError("the watch ended without an active waitpoint")


def partition_of(eid: str) -> int:
    return int(eid.split("}")[0].removeprefix("{fp:"))


def flip_last(token: str) -> str:
    return token[:-1] + ("0" if token[-1] != "0" else "1")


async def test_suspend_signal_resume_sees_the_signal_and_completes(client: Client) -> None:
    runs: list[tuple[bool, list[Signal]]] = []
    swallowed: list[BaseException] = []
    worker = new_worker(client)

    @worker.handler("review")
    async def review(ctx: TaskContext) -> dict[str, Any]:
        runs.append((ctx.resumed, list(ctx.resume_signals)))
        try:
            signal = await ctx.wait_for_signal("review", timeout=600, reason="waiting_for_approval")
        except Exception as exc:  # must not catch the suspension
            swallowed.append(exc)
            raise
        return {"approved": signal.json()["approved"], "by": signal.source_identity}

    sub = await client.submit("review", {"doc": 1}, lane=LANE)
    async with running(worker):
        wp = await active_waitpoint(client, sub.execution_id)
        assert wp.signal_names == ("review",) and wp.token.startswith("k")
        assert wp.token not in repr(wp)  # a credential never shows in a repr
        info = await client.get(sub.execution_id)
        assert ExecutionState(info.public_state) is ExecutionState.SUSPENDED
        delivered = await client.deliver_signal(
            sub.execution_id, wp.id, "review", wp.token, {"approved": True},
            source_type="user", source_identity="jane", category="approval",
        )  # fmt: skip
        assert delivered.resumed and not delivered.duplicate
        assert await client.wait(sub.execution_id, timeout=20) is ExecutionState.COMPLETED
    assert await client.result(sub.execution_id) == b'{"approved":true,"by":"jane"}'
    assert swallowed == []
    assert [resumed for resumed, _ in runs] == [False, True]
    (signal,) = runs[1][1]
    assert (signal.signal_id, signal.name, signal.payload) == (
        delivered.signal_id, "review", b'{"approved":true}',
    )  # fmt: skip
    assert (signal.category, signal.source_type, signal.waitpoint_id) == ("approval", "user", wp.id)
    stats = worker.stats
    assert (stats.claimed, stats.suspended, stats.completed, stats.failed) == (2, 1, 1, 0)


async def test_early_signal_on_a_pending_waitpoint_is_already_satisfied(client: Client) -> None:
    handed: asyncio.Queue[PendingWaitpoint] = asyncio.Queue()
    signalled = asyncio.Event()
    worker = new_worker(client)

    @worker.handler("callback")
    async def callback(ctx: TaskContext) -> Any:
        unused = await ctx.create_waitpoint(expires_in=60)
        await unused.close()
        wp = await ctx.create_waitpoint(expires_in=60)
        handed.put_nowait(unused)
        handed.put_nowait(wp)
        await signalled.wait()  # the "external system" answered before we suspend
        matched = await ctx.suspend("callback_result", waitpoint=wp, timeout=60)
        assert ctx.resume_signals == matched
        return {"got": [s.json() for s in matched], "resumed": ctx.resumed}

    sub = await client.submit("callback", lane=LANE)
    async with running(worker):
        unused, wp = await asyncio.wait_for(handed.get(), 10), await handed.get()
        assert wp.token not in repr(wp)
        listed = await client.list_waitpoints(sub.execution_id)
        assert [(w.id, w.state, w.token) for w in listed] == [(wp.id, "pending", wp.token)]
        with pytest.raises(WaitpointClosed) as closed:
            await client.deliver_signal(sub.execution_id, unused.id, "x", unused.token)
        assert closed.value.reason == "waitpoint_closed"
        early = await client.deliver_signal(
            sub.execution_id, wp.id, "callback_result", wp.token, {"n": 7}, idempotency_key="cb"
        )
        assert early.buffered
        again = await client.deliver_signal(
            sub.execution_id, wp.id, "callback_result", wp.token, {"n": 7}, idempotency_key="cb"
        )
        assert again.duplicate and again.signal_id == early.signal_id
        signalled.set()
        assert await client.wait(sub.execution_id, timeout=20) is ExecutionState.COMPLETED
    assert await client.result(sub.execution_id) == b'{"got":[{"n":7}],"resumed":false}'
    assert (worker.stats.suspended, worker.stats.completed) == (0, 1)


async def test_token_failures_are_typed_and_reveal_nothing(client: Client) -> None:
    worker = new_worker(client)

    @worker.handler("gate")
    async def gate(ctx: TaskContext) -> str:
        await ctx.wait_for_signal("open")
        return "opened"

    sub = await client.submit("gate", lane=LANE)
    eid = sub.execution_id
    async with running(worker):
        wp = await active_waitpoint(client, eid)
        tampered = flip_last(wp.token)
        with pytest.raises(InvalidWaitpointToken) as bad:
            await client.deliver_signal(eid, wp.id, "open", tampered)
        assert bad.value.reason == "invalid_token" and not bad.value.expired
        assert bad.value.code is grpc.StatusCode.PERMISSION_DENIED
        assert tampered not in str(bad.value) and wp.token[3:] not in repr(bad.value)
        with pytest.raises(InvalidWaitpointToken) as missing:
            await client.deliver_signal(eid, wp.id, "open", "")
        assert missing.value.reason == "missing_token"
        with pytest.raises(InvalidWaitpointToken) as unknown:  # no existence oracle
            await client.deliver_signal(
                eid, "6f1c2b1e-2f4a-4b8e-9d6a-1a2b3c4d5e6f", "open", wp.token
            )
        assert unknown.value.reason == "invalid_token"
        assert await client.state(eid) is ExecutionState.SUSPENDED  # nothing changed

        other = await client.deliver_signal(eid, wp.id, "unrelated", wp.token)
        assert other.effect == "no_op"
        opened = await client.signal(eid, "open", idempotency_key="open-1")  # looks the wp up
        assert opened.resumed
        assert await client.wait(eid, timeout=20) is ExecutionState.COMPLETED
        retry = await client.deliver_signal(eid, wp.id, "open", wp.token, idempotency_key="open-1")
        assert retry.duplicate and retry.signal_id == opened.signal_id
        with pytest.raises(WaitpointClosed):
            await client.deliver_signal(eid, wp.id, "open", wp.token)
    with pytest.raises(NotFound) as none_open:
        await client.find_waitpoint(eid, "open")
    assert none_open.value.reason == "waitpoint_not_found"


async def test_watch_iterators_replay_then_follow_and_end(client: Client) -> None:
    worker = new_worker(client)

    @worker.handler("votes")
    async def votes(ctx: TaskContext) -> int:
        if not ctx.resume_signals:
            await ctx.suspend(["vote", "vote"], mode="all")
        return sum(s.json() for s in ctx.resume_signals)

    sub = await client.submit("votes", lane=LANE)
    eid = sub.execution_id
    events: list[WaitpointEvent] = []

    async def watch_waitpoints() -> None:
        async for event in client.watch_waitpoints(eid):
            events.append(event)

    watcher = asyncio.create_task(watch_waitpoints())
    async with running(worker):
        wp = await active_waitpoint(client, eid)
        first = await client.deliver_signal(eid, wp.id, "vote", wp.token, 2)
        assert first.effect == "appended_to_waitpoint"
        replayed = [s async for s in _take(client.watch_signals(eid), 1)]
        assert [(s.signal_id, s.payload) for s in replayed] == [(first.signal_id, b"2")]
        later = asyncio.create_task(
            _collect(client.watch_signals(eid, wp.id, after=replayed[0].stream_id))
        )
        await asyncio.sleep(0.2)  # the watch is live (a later start would replay it anyway)
        second = await client.deliver_signal(eid, wp.id, "vote", wp.token, 3)
        assert second.resumed
        assert await client.wait(eid, timeout=20) is ExecutionState.COMPLETED
        # both watches end on their own once the execution is terminal
        assert [s.signal_id for s in await asyncio.wait_for(later, 10)] == [second.signal_id]
        await asyncio.wait_for(watcher, 10)
    everything = await asyncio.wait_for(_collect(client.watch_signals(eid)), 10)
    assert [s.signal_id for s in everything] == [first.signal_id, second.signal_id]
    assert everything[1].effect == "resume_condition_satisfied"
    assert await client.result(eid) == b"5"
    assert [(e.kind, e.waitpoint_id) for e in events] == [("opened", wp.id), ("closed", wp.id)]
    assert events[0].waitpoint is not None and events[0].waitpoint.token == wp.token
    assert events[1].close_reason == "resumed"


async def test_operator_resume_reruns_without_signals(client: Client) -> None:
    runs: list[tuple[bool, int]] = []
    refused: list[str] = []
    worker = new_worker(client)

    @worker.handler("paused")
    async def paused(ctx: TaskContext) -> str:
        runs.append((ctx.resumed, len(ctx.resume_signals)))
        if ctx.resumed and not ctx.resume_signals:
            return "resumed by an operator"
        for bad in ({"on_timeout": "explode"}, {"mode": "most"}, {"min_count": 2}):
            try:
                await ctx.suspend("never", **bad)
            except ValueError as exc:  # refused before any call: still leased, still active
                refused.append(str(exc).split(" ", 1)[0])
        await ctx.suspend("never", reason="manual_pause", on_timeout="escalate", timeout=3600)
        return "unreachable"

    sub = await client.submit("paused", lane=LANE)
    with pytest.raises(FailedPrecondition) as not_suspended:
        await client.resume(sub.execution_id)
    assert not_suspended.value.reason == "execution_not_suspended"
    async with running(worker):
        await active_waitpoint(client, sub.execution_id)
        assert await client.resume(sub.execution_id) is ExecutionState.WAITING
        assert await client.wait(sub.execution_id, timeout=20) is ExecutionState.COMPLETED
    assert runs == [(False, 0), (True, 0)]
    assert refused == ["on_timeout", "mode", "min_count"]


async def test_rotation_keeps_old_tokens_valid_in_grace(client: Client) -> None:
    worker = new_worker(client)

    @worker.handler("rotated")
    async def rotated(ctx: TaskContext) -> str:
        return (await ctx.wait_for_signal("go")).text()

    sub = await client.submit("rotated", lane=LANE)
    async with running(worker):
        wp = await active_waitpoint(client, sub.execution_id)  # signed by k1
        partition = partition_of(sub.execution_id)
        before = await client.waitpoint_kids(partition)
        assert (before.partition, before.current_kid, before.verifying) == (partition, "k1", {})
        rotation = await client.rotate_waitpoint_secret("k2", "ab" * 32, grace=600)
        assert rotation.complete and rotation.new_kid == "k2" and rotation.rotated > 0
        assert (await client.rotate_waitpoint_secret("k2", "ab" * 32)).complete  # safe repeat
        kids = await client.waitpoint_kids(partition)
        assert kids.current_kid == "k2" and list(kids.verifying) == ["k1"]
        delivered = await client.deliver_signal(sub.execution_id, wp.id, "go", wp.token, "ok")
        assert delivered.resumed
        assert await client.wait(sub.execution_id, timeout=20) is ExecutionState.COMPLETED


def blocking_signals(address: str, eid: str) -> list[str]:
    with SyncClient(address, token=API_TOKEN) as client:
        wp = client.find_waitpoint(eid, "go")
        assert [w.id for w in client.list_waitpoints(eid)] == [wp.id]
        assert client.deliver_signal(eid, wp.id, "go", wp.token, b"sync").resumed
        assert client.wait(eid, timeout=20) is ExecutionState.COMPLETED
        assert client.waitpoint_kids(partition_of(eid)).current_kid == "k1"
        return [s.text() for s in client.watch_signals(eid)]


async def test_sync_client_signals(api: Api, client: Client) -> None:
    worker = new_worker(client)

    @worker.handler("sync")
    async def sync(ctx: TaskContext) -> str:
        return (await ctx.wait_for_signal("go")).text()

    sub = await client.submit("sync", lane=LANE)
    async with running(worker):
        await active_waitpoint(client, sub.execution_id)
        texts = await asyncio.to_thread(blocking_signals, api.address, sub.execution_id)
    assert texts == ["sync"]
    assert await eventually(lambda: client.result(sub.execution_id), bool) == b"sync"


async def _take(stream: Any, n: int) -> Any:
    async with contextlib.aclosing(stream):
        async for item in stream:
            yield item
            n -= 1
            if n == 0:
                return


async def _collect(stream: Any) -> list[Any]:
    return [item async for item in stream]


async def test_watch_waitpoints_reports_a_pending_waitpoint_again_when_activated(
    client: Client,
) -> None:
    proceed = asyncio.Event()
    worker = new_worker(client)

    @worker.handler("staged")
    async def staged(ctx: TaskContext) -> str:
        if ctx.resume_signals:
            return ctx.resume_signals[0].name
        wp = await ctx.create_waitpoint(expires_in=60)
        await proceed.wait()
        await ctx.suspend("go", waitpoint=wp, timeout=60)
        return "unreachable"

    sub = await client.submit("staged", lane=LANE)
    eid = sub.execution_id
    events: list[WaitpointEvent] = []
    seen_pending = asyncio.Event()

    async def watch() -> None:
        async for event in client.watch_waitpoints(eid):
            events.append(event)
            if event.waitpoint is not None and event.waitpoint.state == "pending":
                seen_pending.set()

    watcher = asyncio.create_task(watch())
    async with running(worker):
        await asyncio.wait_for(seen_pending.wait(), 10)
        proceed.set()
        wp = await active_waitpoint(client, eid)
        await client.deliver_signal(eid, wp.id, "go", wp.token)
        assert await client.wait(eid, timeout=20) is ExecutionState.COMPLETED
        await asyncio.wait_for(watcher, 10)
    states = [(e.kind, e.waitpoint.state if e.waitpoint else e.close_reason) for e in events]
    assert states == [("opened", "pending"), ("opened", "active"), ("closed", "resumed")]
    assert {e.waitpoint_id for e in events} == {wp.id}
    assert await client.result(eid) == b"go"
