"""The client's FlowService part: build and submit flows, read them, wait for them, cancel them.

A flow is a DAG of executions submitted in one call (docs/flows.md). `flow()` returns a
`FlowBuilder` whose `submit()` comes back here; `describe_flow` returns a `FlowInfo` (state,
counts by member state, first failures, graph revision); `wait_flow` waits until the flow is
completed, failed or cancelled (on WatchFlow, or by polling DescribeFlow on a server without
it); `watch_flow` streams the flow's and its members' states; `replay_flow` re-runs what did
not complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable
from typing import Any, Literal

import grpc

from flowfabric import _tracing
from flowfabric._errors import DeadlineExceeded, FlowFabricError
from flowfabric._flows import FlowBuilder
from flowfabric._models import (
    ExecutionState,
    FlowCancellation,
    FlowInfo,
    FlowReplay,
    FlowState,
    SubmittedFlow,
)
from flowfabric._transport import Connected, pages
from flowfabric.v1 import flow_pb2, types_pb2

#: While waiting on the watch, the flow is also re-read this often (as `Client.wait` does).
WAIT_RECHECK_S = 2.0
#: wait_flow's polling of DescribeFlow: from 20 ms, 1.5 times longer each read, at most 1 s apart.
POLL_FIRST_S, POLL_FACTOR, POLL_MAX_S = 0.02, 1.5, 1.0


class FlowsMixin(Connected):
    """Flows: DAGs of executions (FlowService)."""

    def flow(
        self,
        kind: str = "dag",
        *,
        namespace: str = "default",
        flow_id: str | None = None,
        failure_policy: str = "",
    ) -> FlowBuilder[Awaitable[SubmittedFlow]]:
        """A new flow to build: `a = f.add("fetch", payload)`, `f.add("parse", after=[a])`,
        then `await f.submit()`. See `FlowBuilder`."""
        return FlowBuilder(
            kind, namespace=namespace, flow_id=flow_id, failure_policy=failure_policy,
            submitter=self.submit_flow,
        )  # fmt: skip

    async def submit_flow(
        self, flow: FlowBuilder[Any] | flow_pb2.SubmitFlowRequest
    ) -> SubmittedFlow:
        """Create the flow, its members and its edges in one atomic call.

        Members with no upstream are claimable at once; the others wait
        (`WAITING_CHILDREN`) until their join decides them. Retried on UNAVAILABLE: the flow
        id is fixed before the first attempt, so a repeat answers `duplicate`.

        Raises:
            InvalidFlow: The builder's local checks failed (nothing was sent).
            InvalidArgument: The server refused the graph (`invalid_dependency`,
                `invalid_policy_json`, `payload_too_large`, ...); nothing was written.
            FailedPrecondition: `cycle_detected`.
        """
        if isinstance(flow, FlowBuilder):
            request = flow.to_request()
        else:
            request = flow_pb2.SubmitFlowRequest()
            request.CopyFrom(flow)
            request.flow_id = request.flow_id or str(uuid.uuid4())
        with _tracing.producing(
            f"submit flow {request.flow_kind}", flow_id=request.flow_id,
            members=len(request.members),
        ) as context:  # fmt: skip
            request.trace_context.update(context)  # docs/observability.md#traces
            reply = await self._transport.unary(self._transport.flows.SubmitFlow, request)
        duplicate = reply.WhichOneof("outcome") == "already_submitted"
        body = reply.already_submitted if duplicate else reply.submitted
        states = {m.key: ExecutionState(m.public_state) for m in body.members}
        return SubmittedFlow(
            flow_id=body.flow_id,
            members={m.key: m.execution_id for m in body.members},
            states={} if duplicate else states,
            graph_revision=body.graph_revision,
            duplicate=duplicate,
        )

    async def describe_flow(self, flow_id: str) -> FlowInfo:
        """The flow's state, member counts by state, first failures and graph revision.

        Raises:
            NotFound: `flow_not_found`.
        """
        reply: flow_pb2.DescribeFlowResponse = await self._transport.unary(
            self._transport.flows.DescribeFlow, flow_pb2.DescribeFlowRequest(flow_id=flow_id)
        )
        return FlowInfo.from_proto(reply.flow, reply.members_by_state, reply.failures)

    async def wait_flow(
        self,
        flow_id: str,
        timeout: float | None = None,  # noqa: ASYNC109 (a bound on the whole wait, as `wait`)
    ) -> FlowInfo:
        """Wait until the flow is completed, failed or cancelled; return it then.

        Follows WatchFlow, re-reading the flow every couple of seconds meanwhile; on a server
        without WatchFlow it polls DescribeFlow (from 20 ms apart, backing off to 1 s).

        Raises:
            TimeoutError: Not terminal within `timeout` seconds.
            NotFound: `flow_not_found`.
        """
        end = None if timeout is None else time.monotonic() + timeout
        watcher = asyncio.ensure_future(self._watch_until_done(flow_id, end))
        try:
            while True:
                done, _ = await asyncio.wait({watcher}, timeout=WAIT_RECHECK_S)
                if done:
                    if watcher.result():
                        return await self.describe_flow(flow_id)
                    return await self._poll_flow(flow_id, end)  # no WatchFlow on this server
                info = await self.describe_flow(flow_id)
                if info.state.is_terminal:
                    return info
        finally:
            watcher.cancel()

    async def _watch_until_done(self, flow_id: str, end: float | None) -> bool:
        """Follow the watch until the flow is terminal: True; False if the server has no
        WatchFlow."""
        remaining = None if end is None else max(end - time.monotonic(), 0.001)
        try:
            stream = self.watch_flow(flow_id, timeout=remaining)
            async with contextlib.aclosing(stream) as events:
                async for event in events:
                    state = FlowState.parse(event.flow.flow.public_flow_state)
                    if event.WhichOneof("event") == "flow" and state.is_terminal:
                        return True
        except DeadlineExceeded as exc:
            raise TimeoutError(f"flow {flow_id} not terminal after the timeout") from exc
        except FlowFabricError as exc:
            if exc.code == grpc.StatusCode.UNIMPLEMENTED:
                return False
            raise
        return True  # the server ends the watch once the flow and its members are done

    async def _poll_flow(self, flow_id: str, end: float | None) -> FlowInfo:
        """DescribeFlow with backoff until terminal (or `end`, monotonic)."""
        started = time.monotonic()
        pause = POLL_FIRST_S
        while True:
            info = await self.describe_flow(flow_id)
            if info.state.is_terminal:
                return info
            if end is not None and time.monotonic() + pause > end:
                waited = time.monotonic() - started
                raise TimeoutError(f"flow {flow_id} not terminal after {waited:.1f} s")
            await asyncio.sleep(pause)
            pause = min(pause * POLL_FACTOR, POLL_MAX_S)

    async def cancel_flow(
        self,
        flow_id: str,
        reason: str = "",
        *,
        cancel_members: bool = True,
        wait: bool = False,
    ) -> FlowCancellation:
        """Cancel the flow; with `cancel_members` (policy `cancel_all`) also every member not
        yet finished (a running one loses its lease). With `wait`, the member cancels are done
        before the answer (`cancelled` or `partial`); otherwise the server may schedule them
        (`scheduled`). Cancelling a cancelled flow answers `cancelled` again.

        Raises:
            FailedPrecondition: `flow_already_terminal` (it completed or failed).
            NotFound: `flow_not_found`.
        """
        request = flow_pb2.CancelFlowRequest(
            flow_id=flow_id, reason=reason, wait=wait,
            cancellation_policy="cancel_all" if cancel_members else "cancel_flow_only",
        )  # fmt: skip
        reply = await self._transport.unary(self._transport.flows.CancelFlow, request)
        which = reply.WhichOneof("outcome")
        if which == "partially_cancelled":
            part = reply.partially_cancelled
            return FlowCancellation(
                "partial", part.cancellation_policy, tuple(part.member_execution_ids),
                tuple(part.failed_member_execution_ids),
            )  # fmt: skip
        if which == "cancellation_scheduled":
            sched = reply.cancellation_scheduled
            return FlowCancellation(
                "scheduled", sched.cancellation_policy, tuple(sched.member_execution_ids)
            )
        done = reply.cancelled
        return FlowCancellation(
            "cancelled", done.cancellation_policy, tuple(done.member_execution_ids)
        )

    async def describe_edge(self, flow_id: str, edge_id: str) -> types_pb2.EdgeSnapshot:
        """One edge's record (endpoints, kind, data passing).

        Raises:
            NotFound: `edge_not_found`.
        """
        reply: flow_pb2.DescribeEdgeResponse = await self._transport.unary(
            self._transport.flows.DescribeEdge,
            flow_pb2.DescribeEdgeRequest(flow_id=flow_id, edge_id=edge_id),
        )
        return reply.edge

    async def edges(
        self,
        execution_id: str,
        *,
        direction: Literal["outgoing", "incoming"] = "outgoing",
        flow_id: str = "",
        page_size: int = 1000,
    ) -> AsyncGenerator[types_pb2.EdgeSnapshot, None]:
        """The edges leaving (`outgoing`: to its dependents) or entering (`incoming`: from its
        upstreams) one member, page by page. An execution outside any flow has none."""

        async def fetch(token: str) -> flow_pb2.ListEdgesResponse:
            request = flow_pb2.ListEdgesRequest(
                flow_id=flow_id, page_size=page_size, page_token=token
            )
            if direction == "outgoing":
                request.direction.outgoing.from_node = execution_id
            else:
                request.direction.incoming.to_node = execution_id
            return await self._transport.unary(self._transport.flows.ListEdges, request)

        async for reply in pages(fetch):
            for edge in reply.edges:
                yield edge

    async def watch_flow(
        self,
        flow_id: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (the stream's deadline, as `watch`)
    ) -> AsyncGenerator[flow_pb2.WatchFlowResponse, None]:
        """The flow's record, then each member's state, then `synced`; after that every change
        of the flow (`flow`: snapshot and counts) or of a member (`member`: execution id,
        state, when), live. Ends once the flow is completed, failed or cancelled and every
        member has ended.

        A stream broken by UNAVAILABLE is re-opened; the server re-reads and sends the state
        again, and events already seen are dropped. `timeout` bounds the whole watch
        (DeadlineExceeded).
        """
        end = None if timeout is None else time.monotonic() + timeout
        request = flow_pb2.WatchFlowRequest(flow_id=flow_id)
        members: dict[str, int] = {}
        last_flow: bytes | None = None
        async for event in self._transport.server_stream(
            self._transport.flows.WatchFlow, lambda: request, end=end
        ):
            which = event.WhichOneof("event")
            if which == "member":
                if members.get(event.member.execution_id) == event.member.public_state:
                    continue
                members[event.member.execution_id] = event.member.public_state
            elif which == "flow":
                flow = event.flow.SerializeToString(deterministic=True)
                if flow == last_flow:
                    continue
                last_flow = flow
            yield event

    async def flow_members(self, flow_id: str) -> dict[str, ExecutionState]:
        """Every member's execution id and current state (the opening read of WatchFlow).

        Raises:
            NotFound: `flow_not_found`.
            FlowFabricError: UNIMPLEMENTED on a server without WatchFlow.
        """
        members: dict[str, ExecutionState] = {}
        async with contextlib.aclosing(self.watch_flow(flow_id)) as events:
            async for event in events:
                which = event.WhichOneof("event")
                if which == "member":
                    members[event.member.execution_id] = ExecutionState(event.member.public_state)
                elif which == "synced":
                    break
        return members

    async def replay_flow(self, flow_id: str, reason: str = "") -> FlowReplay:
        """Re-run every member that did not complete (failed, expired, cancelled, skipped):
        each returns to run, or to wait for its upstreams that are re-run too. Completed
        members keep their results; members still running are left alone; a cancelled flow is
        reopened. Not retried on UNAVAILABLE (a repeat could replay members a second time).

        Raises:
            NotFound: `flow_not_found`.
            FailedPrecondition: `max_replays_exhausted` (nothing was replayed).
        """
        reply = await self._transport.unary(
            self._transport.flows.ReplayFlow,
            flow_pb2.ReplayFlowRequest(flow_id=flow_id, reason=reason),
            retry=False,
        )
        if reply.WhichOneof("outcome") == "replayed":
            done = reply.replayed
            return FlowReplay(
                tuple(done.execution_ids), done.reopened_edge_count,
                FlowState.parse(done.public_flow_state),
            )  # fmt: skip
        return FlowReplay((), 0, FlowState.parse(reply.nothing_to_replay.public_flow_state))
