"""Attempt output streams over gRPC: AppendFrame(s), ReadAttemptStream, TailAttemptStream.

Real server, real Valkey, both topologies (docs/streams.md, docs/architecture.md#events-and-watches,
docs/architecture.md#error-model, docs/architecture.md#limits, docs/streams.md#tails).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from flowfabric.server.app import FlowFabricServer
from flowfabric.server.config import Config
from flowfabric.server.valkey.store import Store
from flowfabric.v1 import execution_pb2 as pb
from flowfabric.v1 import stream_pb2 as spb
from flowfabric.v1 import stream_pb2_grpc
from flowfabric.v1 import types_pb2 as t
from flowfabric.v1 import worker_pb2 as wpb
from tests.api.test_lifecycle import claim_one, complete, create, fail, with_epoch
from tests.api.util import error_info, expect_error
from tests.conftest import API_TOKEN, HMAC_SECRET, Api

C = grpc.StatusCode


def streams(api: Api) -> stream_pb2_grpc.StreamServiceStub:
    return stream_pb2_grpc.StreamServiceStub(api.channel)


async def started(api: Api, instance: str = "w-1") -> t.LeaseHandle:
    await create(api)
    return (await claim_one(api, instance)).lease


async def append(
    api: Api, lease: t.LeaseHandle, payload: bytes = b"x", frame_type: str = "log", **kw: Any
) -> wpb.AppendFrameResponse:
    return await api.worker.AppendFrame(  # type: ignore[no-any-return]
        wpb.AppendFrameRequest(lease=lease, frame_type=frame_type, payload=payload, **kw),
        metadata=api.metadata,
    )


async def read(api: Api, eid: str, idx: int = 0, **kw: Any) -> t.StreamFrames:
    reply = await streams(api).ReadAttemptStream(
        spb.ReadAttemptStreamRequest(execution_id=eid, attempt_index=idx, **kw),
        metadata=api.metadata,
    )
    return reply.frames


def tail(api: Api, eid: str, idx: int = 0, **kw: Any) -> Any:
    return streams(api).TailAttemptStream(
        spb.TailAttemptStreamRequest(execution_id=eid, attempt_index=idx, **kw),
        metadata=api.metadata,
    )


async def collect(call: Any) -> list[spb.TailAttemptStreamResponse]:
    """Every remaining message (read() style, so it mixes with earlier read() calls)."""
    out = []
    while (msg := await call.read()) is not grpc.aio.EOF:
        out.append(msg)
    return out


def frames_of(messages: list[spb.TailAttemptStreamResponse]) -> list[t.StreamFrame]:
    return [f for m in messages for f in m.frames]


# -- append and read ----------------------------------------------------------------------------


async def test_append_and_read_fields_and_pages(api: Api) -> None:
    lease = await started(api)
    ids = []
    for i, kind in enumerate(("f1", "f2", "f3")):
        r = await append(api, lease, f"p{i}".encode(), kind, correlation_id="c" if i else "")
        assert r.appended.frame_count == i + 1
        ids.append(r.appended.entry_id)
    page = await read(api, lease.execution_id, from_id="start", to_id="end", count_limit=2)
    assert [f.id for f in page.frames] == ids[:2]
    f1 = page.frames[0]
    assert (f1.frame_type, f1.payload, f1.encoding, f1.source) == ("f1", b"p0", "utf8", "worker")
    assert f1.ts > 0 and not f1.HasField("correlation_id")
    assert page.frames[1].correlation_id == "c"
    assert not page.HasField("closed_at")
    ms, seq = ids[1].split("-")
    rest = await read(api, lease.execution_id, from_id=f"{ms}-{int(seq) + 1}")
    assert [f.id for f in rest.frames] == ids[2:]
    await complete(api, lease)
    done = await read(api, lease.execution_id)
    assert len(done.frames) == 3 and done.closed_reason == "attempt_success"
    assert done.closed_at > 0


async def test_read_of_never_written_stream(api: Api) -> None:
    lease = await started(api)
    frames = await read(api, lease.execution_id, idx=3)
    assert list(frames.frames) == [] and not frames.HasField("closed_at")


async def test_binary_payload_every_byte_value(api: Api) -> None:
    lease = await started(api)
    payload = bytes(range(256)) * 16
    await append(api, lease, payload, "bin", encoding="binary")
    await append(api, lease, b"\x00\xff\xfe invalid utf8 \xc3\x28", "bin")
    got = await read(api, lease.execution_id)
    assert got.frames[0].payload == payload and got.frames[0].encoding == "binary"
    assert got.frames[1].payload == b"\x00\xff\xfe invalid utf8 \xc3\x28"
    tailed = frames_of(await collect(tail(api, lease.execution_id, follow=False)))
    assert [f.payload for f in tailed] == [f.payload for f in got.frames]


@pytest.mark.parametrize("cursor", ["-", "+", "", "abc", "1-", "(5", "-5", "1-2-3", "١٢",
                                    "18446744073709551616"])  # fmt: skip
async def test_bad_cursors_are_invalid_argument(api: Api, cursor: str) -> None:
    eid = (await started(api)).execution_id
    info = await expect_error(read(api, eid, from_id=cursor), C.INVALID_ARGUMENT, "invalid_input")
    assert info.metadata["field"] == "from_id"
    await expect_error(read(api, eid, to_id=cursor), C.INVALID_ARGUMENT, "invalid_input")
    await expect_error(collect(tail(api, eid, after=cursor)), C.INVALID_ARGUMENT, "invalid_input")


async def test_bad_limits(api: Api) -> None:
    eid = (await started(api)).execution_id
    for n in (0, 1001):
        await expect_error(read(api, eid, count_limit=n), C.INVALID_ARGUMENT, "invalid_input")
    for kw in ({"after": "start"}, {"after": "end"}, {"batch": 0}, {"batch": 1001},
               {"idle_timeout_ms": 300_001}):  # fmt: skip
        await expect_error(collect(tail(api, eid, **kw)), C.INVALID_ARGUMENT, "invalid_input")
    assert len((await read(api, eid, count_limit=1000, from_id="0", to_id="9")).frames) == 0


async def test_append_errors(api: Api) -> None:
    lease = await started(api)
    await append(api, lease)
    stale = with_epoch(lease, lease.lease_epoch + 1)
    await expect_error(append(api, stale), C.FAILED_PRECONDITION, "stale_owner_cannot_append")
    await expect_error(
        append(api, lease, b"x" * 65537), C.RESOURCE_EXHAUSTED, "retention_limit_exceeded"
    )
    await append(api, lease, b"x" * 65536)
    await expect_error(append(api, lease, frame_type=""), C.INVALID_ARGUMENT, "invalid_frame_type")
    await complete(api, lease)
    await expect_error(append(api, lease), C.FAILED_PRECONDITION, "stream_closed")
    assert len((await read(api, lease.execution_id)).frames) == 2


async def test_stale_holder_after_reclaim_cannot_append(api: Api) -> None:
    """The previous holder of a revoked-and-reclaimed lease is fenced out of both streams."""
    lease = await started(api)
    await append(api, lease)
    from flowfabric.v1 import execution_pb2 as epb

    await api.execution.RevokeLease(
        epb.RevokeLeaseRequest(execution_id=lease.execution_id), metadata=api.metadata
    )
    await expect_error(append(api, lease), C.FAILED_PRECONDITION, "stale_owner_cannot_append")


async def test_append_frames_client_stream(api: Api) -> None:
    lease = await started(api)

    async def frames(n: int, bad_at: int | None = None) -> AsyncIterator[wpb.AppendFramesRequest]:
        for i in range(n):
            payload = b"x" * 70_000 if i == bad_at else str(i).encode()
            yield wpb.AppendFramesRequest(
                frame=wpb.AppendFrameRequest(lease=lease, frame_type="token", payload=payload)
            )

    reply = await api.worker.AppendFrames(frames(100), metadata=api.metadata)
    assert (reply.appended_count, reply.frame_count) == (100, 100)
    got = (await read(api, lease.execution_id, count_limit=1000)).frames
    assert [f.payload for f in got] == [str(i).encode() for i in range(100)]
    assert reply.last_entry_id == got[-1].id
    info = await expect_error(
        api.worker.AppendFrames(frames(10, bad_at=3), metadata=api.metadata),
        C.RESOURCE_EXHAUSTED,
        "retention_limit_exceeded",
    )
    assert info.metadata["appended_count"] == "3"
    assert len((await read(api, lease.execution_id, count_limit=1000)).frames) == 103
    stale = with_epoch(lease, lease.lease_epoch + 1)

    async def stale_frames() -> AsyncIterator[wpb.AppendFramesRequest]:
        yield wpb.AppendFramesRequest(
            frame=wpb.AppendFrameRequest(lease=stale, frame_type="t", payload=b"x")
        )

    await expect_error(
        api.worker.AppendFrames(stale_frames(), metadata=api.metadata),
        C.FAILED_PRECONDITION,
        "stale_owner_cannot_append",
    )


async def test_append_frames_many_per_message(api: Api) -> None:
    """`frames` ride on `frame`'s fence: one message appends all of its frames or none
    (docs/streams.md#appending); one-frame messages mix with them in order."""
    lease = await started(api)
    more = wpb.AppendFramesRequest.Frame

    def message(first: bytes, rest: list[Any]) -> wpb.AppendFramesRequest:
        return wpb.AppendFramesRequest(
            frame=wpb.AppendFrameRequest(lease=lease, frame_type="token", payload=first),
            frames=rest,
        )

    async def messages(*ms: wpb.AppendFramesRequest) -> AsyncIterator[wpb.AppendFramesRequest]:
        for m in ms:
            yield m

    rest = [more(frame_type="token", payload=str(i).encode()) for i in range(1, 5)]
    rest[1].correlation_id, rest[2].frame_type = "c-2", "log"
    reply = await api.worker.AppendFrames(
        messages(message(b"0", rest), message(b"5", [])), metadata=api.metadata
    )
    assert (reply.appended_count, reply.frame_count) == (6, 6)
    got = (await read(api, lease.execution_id, count_limit=100)).frames
    assert [f.payload for f in got] == [str(i).encode() for i in range(6)]
    assert [f.frame_type for f in got][2:4] == ["token", "log"]
    assert got[2].correlation_id == "c-2"
    assert reply.last_entry_id == got[-1].id
    # a bad frame anywhere in a message: none of that message lands
    bad = [more(frame_type="token", payload=b"a"), more(frame_type="", payload=b"b")]
    info = await expect_error(
        api.worker.AppendFrames(
            messages(message(b"6", []), message(b"7", bad)), metadata=api.metadata
        ),
        C.INVALID_ARGUMENT,
        "invalid_frame_type",
    )
    assert info.metadata["appended_count"] == "1"
    assert len((await read(api, lease.execution_id, count_limit=100)).frames) == 7
    await expect_error(
        api.worker.AppendFrames(
            messages(message(b"8", [more(frame_type="t", payload=b"x" * 70_000)])),
            metadata=api.metadata,
        ),
        C.RESOURCE_EXHAUSTED,
        "retention_limit_exceeded",
    )
    await expect_error(
        api.worker.AppendFrames(
            messages(message(b"9", [more(frame_type="t")] * 1001)), metadata=api.metadata
        ),
        C.INVALID_ARGUMENT,
        "invalid_input",
    )
    stale = with_epoch(lease, lease.lease_epoch + 1)
    stale_message = wpb.AppendFramesRequest(
        frame=wpb.AppendFrameRequest(lease=stale, frame_type="t", payload=b"x"), frames=rest
    )
    await expect_error(
        api.worker.AppendFrames(messages(stale_message), metadata=api.metadata),
        C.FAILED_PRECONDITION,
        "stale_owner_cannot_append",
    )
    assert len((await read(api, lease.execution_id, count_limit=100)).frames) == 7


# -- tails --------------------------------------------------------------------------------------


async def test_live_tail_then_close_markers(api: Api) -> None:
    lease = await started(api)
    call = tail(api, lease.execution_id)
    got: list[t.StreamFrame] = []
    for i in range(3):
        await append(api, lease, str(i).encode())
        msg = await asyncio.wait_for(call.read(), 5)
        got += msg.frames
        while len(got) < i + 1:
            got += (await asyncio.wait_for(call.read(), 5)).frames
    assert [f.payload for f in got] == [b"0", b"1", b"2"]
    # frames appended just before the close all arrive before the final message
    for i in range(3, 8):
        await append(api, lease, str(i).encode())
    started_at = time.monotonic()
    await complete(api, lease)
    rest = await asyncio.wait_for(collect(call), 5)
    assert time.monotonic() - started_at < 1.5, "the close event ends the wait, not the slice"
    assert [f.payload for f in frames_of(rest)] == [str(i).encode() for i in range(3, 8)]
    assert rest[-1].closed_reason == "attempt_success" and not rest[-1].frames
    assert rest[-1].closed_at > 0
    assert await call.code() == C.OK


async def test_tail_of_silent_attempt_ends(api: Api) -> None:
    """W7: no frame was ever appended, so no meta and no marker: the tail checks the attempt."""
    lease = await started(api)
    call = tail(api, lease.execution_id)
    await asyncio.sleep(0.3)
    started_at = time.monotonic()
    await complete(api, lease)
    msgs = await asyncio.wait_for(collect(call), 5)
    assert time.monotonic() - started_at < 1.5
    assert [(m.closed_reason, len(m.frames)) for m in msgs] == [("attempt_success", 0)]
    # already-ended silent attempts (failure, retry) end at once too
    lease2 = await started(api, "w-2")
    await fail(api, lease2, category="permanent")
    msgs = await asyncio.wait_for(collect(tail(api, lease2.execution_id)), 5)
    assert msgs[-1].closed_reason == "attempt_failure"


async def test_follow_false_and_idle_timeout(api: Api) -> None:
    lease = await started(api)
    for i in range(5):
        await append(api, lease, str(i).encode())
    msgs = await collect(tail(api, lease.execution_id, follow=False, batch=2))
    assert [f.payload for f in frames_of(msgs)] == [str(i).encode() for i in range(5)]
    assert max(len(m.frames) for m in msgs) == 2
    assert not any(m.HasField("closed_at") for m in msgs)
    last = frames_of(msgs)[-1].id
    t0 = time.monotonic()
    idle = await collect(tail(api, lease.execution_id, after=last, idle_timeout_ms=300))
    assert idle == [] and 0.25 < time.monotonic() - t0 < 3


async def test_resume_after_disconnect_exactly_once(api: Api) -> None:
    lease = await started(api)
    for i in range(10):
        await append(api, lease, str(i).encode())
    call = tail(api, lease.execution_id, batch=1)
    seen = []
    while len(seen) < 4:
        seen += (await asyncio.wait_for(call.read(), 5)).frames
    call.cancel()
    k = seen[3]
    for i in range(10, 15):
        await append(api, lease, str(i).encode())
    await complete(api, lease)
    rest = frames_of(await asyncio.wait_for(collect(tail(api, lease.execution_id, after=k.id)), 5))
    assert [f.payload for f in rest] == [str(i).encode() for i in range(4, 15)]
    assert len({f.id for f in rest}) == len(rest)


async def test_tail_unknown_execution(api: Api) -> None:
    eid = (await started(api)).execution_id
    other = eid[: eid.index("}") + 2] + "00000000-0000-4000-8000-000000000000"
    await expect_error(collect(tail(api, other)), C.NOT_FOUND, "execution_not_found")


async def test_tail_of_an_attempt_a_terminal_execution_never_had(api: Api) -> None:
    """Attempt 1 of a one-attempt execution that ended is NOT_FOUND, not a made-up close."""
    lease = await started(api)
    await complete(api, lease)
    await expect_error(collect(tail(api, lease.execution_id, 1)), C.NOT_FOUND, "attempt_not_found")
    assert (await collect(tail(api, lease.execution_id, 0)))[-1].closed_reason == "attempt_success"
    # cancelled before any claim: attempt 0 closes with the outcome, attempt 1 never existed
    eid = await create(api)
    await api.execution.CancelExecution(
        pb.CancelExecutionRequest(execution_id=eid, reason="operator"), metadata=api.metadata
    )
    assert (await collect(tail(api, eid, 0)))[-1].closed_reason == "attempt_cancelled"
    await expect_error(collect(tail(api, eid, 1)), C.NOT_FOUND, "attempt_not_found")
    # while the execution can still retry, a later attempt is waited for, not refused
    live = await started(api, "w-2")
    assert await collect(tail(api, live.execution_id, 3, follow=False)) == []


async def test_twenty_concurrent_tails_progress_with_a_slow_writer(api: Api) -> None:
    leases = [await started(api, f"w-{i}") for i in range(20)]
    calls = [tail(api, lease.execution_id) for lease in leases]
    received: dict[int, list[bytes]] = {i: [] for i in range(20)}

    fast_arrived = asyncio.Event()

    async def reader(i: int) -> None:
        while (msg := await calls[i].read()) is not grpc.aio.EOF:
            received[i] += [f.payload for f in msg.frames]
            if all(len(received[j]) >= 3 for j in range(1, 20)):
                fast_arrived.set()

    readers = [asyncio.create_task(reader(i)) for i in range(20)]

    async def slow() -> None:  # execution 0 appends one frame every 300 ms
        for j in range(6):
            await append(api, leases[0], f"slow{j}".encode())
            await asyncio.sleep(0.3)

    slow_task = asyncio.create_task(slow())
    t0 = time.monotonic()
    for r in range(3):
        for i in range(1, 20):
            await append(api, leases[i], f"{i}-{r}".encode())

    await asyncio.wait_for(fast_arrived.wait(), 5)
    assert time.monotonic() - t0 < 3, "tails must not queue behind each other"
    assert not slow_task.done(), "the fast tails progressed while the slow writer was writing"
    await slow_task
    for lease in leases:
        await complete(api, lease)
    await asyncio.wait_for(asyncio.gather(*readers), 10)
    assert received[0] == [f"slow{j}".encode() for j in range(6)]
    for i in range(1, 20):
        assert received[i] == [f"{i}-{r}".encode() for r in range(3)]


# -- the stream-op cap and shutdown (a server of their own) ------------------------------------


@pytest.fixture
async def small_api(valkey_url: str, store: Store) -> AsyncIterator[Api]:
    config = Config(
        valkey_url=valkey_url,
        listen_addr="127.0.0.1:0",
        api_token=API_TOKEN,
        waitpoint_hmac_secret=HMAC_SECRET,
        shutdown_grace_s=1.0,
        boot_retry_s=5.0,
        max_concurrent_stream_ops=2,
    )
    server = FlowFabricServer(config, run_scanners=False)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    yield Api(channel, store, server)
    await channel.close()
    await server.stop()


async def test_cap_rejects_at_once_and_cancel_frees_the_slot(small_api: Api) -> None:
    api = small_api
    lease = await started(api)
    eid = lease.execution_id
    await append(api, lease)
    first, second = tail(api, eid), tail(api, eid)
    for call in (first, second):
        assert len((await asyncio.wait_for(call.read(), 5)).frames) == 1
    t0 = time.monotonic()
    info = await expect_error(collect(tail(api, eid)), C.RESOURCE_EXHAUSTED, "concurrency_limit")
    assert time.monotonic() - t0 < 1, "never queued"
    assert (info.metadata["pool"], info.metadata["max"]) == ("stream_ops", "2")
    await expect_error(read(api, eid), C.RESOURCE_EXHAUSTED, "concurrency_limit")
    first.cancel()
    deadline = time.monotonic() + 2
    while True:  # the server learns of the cancel asynchronously, but promptly
        try:
            assert len((await read(api, eid)).frames) == 1
            break
        except grpc.aio.AioRpcError as exc:
            assert error_info(exc).reason == "concurrency_limit"
            assert time.monotonic() < deadline, "a cancelled tail must free its slot"
            await asyncio.sleep(0.05)
    third = tail(api, eid)
    assert len((await asyncio.wait_for(third.read(), 5)).frames) == 1
    await complete(api, lease)
    for call in (second, third):
        msgs = await asyncio.wait_for(collect(call), 5)
        assert msgs[-1].closed_reason == "attempt_success"


async def test_shutdown_ends_tails_unavailable(small_api: Api) -> None:
    api = small_api
    lease = await started(api)
    await append(api, lease)
    call = tail(api, lease.execution_id)
    assert len((await asyncio.wait_for(call.read(), 5)).frames) == 1
    stop = asyncio.create_task(api.server.stop())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(collect(call), 5)
    assert caught.value.code() == C.UNAVAILABLE
    assert error_info(caught.value).reason == "shutting_down"
    await stop
