"""What a handler sees of its task: inputs, progress, and whether it still holds the lease."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterable, Iterable, Mapping, Sequence
from typing import Any, Literal

from flowfabric._client import Client, Payload, encode_payload
from flowfabric._errors import (
    LEASE_LOST_REASONS,
    AlreadyExists,
    FlowFabricError,
    TaskSuspended,
)
from flowfabric._retry import Backoff
from flowfabric._signals import (
    TIMEOUT_BEHAVIORS,
    Duration,
    ResumeCondition,
    Signal,
    duration_ms,
)
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
#: Suspend keeps retrying UNAVAILABLE about as long as a terminal call (same suspension id, so
#: the server reconciles a retry whose first call committed).
SUSPEND_BACKOFF = Backoff(max_attempts=10)
#: Default life of a pending waitpoint that no suspension activates.
DEFAULT_WAITPOINT_EXPIRY_S = 3600.0

TimeoutBehavior = Literal["fail", "cancel", "expire", "auto_resume", "escalate"]


def attempt_type_name(value: int) -> str:
    """`initial`, `retry`, `reclaim`, `replay` (the engine's stored names)."""
    name = types_pb2.AttemptType.Name(value)  # type: ignore[arg-type]
    return name.removeprefix("ATTEMPT_TYPE_").lower()


class PendingWaitpoint:
    """A waitpoint created ahead of a suspension (`TaskContext.create_waitpoint`).

    Hand `token` (with `id` and the execution id) to whoever will signal; signals that arrive
    before the suspension are buffered, not lost. Pass it to `suspend(waitpoint=...)` to wait
    on it, or `close()` it if the task will not. Unused, it expires on its own.

    Attributes:
        id: The waitpoint id.
        key: Its label.
        token: The credential senders present (not in `repr`).
        execution_id: The execution it belongs to.
    """

    def __init__(
        self, client: Client, execution_id: str, waitpoint_id: str, key: str, token: str
    ) -> None:
        self._client = client
        self.execution_id = execution_id
        self.id = waitpoint_id
        self.key = key
        self.token = token

    async def close(self, reason: str = "") -> None:
        """Close it (idempotent); later signals answer `waitpoint_closed`. `reason` default
        `proactive_close`."""
        request = worker_pb2.CloseWaitpointRequest(
            waitpoint_id=self.id, execution_id=self.execution_id, reason=reason
        )
        await self._client._call(self._client._workers.CloseWaitpoint, request)

    def __repr__(self) -> str:
        return f"PendingWaitpoint(id={self.id!r}, execution_id={self.execution_id!r})"


class TaskContext:
    """One claimed execution, as handed to a handler.

    The worker renews the lease every `lease_ttl / 3` while the handler runs. If the lease is
    lost (operator cancel or revoke, expiry, a competing owner) `lease_lost` is set, its reason
    is in `lease_lost_reason`, and the handler task is cancelled: it sees `CancelledError` at
    its next `await`. Check `lease_lost` before irreversible side effects.

    Suspension: `await ctx.suspend("review", timeout=600)` releases the lease and ends the
    handler (it raises `TaskSuspended`; let it propagate). When a matching signal arrives the
    execution is claimed again with the same attempt and **the handler re-runs from the top**,
    with `resumed` true and the signals that met the condition in `resume_signals`. So a
    handler checks `resume_signals` (or uses `wait_for_signal`, which does) before suspending:

    ```python
    @worker.handler("publish")
    async def publish(ctx: TaskContext) -> dict:
        draft = await make_draft(ctx.json())      # re-done after the resume: keep it cheap
        review = await ctx.wait_for_signal("review", timeout=600)   # suspends the 1st time
        if not review.json()["approved"]:
            raise NonRetryableError("rejected")
        return {"published": draft}
    ```
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
        self.resume_signals: list[Signal] = []
        """The signals that met the resume condition of the suspension this attempt resumed
        from (set before the handler runs), or that `suspend` found already buffered. Empty on
        a first run and after an operator or timeout resume."""
        self._suspending = False
        self._suspended: TaskSuspended | None = None

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
        """True when this claim resumed a paused attempt (same attempt index, new lease): after
        a suspension (see `resume_signals`), or after the work was handed back unfinished."""
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

    # -- suspension ---------------------------------------------------------------------------

    async def create_waitpoint(
        self, *, expires_in: Duration = DEFAULT_WAITPOINT_EXPIRY_S, key: str | None = None
    ) -> PendingWaitpoint:
        """Create a pending waitpoint while holding the lease, so a signal that arrives before
        `suspend(waitpoint=...)` is buffered rather than refused (e.g. a callback URL handed
        to an external system that may answer at once).

        Args:
            expires_in: Closes (`never_committed`) unless a suspension activates it in time.
            key: Opaque label (≤ 256 bytes); default `wpk:<id>`.
        """
        if duration_ms(expires_in, "expires_in") <= 0:
            raise ValueError("expires_in must be positive")
        waitpoint_id = str(uuid.uuid4())
        request = worker_pb2.CreatePendingWaitpointRequest(
            lease=self._task.lease,
            waitpoint_id=waitpoint_id,
            waitpoint_key=key or "",
            expires_in_ms=duration_ms(expires_in, "expires_in"),
        )
        try:
            reply = await self._call_fenced("CreatePendingWaitpoint", request)
        except AlreadyExists as exc:
            # our own retry after a lost reply (the id is fresh): the listing has the token
            if exc.reason != "waitpoint_already_exists":
                raise
            for wp in await self._client.list_waitpoints(self.execution_id):
                if wp.id == waitpoint_id:
                    return PendingWaitpoint(
                        self._client, self.execution_id, wp.id, wp.key, wp.token
                    )
            raise
        created = reply.created
        return PendingWaitpoint(
            self._client,
            self.execution_id,
            created.waitpoint_id,
            created.waitpoint_key,
            created.waitpoint_token,
        )

    async def suspend(
        self,
        signals: str | Sequence[str] | None = None,
        *,
        mode: Literal["any", "all"] | None = None,
        min_count: int | None = None,
        condition: Mapping[str, Any] | None = None,
        timeout: Duration | None = None,  # noqa: ASYNC109 (the suspension's, not this call's)
        on_timeout: TimeoutBehavior = "fail",
        reason: str = "waiting_for_signal",
        waitpoint: PendingWaitpoint | None = None,
        continuation: str | None = None,
    ) -> list[Signal]:
        """Pause this execution until signals arrive; release the lease.

        When it suspends this raises `TaskSuspended` (a BaseException: let it propagate) and
        the worker neither completes nor fails the task. The handler re-runs from the top once
        the condition is met, with the signals in `resume_signals`. If buffered signals of
        `waitpoint` already meet the condition, nothing is suspended: the lease is kept and the
        matched signals are returned (and put in `resume_signals`).

        Args:
            signals: The names to wait for (one matcher each; `""` matches any name). None or
                empty = any one signal.
            mode: `any` (`min_count` of the names) or `all`. Default: `any` for one name,
                `all` for several.
            min_count: For `any`: how many matchers must match (default 1).
            condition: A raw resume-condition JSON object instead of signals/mode/min_count
                (e.g. `{"condition_type": "operator_only"}`).
            timeout: After this long apply `on_timeout`; None = wait for ever.
            on_timeout: `fail`, `cancel`, `expire` (the execution ends so), `auto_resume`
                (re-run with empty `resume_signals`) or `escalate` (stay suspended, flagged
                for an operator).
            reason: Reason code (`waiting_for_signal`, `waiting_for_approval`,
                `waiting_for_callback`, `waiting_for_tool_result`, `manual_pause`, ...); sets
                the execution's blocking reason.
            waitpoint: A pending waitpoint from `create_waitpoint` to activate (its token
                stays valid, its buffered signals count).
            continuation: Opaque worker-owned pointer stored with the suspension.

        Raises:
            TaskSuspended: Suspended (the normal outcome).
            StaleLease, ExecutionNotActive: The lease is lost.
            FailedPrecondition: e.g. `waitpoint_not_pending`, `pending_waitpoint_expired`.
        """
        if self._suspended is not None:
            raise RuntimeError("the task is already suspended")
        request = self._suspend_request(
            signals, mode, min_count, condition, timeout, on_timeout, reason, continuation
        )
        if waitpoint is not None:
            request.waitpoint_id = waitpoint.id
            request.use_pending_waitpoint = True
        await self._flush_for_terminal()  # frames land while the lease is still ours
        self._suspending = True
        try:
            reply = await self._call_fenced("Suspend", request, backoff=SUSPEND_BACKOFF)
        finally:
            self._suspending = False
        if reply.WhichOneof("outcome") == "suspended":
            out = reply.suspended
            self._suspended = TaskSuspended(
                out.suspension_id, out.waitpoint_id, out.waitpoint_key, out.waitpoint_token
            )
            raise self._suspended
        self.resume_signals = [Signal.from_proto(r) for r in reply.already_satisfied.signals]
        return list(self.resume_signals)

    async def wait_for_signal(
        self,
        name: str,
        *,
        timeout: Duration | None = None,  # noqa: ASYNC109 (the suspension's, not this call's)
        on_timeout: TimeoutBehavior = "fail",
        reason: str = "waiting_for_signal",
        waitpoint: PendingWaitpoint | None = None,
    ) -> Signal:
        """The signal `name` this attempt resumed with, else suspend until it arrives.

        On the first run this suspends (raising `TaskSuspended`); on the re-run after the
        signal it returns it. Meant for one wait per handler run: `resume_signals` holds the
        last suspension's signals only, so a handler waiting for several signals one after
        the other must record its own progress. After an operator or `auto_resume` timeout
        resume there is no signal and this waits again; check `ctx.resumed and not
        ctx.resume_signals` first to handle that case.
        """
        for signal in self.resume_signals:
            if signal.name == name:
                return signal
        matched = await self.suspend(
            name, timeout=timeout, on_timeout=on_timeout, reason=reason, waitpoint=waitpoint
        )
        return matched[0]

    def _suspend_request(
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
            lease=self._task.lease,
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

    async def _call_fenced(self, rpc: str, request: Any, backoff: Backoff | None = None) -> Any:
        """A lease-scoped call; a lease-lost answer sets `lease_lost` before it is raised."""
        try:
            return await self._client._call(
                getattr(self._client._workers, rpc), request, backoff=backoff
            )
        except FlowFabricError as exc:
            if exc.reason in LEASE_LOST_REASONS:
                self._lose(exc.reason)
            raise

    # -- driven by the worker -----------------------------------------------------------------

    def _lose(self, reason: str) -> None:
        if self.lease_lost.is_set() or self._suspended is not None:
            return  # a suspended task gave its lease up on purpose
        self.lease_lost_reason = reason
        self.lease_lost.set()
        if self._suspending:
            return  # the Suspend answer decides (a committed suspend also ends the lease)
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
