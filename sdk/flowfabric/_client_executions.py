"""The client's ExecutionService part: submit, read, operate on and wait for executions."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import time
from collections.abc import AsyncGenerator, Iterable, Mapping, Sequence
from typing import Any

from flowfabric import _tracing
from flowfabric._errors import DeadlineExceeded, FlowFabricError, ResultNotReady, from_item_error
from flowfabric._models import (
    INDEXES,
    STATE_INDEXES,
    ExecutionState,
    Page,
    Payload,
    Submitted,
    Time,
    encode_payload,
    to_ms,
)
from flowfabric._retry import RetryPolicy, policy_json
from flowfabric._signals import Duration, duration_ms
from flowfabric._transport import Connected
from flowfabric._why import Why
from flowfabric.v1 import execution_pb2, types_pb2

#: While waiting, the state is re-read this often in case a watch event was lost.
WAIT_RECHECK_S = 2.0


#: Per CreateExecutions call: the server's item bound and its request cap less a margin.
BATCH_JOBS = 1000
BATCH_BYTES = (2 << 20) - (64 << 10)


def chunks(
    requests: Sequence[execution_pb2.CreateExecutionRequest],
) -> Iterable[list[execution_pb2.CreateExecutionRequest]]:
    """`requests` in order, cut into calls of at most BATCH_JOBS items and BATCH_BYTES (an item
    larger than that goes alone; the server answers for it)."""
    chunk: list[execution_pb2.CreateExecutionRequest] = []
    size = 0
    for r in requests:
        n = r.ByteSize() + 8
        if chunk and (len(chunk) == BATCH_JOBS or size + n > BATCH_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(r)
        size += n
    if chunk:
        yield chunk


def add_budgets(policy: types_pb2.ExecutionPolicy, budgets: Sequence[str]) -> None:
    """Add `budgets` to the policy's `budget_ids` (those already there are kept once)."""
    if isinstance(budgets, str):
        raise TypeError("budgets is a list of budget ids, not one string")
    for budget_id in budgets:
        if budget_id not in policy.budget_ids:
            policy.budget_ids.append(budget_id)


def create_request(
    kind: str,
    payload: Payload = b"",
    *,
    lane: str = "default",
    priority: int = 0,
    delay_until: Time | None = None,
    deadline: Time | None = None,
    policy: types_pb2.ExecutionPolicy | RetryPolicy | Mapping[str, Any] | str | None = None,
    tags: Mapping[str, str] | None = None,
    idempotency_key: str | None = None,
    namespace: str = "default",
    execution_id: str | None = None,
    payload_encoding: str | None = None,
    budgets: Sequence[str] = (),
    quota: str | None = None,
    concurrency_key: str | None = None,
) -> execution_pb2.CreateExecutionRequest:
    """The CreateExecutionRequest of `Client.submit(kind, payload, **options)` (also each item of
    `submit_many`)."""
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
    elif isinstance(policy, types_pb2.ExecutionPolicy):
        request.policy.CopyFrom(policy)
    elif policy is not None:
        request.policy_json = policy_json(policy, budgets)
    if budgets and not request.policy_json:
        add_budgets(request.policy, budgets)
    if quota is not None:
        request.quota_policy_id = quota
    if concurrency_key is not None:
        request.concurrency_key = concurrency_key
    if idempotency_key is not None:
        request.idempotency_key = idempotency_key
    if delay_until is not None:
        request.delay_until = to_ms(delay_until)
    if deadline is not None:
        request.execution_deadline_at = to_ms(deadline)
    return request


