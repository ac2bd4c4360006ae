"""What a handler sees of its task: inputs, progress, and whether it still holds the lease."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterable, Iterable
from typing import Any

from flowfabric._client import Client, Payload, encode_payload
from flowfabric._errors import LEASE_LOST_REASONS, FlowFabricError
from flowfabric.v1 import types_pb2, worker_pb2

log = logging.getLogger("flowfabric.worker")

#: Consecutive non-terminal renewal failures after which the lease counts as unhealthy.
UNHEALTHY_AFTER = 3

#: Client-side batching of `emit`: a batch is sent (one AppendFrames call) when it holds this
#: many frames or payload bytes, or this long after its first frame, and always before the
#: worker's terminal call.
EMIT_BATCH_FRAMES = 256
EMIT_BATCH_BYTES = 512 * 1024
EMIT_LINGER_S = 0.05


def attempt_type_name(value: int) -> str:
    """`initial`, `retry`, `reclaim`, `replay` (the engine's stored names)."""
    name = types_pb2.AttemptType.Name(value)  # type: ignore[arg-type]
    return name.removeprefix("ATTEMPT_TYPE_").lower()


class TaskContext:
    """One claimed execution, as handed to a handler.

    The worker renews the lease every `lease_ttl / 3` while the handler runs. If the lease is
    lost (operator cancel or revoke, expiry, a competing owner) `lease_lost` is set, its reason
    is in `lease_lost_reason`, and the handler task is cancelled: it sees `CancelledError` at
    its next `await`. Check `lease_lost` before irreversible side effects.
    """

    def __init__(self, task: types_pb2.ClaimedTask, client: Client) -> None:
        self._task = task
        self._client = client
        self.lease_lost = asyncio.Event()
        self.lease_lost_reason: str | None = None
        self._renew_failures = 0
        self._handler: asyncio.Task[Any] | None = None
        self._shutdown_cancel = False
        self._frames: list[worker_pb2.AppendFrameRequest] = []
        self._frame_bytes = 0
        self._flush_lock = asyncio.Lock()
        self._linger: asyncio.Task[None] | None = None
        self._emit_error: FlowFabricError | None = None
        self.frames_appended = 0

    # -- inputs -----------------------------------------------------------------------------------

    @property
    def execution_id(self) -> str:
        return self._task.lease.execution_id

    @property
    def attempt_index(self) -> int:
        return self._task.lease.attempt_index

    @property
    def attempt_id(self) -> str:
        return self._task.lease.attempt_id

    @property
    def attempt_type(self) -> str:
        """Why this attempt exists: `initial`, `retry`, `reclaim` or `replay`."""
        return attempt_type_name(self._task.attempt_type)

    @property
    def resumed(self) -> bool:
        """True when this claim resumed a paused attempt (same attempt index, new lease)."""
        return self._task.resumed

    @property
    def kind(self) -> str:
        return self._task.execution_kind

    @property
    def lane(self) -> str:
        return self._task.lease.lane_id

    @property
    def namespace(self) -> str:
        return self._task.namespace

    @property
    def priority(self) -> int:
        return self._task.priority

    @property
    def tags(self) -> dict[str, str]:
        return dict(self._task.tags)

    @property
    def payload(self) -> bytes:
        """The input payload, verbatim."""
        return self._task.payload

    @property
    def payload_encoding(self) -> str:
        return self._task.payload_encoding

    @property
    def lease(self) -> types_pb2.LeaseHandle:
        """The lease handle (a copy) for calls the SDK does not wrap."""
        handle = types_pb2.LeaseHandle()
        handle.CopyFrom(self._task.lease)
        return handle

    def json(self) -> Any:
        """The payload decoded as JSON (None for an empty payload)."""
        return json.loads(self._task.payload) if self._task.payload else None

    # -- state --------------------------------------------------------------------------------

    @property
    def cancelled(self) -> bool:
        """True once the handler must stop: the lease was lost or the worker is shutting down."""
        return self.lease_lost.is_set() or self._shutdown_cancel

    @property
    def is_lease_healthy(self) -> bool:
        """False once the lease is lost or after 3 consecutive failed renewals."""
        return not self.lease_lost.is_set() and self._renew_failures < UNHEALTHY_AFTER

    # -- calls --------------------------------------------------------------------------------

    async def progress(self, pct: int | None = None, message: str | None = None) -> None:
        """Record progress (0..100 and/or a message) on the execution.

        Raises:
            StaleLease, ExecutionNotActive: The lease is lost (`lease_lost` is set as well).
        """
        request = worker_pb2.UpdateProgressRequest(lease=self._task.lease)
        if pct is not None:
            request.progress_pct = pct
        if message is not None:
            request.progress_message = message
        try:
            await self._client._call(self._client._workers.UpdateProgress, request)
        except FlowFabricError as exc:
            if exc.reason in LEASE_LOST_REASONS:
                self._lose(exc.reason)
            raise

    async def emit(
        self,
        frame_type: str,
        payload: Payload = b"",
        *,
        encoding: str | None = None,
        correlation_id: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        """Append one frame to this attempt's output stream (readers: `Client.tail`).

        Frames are batched client-side and sent in order with one AppendFrames call per batch
        (each frame is still fenced by the lease); `flush()` sends at once, and the worker
        flushes before it completes or fails the task. bytes are sent verbatim (encoding
        `binary`), str as UTF-8 (`utf8`), mappings and lists as JSON (`json`); `encoding`
        overrides the label. Payloads are at most 65 536 bytes.

        Raises:
            FlowFabricError: A previous batch was refused (e.g. `stale_owner_cannot_append`
                after the lease was lost, or `stream_closed`).
        """
        self._raise_emit_error()
        data, default_encoding = encode_payload(payload)
        request = worker_pb2.AppendFrameRequest(
            lease=self._task.lease, frame_type=frame_type, payload=data or b""
        )
        request.encoding = encoding or default_encoding or "binary"
        if correlation_id:
            request.correlation_id = correlation_id
        if metadata:
            request.metadata_json = json.dumps(metadata, separators=(",", ":"))
        self._frames.append(request)
        self._frame_bytes += len(request.payload)
        if len(self._frames) >= EMIT_BATCH_FRAMES or self._frame_bytes >= EMIT_BATCH_BYTES:
            await self.flush()
        elif self._linger is None or self._linger.done():
            self._linger = asyncio.create_task(self._flush_later())

    async def stream(
        self, chunks: AsyncIterable[Payload] | Iterable[Payload], frame_type: str = "token"
    ) -> int:
        """Emit every chunk of `chunks` (e.g. model tokens) as one frame each; returns how
        many were emitted. Batching as `emit`."""
        n = 0
        if isinstance(chunks, AsyncIterable):
            async for chunk in chunks:
                await self.emit(frame_type, chunk)
                n += 1
        else:
            for chunk in chunks:
                await self.emit(frame_type, chunk)
                n += 1
        return n

    async def flush(self) -> None:
        """Send the frames emitted so far (one AppendFrames call) and wait for the answer."""
        async with self._flush_lock:
            frames, self._frames, self._frame_bytes = self._frames, [], 0
            if frames:
                await self._send(frames)
        self._raise_emit_error()

    async def _send(self, frames: list[worker_pb2.AppendFrameRequest]) -> None:
        async def requests() -> Any:
            for frame in frames:
                yield worker_pb2.AppendFramesRequest(frame=frame)

        try:
            # not retried: a retry after a lost reply would duplicate frames
            reply = await self._client._call(
                self._client._workers.AppendFrames, requests(), retry=False
            )
        except FlowFabricError as exc:
            if exc.reason in LEASE_LOST_REASONS or exc.reason == "stale_owner_cannot_append":
                self._lose(exc.reason)
            self._emit_error = exc
            return
        self.frames_appended += reply.appended_count

    async def _flush_later(self) -> None:
        await asyncio.sleep(EMIT_LINGER_S)
        async with self._flush_lock:
            frames, self._frames, self._frame_bytes = self._frames, [], 0
            if frames:
                await self._send(frames)

    def _raise_emit_error(self) -> None:
        if self._emit_error is not None:
            error, self._emit_error = self._emit_error, None
            raise error

    async def _flush_for_terminal(self) -> None:
        """Before the terminal call: send what is buffered (errors are logged, not raised)."""
        try:
            await self.flush()
        except FlowFabricError as exc:
            log.warning("frames of %s not appended: %r", self.execution_id, exc)
        if self._linger is not None and not self._linger.done():
            self._linger.cancel()  # nothing left for it: flush() took the buffer under the lock

    # -- driven by the worker -----------------------------------------------------------------

    def _lose(self, reason: str) -> None:
        if self.lease_lost.is_set():
            return
        self.lease_lost_reason = reason
        self.lease_lost.set()
        log.warning("lease lost on %s (%s): cancelling its handler", self.execution_id, reason)
        if self._handler is not None and not self._handler.done():
            self._handler.cancel(f"lease lost: {reason}")

    def _cancel_for_shutdown(self) -> None:
        self._shutdown_cancel = True
        if self._handler is not None and not self._handler.done():
            self._handler.cancel("worker shutting down")

    async def _renew_forever(self) -> None:
        """Renew every ttl/3 (first tick skipped) until cancelled or the lease is lost."""
        ttl_ms = self._task.lease.lease_ttl_ms or 30_000
        interval = max(ttl_ms / 3, 1) / 1000
        request = worker_pb2.RenewLeaseRequest(lease=self._task.lease, lease_ttl_ms=ttl_ms)
        while True:
            await asyncio.sleep(interval)
            try:
                await self._client._call(
                    self._client._workers.RenewLease,
                    request,
                    deadline=min(self._client.default_timeout, max(interval, 0.5)),
                    retry=False,
                )
            except FlowFabricError as exc:
                if exc.reason in LEASE_LOST_REASONS:
                    self._lose(exc.reason)
                    return
                self._renew_failures += 1
                log.warning(
                    "renewal of %s failed (%d in a row): %r",
                    self.execution_id,
                    self._renew_failures,
                    exc,
                )
            else:
                self._renew_failures = 0
