"""SDK streams: ctx.emit / ctx.stream with client-side batching, client.tail and read_stream."""

from __future__ import annotations

import asyncio
from typing import Any

from flowfabric import Client, ExecutionState, InvalidArgument, TaskContext, Worker
from tests.sdk.conftest import running

LANE = "sdk-streams"


async def test_emit_batches_and_tail_sees_every_frame(client: Client) -> None:
    sub = await client.submit("gen", {"n": 300}, lane=LANE)
    release = asyncio.Event()
    worker = Worker(client, lanes=[LANE], concurrency=1, claim_wait_ms=200)
    calls: list[int] = []

    @worker.handler("gen")
    async def gen(ctx: TaskContext) -> str:
        for i in range(ctx.json()["n"]):
            await ctx.emit("token", f"t{i}")
        await ctx.emit("bin", bytes(range(256)))
        await ctx.emit("usage", {"tokens": 300}, correlation_id="c1")
        await ctx.flush()
        calls.append(ctx.frames_appended)
        await release.wait()
        n = await ctx.stream((f"s{i}" for i in range(5)), frame_type="tail")
        return f"done {n}"

    seen: list[Any] = []

    async def tailer() -> None:
        async for frame in client.tail(sub.execution_id):
            seen.append(frame)
            if len(seen) == 302:
                release.set()

    async with running(worker):
        reader = asyncio.create_task(tailer())
        await asyncio.wait_for(reader, 20)
        assert await client.wait(sub.execution_id, timeout=10) == ExecutionState.COMPLETED
    assert calls == [302]
    assert [f.payload for f in seen[:300]] == [f"t{i}".encode() for i in range(300)]
    assert {(f.frame_type, f.encoding) for f in seen[:300]} == {("token", "utf8")}
    assert seen[300].payload == bytes(range(256)) and seen[300].encoding == "binary"
    assert seen[301].encoding == "json" and seen[301].correlation_id == "c1"
    # the frames emitted right before returning were flushed before the stream closed
    assert [f.payload for f in seen[302:]] == [f"s{i}".encode() for i in range(5)]
    page = await client.read_stream(sub.execution_id, limit=1000)
    assert len(page.frames) == 307 and page.closed_reason == "attempt_success"
    # resume after frame k
    k = seen[9]
    again = [f async for f in client.tail(sub.execution_id, after=k.id)]
    assert [f.id for f in again] == [f.id for f in seen[10:]]


async def test_read_stream_rejects_bare_markers(client: Client) -> None:
    sub = await client.submit("x", b"", lane=LANE)
    for bad in ("-", "+", ""):
        try:
            await client.read_stream(sub.execution_id, start=bad)
        except InvalidArgument as exc:
            assert exc.reason == "invalid_input"
        else:
            raise AssertionError(f"{bad!r} accepted")
    page = await client.read_stream(sub.execution_id)
    assert list(page.frames) == [] and not page.HasField("closed_at")
    assert [f async for f in client.tail(sub.execution_id, follow=False)] == []
