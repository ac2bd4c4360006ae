"""The async client: submit executions, read and operate on them, watch them finish.

Reads return the API's own read models (`ExecutionInfo`, `ExecutionSnapshot`,
`ExecutionSummary`, `WatchExecutionResponse`); everything else returns a small frozen dataclass
or a plain value. Every call has a deadline, carries the bearer token and is retried on
UNAVAILABLE with exponential backoff — except a create without an idempotency key or an
execution id, which could be applied twice and is surfaced instead.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import enum
import json
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, TypeVar

import grpc

from flowfabric._errors import DeadlineExceeded, NotFound, ResultNotReady, from_rpc_error
from flowfabric._retry import RETRY_CODES, Backoff, RetryPolicy, with_retries
from flowfabric._signals import (
    Duration,
    SecretRotation,
    Signal,
    SignalDelivery,
    Waitpoint,
    WaitpointEvent,
    WaitpointKids,
    choose_waitpoints,
    duration_ms,
)
from flowfabric.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    execution_pb2,
    execution_pb2_grpc,
    signal_pb2,
    signal_pb2_grpc,
    stream_pb2,
    stream_pb2_grpc,
    types_pb2,
    worker_pb2_grpc,
)

T = TypeVar("T")

#: Keepalive that survives idle connections and stays within the server's ping policy
#: (`min_ping_interval_without_data_ms` = 10 s, `permit_without_calls` = 1).
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
)

#: While waiting, the state is re-read this often in case a watch event was lost.
WAIT_RECHECK_S = 2.0
#: RotateWaitpointSecret fans out to every partition; the server gives up after 120 s.
ROTATE_DEADLINE_S = 130.0

Time = datetime | timedelta | int
"""An absolute time: a datetime, a delay from now (timedelta), or ms since the Unix epoch."""
Payload = bytes | str | Mapping[str, Any] | Sequence[Any]
"""bytes are sent verbatim; str as UTF-8; mappings and lists as JSON."""


class ExecutionState(enum.IntEnum):
    """The public state of an execution (`flowfabric.v1.PublicState`)."""

    UNSPECIFIED = types_pb2.PUBLIC_STATE_UNSPECIFIED
    WAITING = types_pb2.PUBLIC_STATE_WAITING
    DELAYED = types_pb2.PUBLIC_STATE_DELAYED
    RATE_LIMITED = types_pb2.PUBLIC_STATE_RATE_LIMITED
    WAITING_CHILDREN = types_pb2.PUBLIC_STATE_WAITING_CHILDREN
    ACTIVE = types_pb2.PUBLIC_STATE_ACTIVE
    SUSPENDED = types_pb2.PUBLIC_STATE_SUSPENDED
    COMPLETED = types_pb2.PUBLIC_STATE_COMPLETED
    FAILED = types_pb2.PUBLIC_STATE_FAILED
    CANCELLED = types_pb2.PUBLIC_STATE_CANCELLED
    EXPIRED = types_pb2.PUBLIC_STATE_EXPIRED
    SKIPPED = types_pb2.PUBLIC_STATE_SKIPPED

    @property
    def is_terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset(
    {
        ExecutionState.COMPLETED,
        ExecutionState.FAILED,
        ExecutionState.CANCELLED,
        ExecutionState.EXPIRED,
        ExecutionState.SKIPPED,
    }
)
_INDEXES = {
    "eligible": execution_pb2.EXECUTION_INDEX_ELIGIBLE,
    "delayed": execution_pb2.EXECUTION_INDEX_DELAYED,
    "terminal": execution_pb2.EXECUTION_INDEX_TERMINAL,
    "suspended": execution_pb2.EXECUTION_INDEX_SUSPENDED,
    "active": execution_pb2.EXECUTION_INDEX_ACTIVE,
}


@dataclass(frozen=True)
class Submitted:
    """The answer to `Client.submit`.

    Attributes:
        execution_id: The (server-minted or given) execution id.
        duplicate: True if the id or idempotency key named an existing execution.
        state: The state written (WAITING or DELAYED), or the existing one for a duplicate.
    """

    execution_id: str
    duplicate: bool
    state: ExecutionState


@dataclass(frozen=True)
class Page:
    """One page of `Client.list`; `next_page_token` is empty on the last page."""

    executions: builtins.list[types_pb2.ExecutionSummary]
    next_page_token: str


def to_ms(value: Time) -> int:
    """Milliseconds since the Unix epoch."""
    if isinstance(value, datetime):
        return int(value.timestamp() * 1000)
    if isinstance(value, timedelta):
        return int(time.time() * 1000 + value.total_seconds() * 1000)
    return int(value)


def encode_payload(value: Payload | None) -> tuple[bytes | None, str | None]:
    """(bytes, encoding): bytes verbatim (no encoding), str as `utf8`, the rest as `json`."""
    if value is None:
        return None, None
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value), None
    if isinstance(value, str):
        return value.encode(), "utf8"
    return json.dumps(value, separators=(",", ":")).encode(), "json"


def _credentials(tls: bool | grpc.ChannelCredentials) -> grpc.ChannelCredentials | None:
    if isinstance(tls, grpc.ChannelCredentials):
        return tls
    return grpc.ssl_channel_credentials() if tls else None


class Client:
    """Async FlowFabric client over one gRPC channel.

    Use `await Client.connect(target, token=...)` or `async with Client(target, ...) as c:`.

    Args:
        target: `host:port` of the FlowFabric server.
        token: Bearer token (`FF_API_TOKEN` of the server); None = no auth header.
        tls: False (plaintext), True (system roots) or explicit channel credentials.
        default_timeout: Deadline in seconds of each call attempt.
        interceptors: grpc.aio client interceptors, outermost first.
    """

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls: bool | grpc.ChannelCredentials = False,
        default_timeout: float = 10.0,
        interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
    ) -> None:
        creds = _credentials(tls)
        options = list(CHANNEL_OPTIONS)
        if creds is not None:
            self._channel = grpc.aio.secure_channel(
                target, creds, options=options, interceptors=interceptors
            )
        else:
            self._channel = grpc.aio.insecure_channel(
                target, options=options, interceptors=interceptors
            )
        self.target = target
        self.default_timeout = default_timeout
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        self._backoff = Backoff()
        self._executions = execution_pb2_grpc.ExecutionServiceStub(self._channel)
        self._workers = worker_pb2_grpc.WorkerServiceStub(self._channel)
        self._streams = stream_pb2_grpc.StreamServiceStub(self._channel)
        self._signals = signal_pb2_grpc.SignalServiceStub(self._channel)
        self._admin = admin_pb2_grpc.AdminServiceStub(self._channel)

    @classmethod
    async def connect(
        cls,
        target: str,
        *,
        token: str | None = None,
        tls: bool | grpc.ChannelCredentials = False,
        default_timeout: float = 10.0,
        interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
    ) -> Client:
        """A client for `target` (the channel connects lazily; calls retry while it comes up)."""
        return cls(
            target,
            token=token,
            tls=tls,
            default_timeout=default_timeout,
            interceptors=interceptors,
        )

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- the one call path ----------------------------------------------------------------------

    async def _call(
        self,
        method: Callable[..., Awaitable[T]],
        request: Any,
        *,
        deadline: float | None = None,
        retry: bool = True,
        backoff: Backoff | None = None,
    ) -> T:
        """One unary RPC with a per-attempt deadline (seconds), the token and UNAVAILABLE
        retries; failures raise typed errors."""
        deadline = deadline if deadline is not None else self.default_timeout

        def attempt() -> Awaitable[T]:
            return method(request, timeout=deadline, metadata=self._metadata)

        return await with_retries(attempt, backoff or self._backoff, retry=retry)

    # -- ExecutionService -----------------------------------------------------------------------

    async def submit(
        self,
        kind: str,
        payload: Payload = b"",
        *,
        lane: str = "default",
        priority: int = 0,
        delay_until: Time | None = None,
        deadline: Time | None = None,
        policy: types_pb2.ExecutionPolicy | RetryPolicy | None = None,
        tags: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        namespace: str = "default",
        execution_id: str | None = None,
        payload_encoding: str | None = None,
    ) -> Submitted:
        """Create an execution of `kind` on `lane`.

        Retried on UNAVAILABLE only when `idempotency_key` or `execution_id` makes a repeat
        harmless (it then answers `duplicate`); otherwise the error is raised.
        """
        data, encoding = encode_payload(payload)
        request = execution_pb2.CreateExecutionRequest(
            execution_id=execution_id or "",
            namespace=namespace,
            lane_id=lane,
            execution_kind=kind,
            input_payload=data or b"",
            priority=priority,
            tags=dict(tags or {}),
        )
        if payload_encoding or encoding:
            request.payload_encoding = payload_encoding or encoding or ""
        if isinstance(policy, RetryPolicy):
            request.policy.CopyFrom(policy.to_proto())
        elif policy is not None:
            request.policy.CopyFrom(policy)
        if idempotency_key is not None:
            request.idempotency_key = idempotency_key
        if delay_until is not None:
            request.delay_until = to_ms(delay_until)
        if deadline is not None:
            request.execution_deadline_at = to_ms(deadline)
        safe = bool(idempotency_key or execution_id)
        reply = await self._call(self._executions.CreateExecution, request, retry=safe)
        if reply.WhichOneof("outcome") == "duplicate":
            eid = reply.duplicate.execution_id
            return Submitted(eid, True, await self.state(eid))
        created = reply.created
        return Submitted(created.execution_id, False, ExecutionState(created.public_state))

    async def get(self, execution_id: str) -> types_pb2.ExecutionInfo:
        """The full execution record (state vector included)."""
        reply: execution_pb2.GetExecutionResponse = await self._call(
            self._executions.GetExecution,
            execution_pb2.GetExecutionRequest(execution_id=execution_id),
        )
        return reply.execution

    async def describe(self, execution_id: str) -> types_pb2.ExecutionSnapshot:
        """A snapshot: current attempt and lease, tags, totals."""
        reply: execution_pb2.DescribeExecutionResponse = await self._call(
            self._executions.DescribeExecution,
            execution_pb2.DescribeExecutionRequest(execution_id=execution_id),
        )
        return reply.snapshot

    async def result(self, execution_id: str) -> bytes:
        """The result bytes of a completed execution, verbatim (b"" if it completed without one).

        Raises:
            ResultNotReady: The execution has not completed successfully.
            NotFound: No such execution.
        """
        try:
            reply: execution_pb2.GetExecutionResultResponse = await self._call(
                self._executions.GetExecutionResult,
                execution_pb2.GetExecutionResultRequest(execution_id=execution_id),
            )
        except ResultNotReady:
            info = await self.get(execution_id)
            if info.public_state == types_pb2.PUBLIC_STATE_COMPLETED:
                return b""
            raise
        return reply.result_payload

    async def cancel(self, execution_id: str, reason: str = "") -> ExecutionState:
        """Operator cancel of a non-terminal execution; a running handler loses its lease."""
        reply = await self._call(
            self._executions.CancelExecution,
            execution_pb2.CancelExecutionRequest(execution_id=execution_id, reason=reason),
        )
        return ExecutionState(reply.cancelled.public_state)

    async def replay(self, execution_id: str) -> ExecutionState:
        """Re-run a terminal execution under the same id (a new `replay` attempt)."""
        reply = await self._call(
            self._executions.ReplayExecution,
            execution_pb2.ReplayExecutionRequest(execution_id=execution_id),
        )
        return ExecutionState(reply.replayed.public_state)

    async def change_priority(self, execution_id: str, priority: int) -> None:
        """Re-prioritise a waiting execution (clamped to 0..9000 by the server)."""
        await self._call(
            self._executions.ChangePriority,
            execution_pb2.ChangePriorityRequest(execution_id=execution_id, new_priority=priority),
        )

    async def resume(self, execution_id: str, *, delay: Duration = 0) -> ExecutionState:
        """Operator resume of a suspended execution without its signals (ResumeExecution).

        The same attempt becomes claimable again (after `delay`: seconds or a timedelta) and
        its handler re-runs with empty `resume_signals`. Not retried: a repeat answers
        `execution_not_suspended`.

        Returns:
            WAITING, or DELAYED with a delay.
        """
        request = execution_pb2.ResumeExecutionRequest(
            execution_id=execution_id,
            trigger_type="operator",
            resume_delay_ms=duration_ms(delay, "delay"),
        )
        reply = await self._call(self._executions.ResumeExecution, request, retry=False)
        return ExecutionState(reply.resumed.public_state)

    async def list(
        self,
        *,
        lane: str = "default",
        state: str | int = "eligible",
        limit: int = 50,
        page_token: str = "",
        partition: int | None = None,
    ) -> Page:
        """One page of one lane's executions in one index (`eligible`, `delayed`, `active`,
        `suspended` or `terminal`)."""
        request = execution_pb2.ListExecutionsRequest(
            lane=lane,
            state=_INDEXES[state] if isinstance(state, str) else state,  # type: ignore[arg-type]
            limit=limit,
            page_token=page_token,
        )
        if partition is not None:
            request.partition = partition
        reply = await self._call(self._executions.ListExecutions, request)
        return Page(builtins.list(reply.executions), reply.next_page_token)

    async def list_all(
        self,
        *,
        lane: str = "default",
        state: str | int = "eligible",
        page_size: int = 200,
        partition: int | None = None,
    ) -> AsyncGenerator[types_pb2.ExecutionSummary, None]:
        """Every execution of the index, page by page."""
        token = ""
        while True:
            page = await self.list(
                lane=lane, state=state, limit=page_size, page_token=token, partition=partition
            )
            for row in page.executions:
                yield row
            if not page.next_page_token:
                return
            token = page.next_page_token

    async def watch(
        # `timeout` is the stream's gRPC deadline, which asyncio.timeout cannot set
        self,
        execution_id: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> AsyncGenerator[execution_pb2.WatchExecutionResponse, None]:
        """The current state, then every public-state change; ends after a terminal state.

        A stream broken by UNAVAILABLE is re-opened (the server re-sends the current state;
        repeats are dropped). `timeout` bounds the whole watch (DeadlineExceeded).
        """
        end = None if timeout is None else time.monotonic() + timeout
        request = execution_pb2.WatchExecutionRequest(execution_id=execution_id)
        last: int | None = None
        async for message in self._open_stream(
            self._executions.WatchExecution, lambda: request, end=end
        ):
            if message.public_state != last:
                last = message.public_state
                yield message

    async def wait(
        self,
        execution_id: str,
        timeout: float | None = None,  # noqa: ASYNC109 (the watch's deadline, see `watch`)
    ) -> ExecutionState:
        """Wait (via watch) until the execution is terminal and return its final state.

        The server's watch events are at-most-once (pub/sub), so the state is also re-read
        every couple of seconds while waiting: a lost event delays the answer, never loses it.

        Raises:
            TimeoutError: Not terminal within `timeout` seconds.
        """
        watcher = asyncio.ensure_future(self._watch_until_terminal(execution_id, timeout))
        try:
            while True:
                done, _ = await asyncio.wait({watcher}, timeout=WAIT_RECHECK_S)
                if done:
                    return watcher.result()
                state = await self.state(execution_id)
                if state.is_terminal:
                    return state
        finally:
            watcher.cancel()

    async def _watch_until_terminal(
        self,
        execution_id: str,
        timeout: float | None,  # noqa: ASYNC109
    ) -> ExecutionState:
        try:
            async with contextlib.aclosing(self.watch(execution_id, timeout=timeout)) as stream:
                async for message in stream:
                    state = ExecutionState(message.public_state)
                    if state.is_terminal:
                        return state
        except DeadlineExceeded as exc:
            raise TimeoutError(f"{execution_id} not terminal after {timeout} s") from exc
        return await self.state(execution_id)  # the stream ended without a terminal state

    async def state(self, execution_id: str) -> ExecutionState:
        """The public state only (a cheaper read than `get`)."""
        reply = await self._call(
            self._executions.GetExecutionState,
            execution_pb2.GetExecutionStateRequest(execution_id=execution_id),
        )
        return ExecutionState(reply.public_state)

    # -- StreamService --------------------------------------------------------------------------

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
        reply = await self._call(self._streams.ReadAttemptStream, request)
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
        retries = 0
        while True:
            request = stream_pb2.TailAttemptStreamRequest(
                execution_id=execution_id, attempt_index=attempt_index, after=cursor,
                follow=follow,
            )  # fmt: skip
            if idle_timeout_ms is not None:
                request.idle_timeout_ms = idle_timeout_ms
            if batch is not None:
                request.batch = batch
            call = self._streams.TailAttemptStream(request, metadata=self._metadata)
            try:
                async for message in call:
                    retries = 0
                    if message.frames:
                        cursor = message.frames[-1].id
                    yield message
                return
            except grpc.aio.AioRpcError as exc:
                error = from_rpc_error(exc)
                if error.code not in RETRY_CODES or retries >= self._backoff.max_attempts:
                    raise error from exc
            finally:
                call.cancel()
            await asyncio.sleep(self._backoff.delay(retries))
            retries += 1

    # -- SignalService --------------------------------------------------------------------------

    async def deliver_signal(
        self,
        execution_id: str,
        waitpoint_id: str,
        name: str,
        token: str,
        payload: Payload | None = None,
        *,
        idempotency_key: str | None = None,
        category: str = "",
        source_type: str = "",
        source_identity: str = "",
        correlation_id: str | None = None,
        payload_encoding: str | None = None,
        resume_delay: Duration | None = None,
        created_at: Time | None = None,
    ) -> SignalDelivery:
        """Deliver signal `name` to a waitpoint, presenting its token.

        On an active waitpoint the signal is evaluated and may resume the execution; on a
        pending one it is buffered and evaluated when the suspension activates it. Retried on
        UNAVAILABLE only with an `idempotency_key` (a repeat then answers `duplicate`).

        Args:
            payload: bytes verbatim, str as UTF-8, mappings and lists as JSON; ≤ 65 536 bytes.
            idempotency_key: Dedup key, scoped to the waitpoint (24 h window).
            category: Free-form (e.g. `approval`, `callback`).
            source_type: Who sends it (e.g. `user`, `webhook`).
            source_identity: Which one of them.
            resume_delay: If this signal resumes the execution: eligible only after this long.
            created_at: The sender's timestamp (default: acceptance time).

        Raises:
            InvalidWaitpointToken: The token is wrong, expired or missing (also for an unknown
                waitpoint).
            WaitpointClosed: The waitpoint no longer takes signals, or the execution ended.
            ResourceExhausted: `signal_limit_exceeded`.
            InvalidArgument: `payload_too_large`.
        """
        data, encoding = encode_payload(payload)
        request = signal_pb2.DeliverSignalRequest(
            execution_id=execution_id,
            waitpoint_id=waitpoint_id,
            signal_name=name,
            signal_category=category,
            source_type=source_type,
            source_identity=source_identity,
            waitpoint_token=token,
        )
        if data is not None:
            request.payload = data
        if payload_encoding or encoding:
            request.payload_encoding = payload_encoding or encoding or ""
        if correlation_id is not None:
            request.correlation_id = correlation_id
        if idempotency_key is not None:
            request.idempotency_key = idempotency_key
        if resume_delay is not None:
            request.resume_delay_ms = duration_ms(resume_delay, "resume_delay")
        if created_at is not None:
            request.created_at = to_ms(created_at)
        reply = await self._call(
            self._signals.DeliverSignal, request, retry=idempotency_key is not None
        )
        if reply.WhichOneof("outcome") == "duplicate":
            return SignalDelivery(reply.duplicate.existing_signal_id, "duplicate", duplicate=True)
        return SignalDelivery(reply.accepted.signal_id, reply.accepted.effect)

    async def signal(
        self,
        execution_id: str,
        name: str,
        payload: Payload | None = None,
        **options: Any,
    ) -> SignalDelivery:
        """`deliver_signal` to the execution's one open waitpoint that takes `name` (found with
        `find_waitpoint`); `options` are `deliver_signal`'s keyword arguments."""
        wp = await self.find_waitpoint(execution_id, name)
        return await self.deliver_signal(execution_id, wp.id, name, wp.token, payload, **options)

    async def list_waitpoints(self, execution_id: str) -> builtins.list[Waitpoint]:
        """The execution's open (`pending` and `active`) waitpoints with their tokens, ordered
        by id. The tokens are credentials: do not log them.

        Raises:
            NotFound: No such execution.
        """
        out: builtins.list[Waitpoint] = []
        page_token = ""
        while True:
            reply = await self._call(
                self._signals.ListPendingWaitpoints,
                signal_pb2.ListPendingWaitpointsRequest(
                    execution_id=execution_id, page_token=page_token
                ),
            )
            out += [Waitpoint.from_proto(info) for info in reply.waitpoints]
            if not reply.next_page_token:
                return out
            page_token = reply.next_page_token

    async def find_waitpoint(self, execution_id: str, name: str | None = None) -> Waitpoint:
        """The one open waitpoint a signal `name` should go to: among those that may take it
        (any, without `name`), active ones win over pending ones, then those naming it over
        wildcards.

        Raises:
            NotFound: `waitpoint_not_found`: no open waitpoint takes it (or no execution).
            ValueError: Several do; choose one with `list_waitpoints`.
        """
        candidates = choose_waitpoints(await self.list_waitpoints(execution_id), name)
        if not candidates:
            what = f" takes signal {name!r}" if name is not None else ""
            raise NotFound(
                f"no open waitpoint of {execution_id}{what}",
                code=grpc.StatusCode.NOT_FOUND,
                reason="waitpoint_not_found",
            )
        if len(candidates) > 1:
            ids = ", ".join(wp.id for wp in candidates)
            raise ValueError(f"{len(candidates)} open waitpoints of {execution_id} fit: {ids}")
        return candidates[0]

    async def watch_signals(
        self,
        execution_id: str,
        waitpoint_id: str | None = None,
        *,
        after: str | int | None = None,
    ) -> AsyncGenerator[Signal, None]:
        """Accepted (and buffered) signals with their payloads: the stored history after
        `after`, then live, each once; ends when the execution is terminal.

        Args:
            waitpoint_id: Only this waitpoint's signals.
            after: Resume cursor: with `waitpoint_id`, the `stream_id` of the last signal
                handled; without, its `accepted_at` (ms). None = the whole history.

        A stream broken by UNAVAILABLE is re-opened from the last signal received.
        """
        if waitpoint_id is None and isinstance(after, str):
            raise TypeError("without waitpoint_id, `after` is an accepted_at time in ms")
        cursor: str | int | None = after
        seen: set[str] = set()

        def request() -> signal_pb2.WatchSignalsRequest:
            req = signal_pb2.WatchSignalsRequest(execution_id=execution_id)
            if waitpoint_id is not None:
                req.waitpoint_id = waitpoint_id
                if cursor is not None:
                    req.after_stream_id = str(cursor)
            elif cursor is not None:
                req.after_accepted_at = int(cursor)
            return req

        async for message in self._open_stream(self._signals.WatchSignals, request):
            signal = Signal.from_proto(message.signal)
            if signal.signal_id in seen:
                continue
            seen.add(signal.signal_id)
            if waitpoint_id is not None:
                cursor = signal.stream_id or cursor
            else:  # re-read the last millisecond on a reconnect; `seen` drops the repeats
                cursor = max(signal.accepted_at - 1, 0)
            yield signal

    async def watch_waitpoints(self, execution_id: str) -> AsyncGenerator[WaitpointEvent, None]:
        """Each open waitpoint (with its token), then each that opens or closes; ends when the
        execution is terminal. A stream broken by UNAVAILABLE is re-opened; waitpoints already
        reported are not repeated. A pending waitpoint is reported again (`opened`, state
        `active`) when a suspension activates it. The tokens are credentials: do not log the
        events."""
        seen: set[tuple[str, str, str]] = set()

        def request() -> signal_pb2.WatchWaitpointsRequest:
            return signal_pb2.WatchWaitpointsRequest(execution_id=execution_id)

        async for message in self._open_stream(self._signals.WatchWaitpoints, request):
            event = WaitpointEvent.from_proto(message)
            state = event.waitpoint.state if event.waitpoint is not None else ""
            key = (event.kind, event.waitpoint_id, state)
            if key in seen:
                continue
            seen.add(key)
            yield event

    async def _open_stream(
        self, method: Callable[..., Any], request: Callable[[], Any], end: float | None = None
    ) -> AsyncGenerator[Any, None]:
        """A server stream, re-opened with a fresh `request()` after UNAVAILABLE (backoff,
        bounded attempts); other failures raise typed errors. `end` (monotonic) is the
        deadline of the whole stream across re-opens."""
        retries = 0
        while True:
            remaining = None if end is None else max(end - time.monotonic(), 0.001)
            call = method(request(), timeout=remaining, metadata=self._metadata)
            try:
                async for message in call:
                    retries = 0
                    yield message
                return
            except grpc.aio.AioRpcError as exc:
                error = from_rpc_error(exc)
                if error.code not in RETRY_CODES or retries >= self._backoff.max_attempts:
                    raise error from exc
            finally:
                call.cancel()
            await asyncio.sleep(self._backoff.delay(retries))
            retries += 1

    # -- AdminService ---------------------------------------------------------------------------

    async def rotate_waitpoint_secret(
        self, kid: str, secret_hex: str, *, grace: Duration | None = None
    ) -> SecretRotation:
        """Sign new waitpoint tokens with (`kid`, `secret_hex`) on every partition; tokens of
        the outgoing kid stay valid for `grace` (default: the server's
        FF_WAITPOINT_HMAC_GRACE_MS). Retrying the same kid and secret is safe and converges, so
        the call is retried on UNAVAILABLE. Use a kid never used before.

        Raises:
            InvalidArgument: `invalid_kid`, `invalid_secret_hex`, `invalid_grace_ms`.
            AlreadyExists: `rotation_conflict`: the kid exists with another secret.
            ResourceExhausted: Another rotation is running.
        """
        request = admin_pb2.RotateWaitpointSecretRequest(new_kid=kid, new_secret_hex=secret_hex)
        if grace is not None:
            request.grace_ms = duration_ms(grace, "grace")
        reply = await self._call(
            self._admin.RotateWaitpointSecret,
            request,
            deadline=max(self.default_timeout, ROTATE_DEADLINE_S),
        )
        return SecretRotation(reply.new_kid, reply.rotated, tuple(reply.failed))

    async def waitpoint_kids(self, partition: int | None = None) -> WaitpointKids:
        """One partition's keystore (default 0): the signing kid and the older kids still in
        their grace period. No secrets."""
        request = admin_pb2.ListWaitpointKidsRequest()
        if partition is not None:
            request.partition = partition
        reply = await self._call(self._admin.ListWaitpointKids, request)
        kids = reply.kids
        return WaitpointKids(
            reply.partition,
            kids.current_kid if kids.HasField("current_kid") else None,
            {v.kid: v.expires_at_ms for v in kids.verifying},
        )
