"""StreamService: range reads and live tails of attempt output streams (docs/streams.md#reading,
docs/streams.md#tails, docs/streams.md#concurrency-cap,
docs/architecture.md#events-and-watches).

Every call takes one slot of the server-wide stream-op cap (`FF_MAX_CONCURRENT_STREAM_OPS`) at
once or fails with RESOURCE_EXHAUSTED `concurrency_limit`; a tail holds its slot for its whole
life and releases it on every exit (done, error, client cancel, deadline).

A live tail issues its own `XREAD BLOCK` (≤ 2 s slices) on the dedicated stream connection pool,
so tails never queue behind each other or block the command connections. Closing functions write
the meta hash and publish on the partition's event channel in the same atomic call; the tail
listens there and re-checks at once on any event of its execution, so the 2 s slice is only a
backstop. Attempts that never appended have no meta hash and hence no close marker: the tail
then reads the attempt hash (or, without one, the execution core) and ends with a marker derived
from its terminal state.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from flowfabric.server.api.limits import bounds
from flowfabric.server.api.servicers.base import ServerContext
from flowfabric.server.api.streams import StreamSlots, chunks, lower_cursor, to_frame
from flowfabric.server.engine.events import EventHub
from flowfabric.server.valkey.codec import text
from flowfabric.server.valkey.errors import FlowFabricError, InvalidInput
from flowfabric.server.valkey.ids import ExecutionId
from flowfabric.server.valkey.keys import ExecKeys, PartitionKeys
from flowfabric.server.valkey.store import Store, is_transport_error
from flowfabric.v1 import stream_pb2 as pb
from flowfabric.v1 import stream_pb2_grpc as rpc
from flowfabric.v1 import types_pb2 as t

READ_LIMIT_DEFAULT = 100
READ_LIMIT_MAX = bounds.PAGE.hi
TAIL_BATCH_DEFAULT = 50
TAIL_BATCH_MAX = bounds.PAGE.hi
IDLE_TIMEOUT_MAX_MS = bounds.IDLE_TIMEOUT_MS.hi
SLICE_MS = 2000
# Payload bytes per message: a page/message is cut early (always a prefix, at least one frame) so
# it stays under gRPC clients' default 4 MiB receive limit.
MESSAGE_BYTE_BUDGET = 3 << 20
SUBSCRIBE_WAIT_S = 2.0

# W7: the close marker of an attempt that never appended, from its terminal state.
ATTEMPT_REASON = {
    "ended_success": "attempt_success",
    "ended_failure": "attempt_failure",
    "ended_cancelled": "attempt_cancelled",
    "interrupted_reclaimed": "reclaimed",
}
OUTCOME_REASON = {
    "success": "attempt_success",
    "failed": "attempt_failure",
    "cancelled": "attempt_cancelled",
    "expired": "expired",
    "skipped": "dependency_impossible",
}

Closed = tuple[int, str]


class StreamServicer(rpc.StreamServiceServicer):
    def __init__(
        self, ctx: ServerContext, hub: EventHub | None, reader: Store, slots: StreamSlots
    ) -> None:
        self.ctx = ctx
        self.hub = hub
        self.reader = reader  # the dedicated stream connection pool (blocking reads)
        self.slots = slots
        self.fn = ctx.functions.stream
        self.stopping = asyncio.Event()

    def shutdown(self) -> None:
        """Stop granting slots; live tails end after their current poll with `shutting_down`."""
        self.slots.closing = True
        self.stopping.set()

    # -- ReadAttemptStream --------------------------------------------------------------------

    async def ReadAttemptStream(
        self, request: pb.ReadAttemptStreamRequest, context: Any
    ) -> pb.ReadAttemptStreamResponse:
        eid = self.ctx.execution_id(request.execution_id)
        from_id = lower_cursor(request.from_id, "from_id") if request.HasField("from_id") else "-"
        to_id = lower_cursor(request.to_id, "to_id") if request.HasField("to_id") else "+"
        limit = request.count_limit if request.HasField("count_limit") else READ_LIMIT_DEFAULT
        if not 1 <= limit <= READ_LIMIT_MAX:
            raise InvalidInput(
                "count_limit",
                f"count_limit must be 1..{READ_LIMIT_MAX}; paginate from the last id + 1",
            )
        with self.slots.take():
            reply = await self.fn.read_attempt_stream(
                eid, request.attempt_index, from_id, to_id, limit
            )
        frames = [to_frame(e) for e in reply.entries]
        page = next(chunks(frames, MESSAGE_BYTE_BUDGET), [])
        out = t.StreamFrames(frames=page)
        if reply.closed_at is not None:
            out.closed_at = reply.closed_at
            out.closed_reason = reply.closed_reason
        return pb.ReadAttemptStreamResponse(frames=out)

    # -- TailAttemptStream --------------------------------------------------------------------

    async def TailAttemptStream(
        self, request: pb.TailAttemptStreamRequest, context: Any
    ) -> AsyncIterator[pb.TailAttemptStreamResponse]:
        eid = self.ctx.execution_id(request.execution_id)
        cursor = (
            lower_cursor(request.after, "after", concrete_only=True)
            if request.HasField("after")
            else "0-0"
        )
        batch = request.batch if request.HasField("batch") else TAIL_BATCH_DEFAULT
        if not 1 <= batch <= TAIL_BATCH_MAX:
            raise InvalidInput("batch", f"batch must be 1..{TAIL_BATCH_MAX}")
        follow = request.follow if request.HasField("follow") else True
        idle_ms = request.idle_timeout_ms if request.HasField("idle_timeout_ms") else None
        if idle_ms is not None and idle_ms > IDLE_TIMEOUT_MAX_MS:
            raise InvalidInput(
                "idle_timeout_ms", f"idle_timeout_ms must be at most {IDLE_TIMEOUT_MAX_MS}"
            )
        with self.slots.take():
            await self._check_attempt(eid, request.attempt_index)
            async for message in self._tail(eid, request.attempt_index, cursor, batch, follow,
                                            idle_ms):  # fmt: skip
                yield message

    async def _check_attempt(self, eid: ExecutionId, idx: int) -> None:
        """Refuse a tail that could only end with a made-up close: the execution must exist, and
        once it is terminal the attempt must be one it had (docs/streams.md#tails). Attempt 0 of
        an execution that ended before any attempt is still tailed (it closes with the outcome).
        """
        phase, current = await self._call(
            "HMGET", ExecKeys(eid).core, "lifecycle_phase", "current_attempt_index"
        )
        if phase is None:
            raise FlowFabricError("execution_not_found")
        last = int(text(current)) if text(current) else None
        if text(phase) == "terminal" and idx > (last if last is not None else 0):
            had = f"attempts 0..{last}" if last is not None else "no attempts"
            raise FlowFabricError(
                "attempt_not_found",
                message=f"execution {eid} ended with {had}; attempt {idx} never ran",
            )

    async def _tail(
        self, eid: ExecutionId, idx: int, cursor: str, batch: int, follow: bool,
        idle_ms: int | None,
    ) -> AsyncIterator[pb.TailAttemptStreamResponse]:  # fmt: skip
        k = ExecKeys(eid)
        key = k.stream(idx)
        wake = asyncio.Event()
        channel = PartitionKeys(eid.tag).exec_events

        def on_event(event: dict[str, Any]) -> None:
            if event.get("type") == "resync" or event.get("execution_id") == str(eid):
                wake.set()

        async with contextlib.AsyncExitStack() as stack:
            if follow and self.hub is not None:
                await stack.enter_async_context(self.hub.listen(channel, on_event))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(SUBSCRIBE_WAIT_S):
                        await self.hub.wait_subscribed(channel)
            last_frame = time.monotonic()
            while True:
                if self.stopping.is_set():
                    raise _shutting_down()
                wake.clear()  # an event from here on cuts the next blocking wait short
                async for message in self._drain(key, cursor, batch):
                    cursor = message.frames[-1].id
                    last_frame = time.monotonic()
                    yield message
                closed = await self._closed(eid, idx)
                if closed is not None:
                    # frames appended after our last read but before the close: drain them
                    async for message in self._drain(key, cursor, batch):
                        cursor = message.frames[-1].id
                        yield message
                    yield pb.TailAttemptStreamResponse(closed_at=closed[0], closed_reason=closed[1])
                    return
                block = _block_ms(idle_ms, last_frame)
                if not follow or block <= 0:
                    return
                for message in _messages(await self._wait(key, cursor, batch, block, wake)):
                    cursor = message.frames[-1].id
                    last_frame = time.monotonic()
                    yield message

    async def _drain(
        self, key: str, cursor: str, batch: int
    ) -> AsyncIterator[pb.TailAttemptStreamResponse]:
        """Non-blocking reads after `cursor` until nothing is left (each message non-empty)."""
        while entries := await self._xread(key, cursor, batch, None):
            cursor = text(entries[-1][0])
            for message in _messages(entries):
                yield message

    async def _wait(
        self, key: str, cursor: str, batch: int, block_ms: int, wake: asyncio.Event
    ) -> list[Any]:
        """One blocking read, cut short by an event of the execution or by shutdown."""
        if wake.is_set() or self.stopping.is_set():
            return []
        read = asyncio.ensure_future(self._xread(key, cursor, batch, block_ms))
        waker = asyncio.ensure_future(wake.wait())
        stopper = asyncio.ensure_future(self.stopping.wait())
        try:
            await asyncio.wait({read, waker, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waker.cancel()
            stopper.cancel()
            if not read.done():
                # redis-py drops the connection of a cancelled blocking read. The cancellation
                # may take effect late (e.g. mid-connect), so it is not awaited: the tail moves
                # on at once and re-reads from its cursor (nothing is consumed by XREAD).
                read.cancel()
                read.add_done_callback(_discard)
        if read.done() and not read.cancelled():
            return read.result()
        return []

    async def _closed(self, eid: ExecutionId, idx: int) -> Closed | None:
        """The close markers, or None while open (docs/streams.md#tails)."""
        k = ExecKeys(eid)
        closed_at, reason = await self._call("HMGET", k.stream_meta(idx), "closed_at",
                                             "closed_reason")  # fmt: skip
        if closed_at is not None or reason is not None:  # the meta hash exists
            return (int(closed_at), text(reason)) if text(closed_at) else None
        # W7: no meta = the attempt never appended; its own state says whether it ended.
        state, ended_at = await self._call("HMGET", k.attempt(idx), "attempt_state", "ended_at")
        phase, outcome, completed_at, current = await self._call(
            "HMGET", k.core, "lifecycle_phase", "terminal_outcome", "completed_at",
            "current_attempt_index",
        )  # fmt: skip
        if state is not None:
            why = ATTEMPT_REASON.get(text(state))
            if why is None:
                return None
            if (why == "attempt_failure" and text(outcome) == "expired"
                    and text(current) == str(idx)):  # fmt: skip
                why = "expired"  # expiry ends the attempt as a failure but closes `expired`
            return (int(text(ended_at) or 0), why)
        if text(phase) == "terminal":
            return (int(text(completed_at) or 0), OUTCOME_REASON.get(text(outcome), text(outcome)))
        return None

    # -- Valkey access on the stream pool -----------------------------------------------------

    async def _call(self, *args: Any) -> Any:
        return await self.reader.call(*args)

    async def _xread(self, key: str, cursor: str, count: int, block_ms: int | None) -> list[Any]:
        """Entries strictly after `cursor` (`[id, fields]` each); never `BLOCK 0`."""
        args: list[Any] = ["XREAD", "COUNT", str(count)]
        if block_ms is not None:
            args += ["BLOCK", str(max(1, block_ms))]
        args += ["STREAMS", key, cursor]
        client = self.reader.client
        kwargs = (
            {"target_nodes": self.reader.cluster_client.get_node_from_key(key)}
            if self.reader.cluster
            else {}
        )
        try:
            raw = await client.execute_command(*args, **kwargs)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if is_transport_error(exc):
                raise FlowFabricError(
                    "backend_unavailable", message=f"Valkey is unavailable: {exc}",
                    retry_after_ms=1000,
                ) from exc  # fmt: skip
            raise FlowFabricError("backend_error", message=f"Valkey error: {exc}") from exc
        if not raw:
            return []
        if isinstance(raw, dict):  # RESP3 shape
            return list(next(iter(raw.values()), []) or [])
        return list(raw[0][1] or [])


def _block_ms(idle_ms: int | None, last_frame: float) -> int:
    """The next blocking slice: ≤ 2 s, and no longer than the idle time left (≤ 0 = idle)."""
    if idle_ms is None:
        return SLICE_MS
    return min(SLICE_MS, idle_ms - int((time.monotonic() - last_frame) * 1000))


def _discard(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved, so asyncio does not log it


def _messages(entries: list[Any]) -> list[pb.TailAttemptStreamResponse]:
    frames = [to_frame(e) for e in entries]
    return [pb.TailAttemptStreamResponse(frames=run) for run in chunks(frames, MESSAGE_BYTE_BUDGET)]


def _shutting_down() -> FlowFabricError:
    return FlowFabricError(
        "shutting_down", message="the server is shutting down; resume elsewhere",
        retry_after_ms=1000,
    )  # fmt: skip
