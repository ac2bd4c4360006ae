"""The client's StreamService part: an attempt's output frames, read by page or tailed live."""

from __future__ import annotations

from collections.abc import AsyncGenerator

from flowfabric._transport import Connected
from flowfabric.v1 import stream_pb2, types_pb2


class StreamsMixin(Connected):
    """Reading an attempt's output stream (StreamService)."""

    async def read_stream(
        self,
        execution_id: str,
        attempt_index: int = 0,
        *,
        start: str = "start",
        end: str = "end",
        limit: int = 100,
    ) -> types_pb2.StreamFrames:
        """One page of an attempt's output frames in [start, end] (both inclusive), plus the close
        markers (`closed_at`/`closed_reason`, absent while open). Cursors: `start`, `end`,
        `<ms>` or `<ms>-<seq>`; `limit` 1..1000. To continue after frame `<ms>-<seq>`, pass
        `start=f"{ms}-{seq + 1}"`."""
        request = stream_pb2.ReadAttemptStreamRequest(
            execution_id=execution_id,
            attempt_index=attempt_index,
            from_id=start,
            to_id=end,
            count_limit=limit,
        )
        reply = await self._transport.unary(self._transport.streams.ReadAttemptStream, request)
        return reply.frames

    async def tail(
        self,
        execution_id: str,
        attempt_index: int = 0,
        *,
        after: str = "0-0",
        follow: bool = True,
        idle_timeout_ms: int | None = None,
        batch: int | None = None,
    ) -> AsyncGenerator[types_pb2.StreamFrame, None]:
        """The attempt's frames strictly after `after`, in order, each once, as they are appended.

        Ends when the stream is closed and drained, after `idle_timeout_ms` without a frame, or
        (with `follow=False`) once what is available was read. A broken stream (UNAVAILABLE,
        e.g. a server restart) is resumed from the last frame received, so no frame is lost or
        repeated.
        """
        async for message in self._tail_messages(
            execution_id, attempt_index, after=after, follow=follow,
            idle_timeout_ms=idle_timeout_ms, batch=batch,
        ):  # fmt: skip
            for frame in message.frames:
                yield frame

    async def _tail_messages(
        self,
        execution_id: str,
        attempt_index: int = 0,
        *,
        after: str = "0-0",
        follow: bool = True,
        idle_timeout_ms: int | None = None,
        batch: int | None = None,
    ) -> AsyncGenerator[stream_pb2.TailAttemptStreamResponse, None]:
        """TailAttemptStream messages (frames and, last, the close markers), resuming on
        UNAVAILABLE from the last frame id seen."""
        cursor = after

        def request() -> stream_pb2.TailAttemptStreamRequest:
            req = stream_pb2.TailAttemptStreamRequest(
                execution_id=execution_id, attempt_index=attempt_index, after=cursor,
                follow=follow,
            )  # fmt: skip
            if idle_timeout_ms is not None:
                req.idle_timeout_ms = idle_timeout_ms
            if batch is not None:
                req.batch = batch
            return req

        stream = self._transport.server_stream(self._transport.streams.TailAttemptStream, request)
        async for message in stream:
            if message.frames:
                cursor = message.frames[-1].id
            yield message
