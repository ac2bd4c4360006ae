"""A claimed execution while its handler runs: what `TaskContext` is the public face of.

`RunningTask` holds the lease handle and everything done under it: the renewal loop, the
output frames buffered into AppendFrames calls, the lease-scoped calls (progress, pending
waitpoints, Suspend) and the bookkeeping of a lost lease, a shutdown or a suspension. The
worker drives it; the handler sees it through its `TaskContext`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import grpc

from flowfabric._client import Client, Payload, encode_payload
from flowfabric._errors import LEASE_LOST_REASONS, AlreadyExists, FlowFabricError, TaskSuspended
from flowfabric._retry import Backoff
from flowfabric._signals import TIMEOUT_BEHAVIORS, Duration, ResumeCondition, Signal, duration_ms
from flowfabric._transport import transport_of
from flowfabric.v1 import stream_pb2, types_pb2, worker_pb2

log = logging.getLogger("flowfabric.worker")

T = TypeVar("T")

#: Consecutive non-terminal renewal failures after which the lease counts as unhealthy.
UNHEALTHY_AFTER = 3

#: Client-side batching of `emit`: a batch is sent (one AppendFrames call) when it holds this
#: many frames or payload bytes, or this long after its first frame, and always before the
#: worker's terminal call. While one batch is at the server (or retried through an outage)
#: the next fills up to the same bounds; then `emit` waits, so at most two batches are held.
EMIT_BATCH_FRAMES = 256
EMIT_BATCH_BYTES = 512 * 1024
EMIT_LINGER_S = 0.05
#: `progress` and frame sends retry these codes for as long as the lease may still be held
#: (a server restart, a failover): a short outage must not kill a running handler.
OUTAGE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
OUTAGE_BACKOFF = Backoff(initial_s=0.05, max_s=1.0, max_attempts=1 << 30)
#: The lease is assumed to end this much before the worker's own estimate (the claim reply
#: arrives a round trip after the server started the lease).
LEASE_MARGIN_S = 0.5
#: Suspend keeps retrying UNAVAILABLE about as long as a terminal call (same suspension id, so
#: the server reconciles a retry whose first call committed).
SUSPEND_BACKOFF = Backoff(max_attempts=10)


async def _frame_requests(
    frames: list[worker_pb2.AppendFrameRequest], packed: bool
) -> AsyncIterator[worker_pb2.AppendFramesRequest]:
    """The batch as AppendFrames messages: `packed`, one message whose `frames` carry all but
    the first (one store call, one fence check: docs/streams.md#appending); else one message
    per frame."""
    if not packed:
        for frame in frames:
            yield worker_pb2.AppendFramesRequest(frame=frame)
        return
    more = [
        worker_pb2.AppendFramesRequest.Frame(
            frame_type=f.frame_type, payload=f.payload, encoding=f.encoding,
            metadata_json=f.metadata_json if f.HasField("metadata_json") else None,
            correlation_id=f.correlation_id if f.HasField("correlation_id") else None,
        )
        for f in frames[1:]
    ]  # fmt: skip
    yield worker_pb2.AppendFramesRequest(frame=frames[0], frames=more)


class RunningTask:
    """One claimed execution under its lease, from the claim to the terminal call.

    Args:
        task: The claimed task (lease handle, inputs).
        client: The client whose transport carries the task's calls.
    """

    def __init__(self, task: types_pb2.ClaimedTask, client: Client) -> None:
        self.task = task
        self.client = client
        self.transport = transport_of(client)
        self.lease_lost = asyncio.Event()
        self.lease_lost_reason: str | None = None
        self.renew_failures = 0
        self.handler: asyncio.Task[Any] | None = None
        self.shutdown_cancel = False
        self.frames_appended = 0
        self.resume_signals: list[Signal] = []
        self.suspended: TaskSuspended | None = None
        self._suspending = False
        self._frames: list[worker_pb2.AppendFrameRequest] = []
        self._pack_frames = True  # AppendFramesRequest.frames, until a server shows it lacks them
        self._frame_bytes = 0
        self._flush_lock = asyncio.Lock()
        self._linger: asyncio.Task[None] | None = None
        self._emit_error: FlowFabricError | None = None
        # The id of the last frame known to be in this attempt's stream: "" = none (a fresh
        # attempt's stream starts empty), None = unknown (a resumed attempt may have frames
        # from before). It lets a batch retried after a lost reply skip what already landed.
        self._last_frame_id: str | None = None if task.resumed else ""
        ttl_s = (task.lease.lease_ttl_ms or 30_000) / 1000
        self.lease_valid_until = time.monotonic() + ttl_s - min(LEASE_MARGIN_S, ttl_s / 10)

    @property
    def lease(self) -> types_pb2.LeaseHandle:
        """The lease handle itself (not a copy): for requests, never to be changed."""
        return self.task.lease

    @property
    def execution_id(self) -> str:
        return self.task.lease.execution_id

    @property
    def healthy(self) -> bool:
        return not self.lease_lost.is_set() and self.renew_failures < UNHEALTHY_AFTER

    # -- lease-scoped calls ---------------------------------------------------------------------

    async def fenced(
        self,
        method: Callable[..., Any],
        request: Any,
        backoff: Backoff | None = None,
    ) -> Any:
        """A lease-scoped call; a lease-lost answer sets `lease_lost` before it is raised."""
        try:
            return await self.transport.unary(method, request, backoff=backoff)
        except FlowFabricError as exc:
            if exc.reason in LEASE_LOST_REASONS:
                self.lose(exc.reason)
            raise

    async def ride_out(self, attempt: Callable[[float], Awaitable[T]]) -> T:
        """`attempt(deadline_s)` (one lease-scoped call), retried through an outage while the
        lease may still be held: UNAVAILABLE and DEADLINE_EXCEEDED are retried with backoff
        until the lease would have expired by the worker's reckoning (each renewal pushes that
        on), then the last error is raised. A lease-lost answer sets `lease_lost` first."""
        tries = 0
        while True:
            remaining = self.lease_valid_until - time.monotonic()
            deadline = max(min(self.transport.default_timeout, remaining), 0.05)
            try:
                return await attempt(deadline)
            except FlowFabricError as exc:
                if exc.reason in LEASE_LOST_REASONS:
                    self.lose(exc.reason)
                    raise
                delay = max(OUTAGE_BACKOFF.delay(tries), exc.retry_delay or 0.0)
                if (
                    exc.code not in OUTAGE_CODES
                    or self.lease_lost.is_set()
                    or time.monotonic() + delay >= self.lease_valid_until
                ):
                    raise
                if tries == 0:
                    log.info("%s: server unreachable (%r); retrying", self.execution_id, exc)
            tries += 1
            await asyncio.sleep(delay)

    async def progress(self, pct: int | None, message: str | None) -> None:
        request = worker_pb2.UpdateProgressRequest(lease=self.lease)
        if pct is not None:
            request.progress_pct = pct
        if message is not None:
            request.progress_message = message
        method = self.transport.workers.UpdateProgress  # setting progress twice is harmless
        await self.ride_out(
            lambda deadline: self.transport.unary(method, request, deadline=deadline, retry=False)
        )

    async def create_waitpoint(self, expires_in_ms: int, key: str | None) -> tuple[str, str, str]:
        """A pending waitpoint: (id, key, token)."""
        waitpoint_id = str(uuid.uuid4())
        request = worker_pb2.CreatePendingWaitpointRequest(
            lease=self.lease,
            waitpoint_id=waitpoint_id,
            waitpoint_key=key or "",
            expires_in_ms=expires_in_ms,
        )
        try:
            reply = await self.fenced(self.transport.workers.CreatePendingWaitpoint, request)
        except AlreadyExists as exc:
            # our own retry after a lost reply (the id is fresh): the listing has the token
            if exc.reason != "waitpoint_already_exists":
                raise
            for wp in await self.client.list_waitpoints(self.execution_id):
                if wp.id == waitpoint_id:
                    return wp.id, wp.key, wp.token
            raise
        created = reply.created
        return created.waitpoint_id, created.waitpoint_key, created.waitpoint_token

    # -- output frames --------------------------------------------------------------------------

    async def emit(
        self,
        frame_type: str,
        payload: Payload,
        encoding: str | None,
        correlation_id: str | None,
        metadata: dict[str, Any] | None,
    ) -> None:
        self.raise_emit_error()
        data, default_encoding = encode_payload(payload)
        request = worker_pb2.AppendFrameRequest(
            lease=self.lease, frame_type=frame_type, payload=data or b""
        )
        request.encoding = encoding or default_encoding or "binary"
        if correlation_id:
            request.correlation_id = correlation_id
        if metadata:
            request.metadata_json = json.dumps(metadata, separators=(",", ":"))
        while self._batch_full():  # e.g. several emitters while a batch rides out an outage
            await self.flush()
        self._frames.append(request)
        self._frame_bytes += len(request.payload)
        if self._batch_full():
            await self.flush()
        elif self._linger is None or self._linger.done():
            self._linger = asyncio.create_task(self._flush_later())

    def _batch_full(self) -> bool:
        return len(self._frames) >= EMIT_BATCH_FRAMES or self._frame_bytes >= EMIT_BATCH_BYTES

    async def flush(self) -> None:
        """Send the frames buffered so far (one AppendFrames call) and wait for the answer."""
        async with self._flush_lock:
            frames, self._frames, self._frame_bytes = self._frames, [], 0
            if frames:
                await self._send(frames)
        self.raise_emit_error()

    async def _send(self, frames: list[worker_pb2.AppendFrameRequest]) -> None:
        """One batch, in order, riding out an outage (`ride_out`). After a failure whose
        outcome is unknown (the reply was lost: some frames may have landed) the stream is
        read after the last frame known to be there and what already landed is not sent
        again; frames are then appended exactly once. Without such a frame id (the first
        batch of a resumed attempt) a retried batch may append some frames twice."""
        done = 0  # frames of `frames` known to be in the stream
        unsure = False

        async def attempt(deadline: float) -> None:
            nonlocal done, unsure
            if unsure and self._last_frame_id is not None:
                done += await self._landed(frames[done:], deadline)
            unsure = False
            if done == len(frames):
                return
            while done < len(frames):
                pending = frames[done:]
                try:
                    reply = await self.transport.unary(
                        self.transport.workers.AppendFrames,
                        _frame_requests(pending, self._pack_frames),
                        deadline=deadline,
                        retry=False,
                    )
                except FlowFabricError as exc:
                    unsure = exc.code in OUTAGE_CODES
                    if not unsure:
                        self._last_frame_id = None  # a prefix may have landed (`appended_count`)
                    raise
                if self._pack_frames and len(pending) > 1 and reply.appended_count < len(pending):
                    # a server without AppendFramesRequest.frames took the first frame only:
                    # send the rest one per message from now on
                    self._pack_frames = False
                    done += reply.appended_count
                    self.frames_appended += reply.appended_count
                    if self._last_frame_id is not None and reply.last_entry_id:
                        self._last_frame_id = reply.last_entry_id
                    continue
                done = len(frames)
            self.frames_appended += reply.appended_count
            if self._last_frame_id is not None and reply.last_entry_id:
                self._last_frame_id = reply.last_entry_id

        try:
            await self.ride_out(attempt)
        except FlowFabricError as exc:
            if exc.reason in LEASE_LOST_REASONS or exc.reason == "stale_owner_cannot_append":
                self.lose(exc.reason)
            self._emit_error = exc

    async def _landed(self, frames: list[worker_pb2.AppendFrameRequest], deadline: float) -> int:
        """How many of `frames` (the unsent rest of a batch whose reply was lost) are in the
        stream already: only this lease appends to the attempt's stream, so whatever follows
        the last frame known to be there is a prefix of them."""
        after = self._last_frame_id
        start = "start"
        if after:
            ms, seq = after.split("-")
            start = f"{ms}-{int(seq) + 1}"
        request = stream_pb2.ReadAttemptStreamRequest(
            execution_id=self.execution_id,
            attempt_index=self.task.lease.attempt_index,
            from_id=start,
            to_id="end",
            count_limit=len(frames),
        )
        reply = await self.transport.unary(
            self.transport.streams.ReadAttemptStream, request, deadline=deadline, retry=False
        )
        landed = reply.frames.frames
        if landed:
            self._last_frame_id = landed[-1].id
            self.frames_appended += len(landed)
            log.info(
                "%s: %d of %d frames had landed before the reply was lost",
                self.execution_id,
                len(landed),
                len(frames),
            )
        return len(landed)

    async def _flush_later(self) -> None:
        await asyncio.sleep(EMIT_LINGER_S)
        async with self._flush_lock:
            frames, self._frames, self._frame_bytes = self._frames, [], 0
            if frames:
                await self._send(frames)

    def raise_emit_error(self) -> None:
        if self._emit_error is not None:
            error, self._emit_error = self._emit_error, None
            raise error

    async def flush_for_terminal(self) -> None:
        """Before the terminal call: send what is buffered (errors are logged, not raised)."""
        try:
            await self.flush()
        except FlowFabricError as exc:
            log.warning("frames of %s not appended: %r", self.execution_id, exc)
        if self._linger is not None and not self._linger.done():
            self._linger.cancel()  # nothing left for it: flush() took the buffer under the lock

    # -- suspension -----------------------------------------------------------------------------

    def suspend_request(
        self,
        signals: str | Sequence[str] | None,
        mode: str | None,
        min_count: int | None,
        condition: Mapping[str, Any] | None,
        timeout: Duration | None,
        on_timeout: str,
        reason: str,
        continuation: str | None,
    ) -> worker_pb2.SuspendRequest:
        if condition is not None:
            if signals is not None or mode is not None or min_count is not None:
                raise ValueError("give either condition or signals/mode/min_count")
            condition_json = json.dumps(dict(condition), separators=(",", ":"))
        else:
            condition_json = ResumeCondition.build(signals, mode, min_count).to_json()
        if on_timeout not in TIMEOUT_BEHAVIORS:
            raise ValueError(f"on_timeout must be one of {TIMEOUT_BEHAVIORS}")
        request = worker_pb2.SuspendRequest(
            lease=self.lease,
            suspension_id=str(uuid.uuid4()),  # makes a retry after a lost reply reconcilable
            reason_code=reason,
            requested_by="worker",
            resume_condition_json=condition_json,
            resume_policy_json="{}",
            timeout_behavior=on_timeout,
        )
        if timeout is not None:
            request.timeout_in_ms = duration_ms(timeout, "timeout")  # on the server's clock
        if continuation is not None:
            request.continuation_metadata_pointer = continuation
        return request

    async def suspend(self, request: worker_pb2.SuspendRequest) -> list[Signal]:
        """Suspend (raises `TaskSuspended`), or the buffered signals that already meet the
        condition (the lease is kept)."""
        if self.suspended is not None:
            raise RuntimeError("the task is already suspended")
        await self.flush_for_terminal()  # frames land while the lease is still ours
        self._suspending = True
        try:
            reply = await self.fenced(self.transport.workers.Suspend, request, SUSPEND_BACKOFF)
        finally:
            self._suspending = False
        if reply.WhichOneof("outcome") == "suspended":
            out = reply.suspended
            self.suspended = TaskSuspended(
                out.suspension_id, out.waitpoint_id, out.waitpoint_key, out.waitpoint_token
            )
            raise self.suspended
        self.resume_signals = [Signal.from_proto(r) for r in reply.already_satisfied.signals]
        return list(self.resume_signals)

    # -- driven by the worker -------------------------------------------------------------------

    def lose(self, reason: str) -> None:
        if self.lease_lost.is_set() or self.suspended is not None:
            return  # a suspended task gave its lease up on purpose
        self.lease_lost_reason = reason
        self.lease_lost.set()
        if self._suspending:
            return  # the Suspend answer decides (a committed suspend also ends the lease)
        log.warning("lease lost on %s (%s): cancelling its handler", self.execution_id, reason)
        if self.handler is not None and not self.handler.done():
            self.handler.cancel(f"lease lost: {reason}")

    def stop_background(self) -> None:
        """The task is over: stop a linger flush still riding out an outage."""
        if self._linger is not None and not self._linger.done():
            self._linger.cancel()

    def cancel_for_shutdown(self) -> None:
        self.shutdown_cancel = True
        if self.handler is not None and not self.handler.done():
            self.handler.cancel("worker shutting down")

    async def renew_forever(self) -> None:
        """Renew every ttl/3 (first tick skipped) until cancelled or the lease is lost."""
        ttl_ms = self.lease.lease_ttl_ms or 30_000
        interval = max(ttl_ms / 3, 1) / 1000
        request = worker_pb2.RenewLeaseRequest(lease=self.lease, lease_ttl_ms=ttl_ms)
        while True:
            await asyncio.sleep(interval)
            sent = time.monotonic()  # the renewed lease runs from no earlier than this
            try:
                await self.transport.unary(
                    self.transport.workers.RenewLease,
                    request,
                    deadline=min(self.transport.default_timeout, max(interval, 0.5)),
                    retry=False,
                )
            except FlowFabricError as exc:
                if exc.reason in LEASE_LOST_REASONS:
                    self.lose(exc.reason)
                    return
                self.renew_failures += 1
                log.warning(
                    "renewal of %s failed (%d in a row): %r",
                    self.execution_id,
                    self.renew_failures,
                    exc,
                )
            else:
                self.renew_failures = 0
                self.lease_valid_until = max(self.lease_valid_until, sent + ttl_ms / 1000)