class ExecutionsMixin(Connected):
    """Submitting, reading and operating on executions (ExecutionService)."""

    async def submit(
        self,
        kind: str,
        payload: Payload = b"",
        *,
        lane: str = "default",
        priority: int = 0,
        delay_until: Time | None = None,
        deadline: Time | None = None,
        policy: types_pb2.ExecutionPolicy | RetryPolicy | Mapping[str, Any] | str | None = None,
        tags: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        namespace: str = "default",
        execution_id: str | None = None,
        payload_encoding: str | None = None,
        budgets: Sequence[str] = (),
        quota: str | None = None,
        concurrency_key: str | None = None,
    ) -> Submitted:
        """Create an execution of `kind` on `lane`.

        `policy` is the message, a `RetryPolicy`, or the policy's JSON shape as a mapping or
        text (README "Execution policy"; the server checks it and names a bad field).
        `budgets` (budget ids) are added to the policy's `budget_ids`, and `quota` (a quota
        policy id) is sent as `quota_policy_id` (docs/budgets.md). `concurrency_key` (with
        `quota`) applies the policy's limits per key, e.g. per customer
        (docs/budgets.md#per-key-limits).

        Retried on UNAVAILABLE only when `idempotency_key` or `execution_id` makes a repeat
        harmless (it then answers `duplicate`); otherwise the error is raised.
        """
        request = create_request(
            kind, payload, lane=lane, priority=priority, delay_until=delay_until,
            deadline=deadline, policy=policy, tags=tags, idempotency_key=idempotency_key,
            namespace=namespace, execution_id=execution_id, payload_encoding=payload_encoding,
            budgets=budgets, quota=quota, concurrency_key=concurrency_key,
        )  # fmt: skip
        safe = bool(idempotency_key or execution_id)
        with _tracing.producing(f"submit {kind}", execution_kind=kind, lane_id=lane) as context:
            request.trace_context.update(context)  # docs/observability.md#traces
            reply = await self._transport.unary(
                self._transport.executions.CreateExecution, request, retry=safe
            )
        if reply.WhichOneof("outcome") == "duplicate":
            eid = reply.duplicate.execution_id
            return Submitted(eid, True, await self.state(eid))
        created = reply.created
        return Submitted(created.execution_id, False, ExecutionState(created.public_state))

    async def submit_many(
        self, jobs: Iterable[Mapping[str, Any]]
    ) -> list[Submitted | FlowFabricError]:
        """Create several executions with `CreateExecutions`: each job is a mapping of the
        arguments `submit` takes (`{"kind": "email", "payload": {...}, "idempotency_key": ...}`).

        Returns one answer per job, in order: a `Submitted` (`duplicate` True for an existing
        id or idempotency key, also for a second job with the same key in one call) or the
        `FlowFabricError` that job's `submit` would have raised; one bad job never affects the
        others. A job with an unknown argument raises TypeError before anything is sent. Sent
        in calls of at most 1000 jobs (and 2 MiB); a call that fails as a whole (e.g.
        UNAVAILABLE, retried only when every job has an idempotency key or execution id)
        raises, and the calls before it stand (README "Batch submit").
        """
        requests = [create_request(**job) for job in jobs]
        out: list[Submitted | FlowFabricError] = []
        with _tracing.producing("submit_many", jobs=len(requests)) as context:
            for r in requests:
                r.trace_context.update(context)
            await self._submit_chunks(requests, out)
        return out

    async def _submit_chunks(
        self, requests: list[execution_pb2.CreateExecutionRequest],
        out: list[Submitted | FlowFabricError],
    ) -> None:  # fmt: skip
        for chunk in chunks(requests):
            safe = all(r.idempotency_key or r.execution_id for r in chunk)
            reply = await self._transport.unary(
                self._transport.executions.CreateExecutions,
                execution_pb2.CreateExecutionsRequest(items=chunk),
                retry=safe,
            )
            out += await asyncio.gather(*(self._answer(r) for r in reply.results))

    async def _answer(
        self, r: execution_pb2.CreateExecutionsResponse.Result
    ) -> Submitted | FlowFabricError:
        which = r.WhichOneof("outcome")
        if which == "created":
            return Submitted(r.created.execution_id, False, ExecutionState(r.created.public_state))
        if which == "duplicate":
            eid = r.duplicate.execution_id
            return Submitted(eid, True, await self.state(eid))
        e = r.error
        return from_item_error(e.code, e.reason, e.message, e.metadata)

    async def get(self, execution_id: str) -> types_pb2.ExecutionInfo:
        """The full execution record (state vector included)."""
        reply: execution_pb2.GetExecutionResponse = await self._transport.unary(
            self._transport.executions.GetExecution,
            execution_pb2.GetExecutionRequest(execution_id=execution_id),
        )
        return reply.execution

    async def describe(self, execution_id: str) -> types_pb2.ExecutionSnapshot:
        """A snapshot: current attempt and lease, tags, totals."""
        reply: execution_pb2.DescribeExecutionResponse = await self._transport.unary(
            self._transport.executions.DescribeExecution,
            execution_pb2.DescribeExecutionRequest(execution_id=execution_id),
        )
        return reply.snapshot

    async def why(self, execution_id: str) -> Why:
        """Why the execution is not running (or that it is): what holds it, a sentence, an ETA
        when one is known, and the detail of the kind (its unresolved upstreams, the missing
        capabilities, its waitpoint, the budget or quota block)."""
        reply: execution_pb2.DescribeExecutionResponse = await self._transport.unary(
            self._transport.executions.DescribeExecution,
            execution_pb2.DescribeExecutionRequest(execution_id=execution_id),
        )
        return Why.from_proto(reply)

    async def result(self, execution_id: str) -> bytes:
        """The result bytes of a completed execution, verbatim (b"" if it completed without one).

        Raises:
            ResultNotReady: The execution has not finished yet.
            ExecutionFailed: It failed, was cancelled or expired (`.failure_reason`).
            NotFound: No such execution.
        """
        try:
            reply: execution_pb2.GetExecutionResultResponse = await self._transport.unary(
                self._transport.executions.GetExecutionResult,
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
        reply = await self._transport.unary(
            self._transport.executions.CancelExecution,
            execution_pb2.CancelExecutionRequest(execution_id=execution_id, reason=reason),
        )
        return ExecutionState(reply.cancelled.public_state)

    async def replay(self, execution_id: str) -> ExecutionState:
        """Re-run a terminal execution under the same id (a new `replay` attempt)."""
        reply = await self._transport.unary(
            self._transport.executions.ReplayExecution,
            execution_pb2.ReplayExecutionRequest(execution_id=execution_id),
        )
        return ExecutionState(reply.replayed.public_state)

    async def change_priority(self, execution_id: str, priority: int) -> None:
        """Re-prioritise a waiting execution (clamped to 0..9000 by the server)."""
        await self._transport.unary(
            self._transport.executions.ChangePriority,
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
        reply = await self._transport.unary(
            self._transport.executions.ResumeExecution, request, retry=False
        )
        return ExecutionState(reply.resumed.public_state)

    async def list(
        self,
        *,
        lane: str = "default",
        state: str | int = "eligible",
        limit: int = 50,
        page_token: str = "",
        partition: int | None = None,
        public_states: Iterable[ExecutionState | int] = (),
    ) -> Page:
        """One page of one lane's executions in one index (`eligible`, `delayed`, `active`,
        `suspended` or `terminal`), or of one public state (`waiting`, `completed`, `failed`,
        `cancelled`, `expired`, `skipped`: its index with that filter).

        With a public-state filter a page may hold fewer than `limit` executions, even none,
        while `next_page_token` is set (docs/lifecycle.md#reads); `list_all` pages through.
        """
        filters = [int(s) for s in public_states]
        if isinstance(state, str) and state in STATE_INDEXES:
            filters.append(ExecutionState[state.upper()].value)
            state = STATE_INDEXES[state]
        request = execution_pb2.ListExecutionsRequest(
            lane=lane,
            state=INDEXES[state] if isinstance(state, str) else state,  # type: ignore[arg-type]
            limit=limit,
            page_token=page_token,
            public_states=filters,  # type: ignore[arg-type]
        )
        if partition is not None:
            request.partition = partition
        reply = await self._transport.unary(self._transport.executions.ListExecutions, request)
        return Page(builtins.list(reply.executions), reply.next_page_token)

    async def list_all(
        self,
        *,
        lane: str = "default",
        state: str | int = "eligible",
        page_size: int = 200,
        partition: int | None = None,
        public_states: Iterable[ExecutionState | int] = (),
    ) -> AsyncGenerator[types_pb2.ExecutionSummary, None]:
        """Every execution of the index (or public state, as `list`), page by page."""
        token = ""
        while True:
            page = await self.list(
                lane=lane, state=state, limit=page_size, page_token=token, partition=partition,
                public_states=public_states,
            )  # fmt: skip
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
        progress: bool = False,
    ) -> AsyncGenerator[execution_pb2.WatchExecutionResponse, None]:
        """The current state, then every public-state change; ends after a terminal state.

        With `progress=True` each progress update the handler reports (`ctx.progress`) comes
        too, as a message with the same state and new `progress_pct` / `progress_message`.
        A stream broken by UNAVAILABLE is re-opened (the server re-sends the current state;
        repeats are dropped). `timeout` bounds the whole watch (DeadlineExceeded).
        """
        end = None if timeout is None else time.monotonic() + timeout
        request = execution_pb2.WatchExecutionRequest(execution_id=execution_id)
        last: tuple[int, int] | None = None
        async for message in self._transport.server_stream(
            self._transport.executions.WatchExecution, lambda: request, end=end
        ):
            seen = (message.public_state, message.progress_updated_at if progress else 0)
            if seen != last:
                last = seen
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
        reply = await self._transport.unary(
            self._transport.executions.GetExecutionState,
            execution_pb2.GetExecutionStateRequest(execution_id=execution_id),
        )
        return ExecutionState(reply.public_state)
