"""What a handler sees of its task: inputs, progress, and whether it still holds the lease.

`TaskContext` is the public face of the worker's private `RunningTask` (`_running.py`), which
holds the lease, renews it, batches the output frames and makes the suspension calls.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterable, Iterable, Mapping, Sequence
from typing import Any, Literal

from flowfabric._client import Client, Payload
from flowfabric._client_budgets import report, usage_request
from flowfabric._models import UsageReport
from flowfabric._running import RunningTask
from flowfabric._signals import Duration, Signal, duration_ms
from flowfabric._transport import transport_of
from flowfabric.v1 import types_pb2, worker_pb2

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
        transport = transport_of(self._client)
        await transport.unary(transport.workers.CloseWaitpoint, request)

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

    def __init__(self, running: RunningTask) -> None:
        self._run = running
        self.lease_lost: asyncio.Event = running.lease_lost

    @property
    def lease_lost_reason(self) -> str | None:
        """Why the lease was lost (e.g. `lease_revoked`); None while it is held."""
        return self._run.lease_lost_reason

    @property
    def frames_appended(self) -> int:
        """Frames the server has appended so far (counted from AppendFrames answers)."""
        return self._run.frames_appended

    @property
    def resume_signals(self) -> list[Signal]:
        """The signals that met the resume condition of the suspension this attempt resumed
        from (set before the handler runs), or that `suspend` found already buffered. Empty on
        a first run and after an operator or timeout resume."""
        return self._run.resume_signals

    @resume_signals.setter
    def resume_signals(self, signals: list[Signal]) -> None:
        self._run.resume_signals = signals

    # -- inputs -----------------------------------------------------------------------------------

    @property
    def execution_id(self) -> str:
        return self._run.task.lease.execution_id

    @property
    def attempt_index(self) -> int:
        return self._run.task.lease.attempt_index

    @property
    def attempt_id(self) -> str:
        return self._run.task.lease.attempt_id

    @property
    def attempt_type(self) -> str:
        """Why this attempt exists: `initial`, `retry`, `reclaim` or `replay`."""
        return attempt_type_name(self._run.task.attempt_type)

    @property
    def resumed(self) -> bool:
        """True when this claim resumed a paused attempt (same attempt index, new lease): after
        a suspension (see `resume_signals`), or after the work was handed back unfinished."""
        return self._run.task.resumed

    @property
    def kind(self) -> str:
        return self._run.task.execution_kind

    @property
    def lane(self) -> str:
        return self._run.task.lease.lane_id

    @property
    def namespace(self) -> str:
        return self._run.task.namespace

    @property
    def priority(self) -> int:
        return self._run.task.priority

    @property
    def tags(self) -> dict[str, str]:
        return dict(self._run.task.tags)

    @property
    def payload(self) -> bytes:
        """The input payload, verbatim."""
        return self._run.task.payload

    @property
    def payload_encoding(self) -> str:
        return self._run.task.payload_encoding

    @property
    def lease(self) -> types_pb2.LeaseHandle:
        """The lease handle (a copy) for calls the SDK does not wrap."""
        handle = types_pb2.LeaseHandle()
        handle.CopyFrom(self._run.task.lease)
        return handle

    def json(self) -> Any:
        """The payload decoded as JSON (None for an empty payload)."""
        return json.loads(self._run.task.payload) if self._run.task.payload else None

    # -- state --------------------------------------------------------------------------------

    @property
    def cancelled(self) -> bool:
        """True once the handler must stop: the lease was lost or the worker is shutting down."""
        return self.lease_lost.is_set() or self._run.shutdown_cancel

    @property
    def is_lease_healthy(self) -> bool:
        """False once the lease is lost or after 3 consecutive failed renewals."""
        return self._run.healthy

    # -- calls --------------------------------------------------------------------------------

    async def progress(self, pct: int | None = None, message: str | None = None) -> None:
        """Record progress (0..100 and/or a message) on the execution.

        A short server outage is ridden out: the call is retried while the lease may still be
        held (see the README's "running a worker as a daemon").

        Raises:
            StaleLease, ExecutionNotActive: The lease is lost (`lease_lost` is set as well).
            Unavailable: The outage outlasted the lease.
        """
        await self._run.progress(pct, message)

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

        A batch is retried through a short server outage while the lease may still be held,
        in order; meanwhile the next batch fills, and `emit` waits once it is full. A batch
        whose reply was lost is read back and only its missing frames are sent again (the first
        batch of a resumed attempt is the exception: at-least-once).

        Raises:
            FlowFabricError: A previous batch was refused (e.g. `stale_owner_cannot_append`
                after the lease was lost, or `stream_closed`), or its outage outlasted the
                lease (`Unavailable`).
        """
        await self._run.emit(frame_type, payload, encoding, correlation_id, metadata)

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
        await self._run.flush()

    async def report_usage(
        self,
        budget_id: str,
        usage: Mapping[str, int] | None = None,
        /,
        *,
        dedup_key: str | None = None,
        **deltas: int,
    ) -> UsageReport:
        """Report usage (e.g. `total_tokens=120`, or a mapping for names such as `custom:x`)
        against a budget, as `Client.report_usage`: breaches are outcomes, not exceptions.

        On a hard breach nothing was applied, and the handler SHOULD stop and fail its
        execution with failure reason `budget_exceeded`; `raise_if_hard_breach()` does that
        (it raises `BudgetExceeded`, a `NonRetryableError`):

        ```python
        (await ctx.report_usage(budget_id, total_tokens=n)).raise_if_hard_breach()
        ```

        No lease is needed (any holder of the budget id may report), so the report is not
        fenced by this task's lease. It names this execution, so a reservation it holds on
        the budget is settled by what it reports (docs/budgets.md#reservations). A `dedup_key`
        (e.g. `f"{budget_id}:{ctx.execution_id}:{step}"`) makes it safe to repeat after a
        reclaim and lets it be retried on UNAVAILABLE.

        A hard breach of a `cancel_running` budget revokes this task's lease when it runs on
        that budget: the handler is then cancelled (at its next await), as on any lost lease.
        """
        transport = transport_of(self._run.client)
        request = usage_request(budget_id, usage, dedup_key, deltas, self.execution_id)
        report_ = await report(transport, request)
        if report_.execution_revoked:
            self._run.lose("lease_revoked")  # docs/budgets.md#hard-limit-actions
            await asyncio.sleep(0)  # in the handler's task: the cancellation lands here
        return report_

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
        waitpoint_id, waitpoint_key, token = await self._run.create_waitpoint(
            duration_ms(expires_in, "expires_in"), key
        )
        return PendingWaitpoint(
            self._run.client, self.execution_id, waitpoint_id, waitpoint_key, token
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
        if self._run.suspended is not None:
            raise RuntimeError("the task is already suspended")
        request = self._run.suspend_request(
            signals, mode, min_count, condition, timeout, on_timeout, reason, continuation
        )
        if waitpoint is not None:
            request.waitpoint_id = waitpoint.id
            request.use_pending_waitpoint = True
        return await self._run.suspend(request)

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
