"""The client's FlowService part: build and submit flows, read them, wait for them, cancel them.

A flow is a DAG of executions submitted in one call (docs/flows.md). `flow()` returns a
`FlowBuilder` whose `submit()` comes back here; `describe_flow` returns a `FlowInfo` (state,
counts by member state, first failures, graph revision); `wait_flow` waits until the flow is
completed, failed or cancelled.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable
from typing import Any, Literal

from flowfabric._flows import FlowBuilder
from flowfabric._models import (
    ExecutionState,
    FlowCancellation,
    FlowInfo,
    SubmittedFlow,
)
from flowfabric._transport import Connected
from flowfabric.v1 import flow_pb2, types_pb2

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

        Raises:
            TimeoutError: Not terminal within `timeout` seconds.
            NotFound: `flow_not_found`.
        """
        end = None if timeout is None else time.monotonic() + timeout
        return await self._poll_flow(flow_id, end)

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
        token = ""
        while True:
            request = flow_pb2.ListEdgesRequest(
                flow_id=flow_id, page_size=page_size, page_token=token
            )
            if direction == "outgoing":
                request.direction.outgoing.from_node = execution_id
            else:
                request.direction.incoming.to_node = execution_id
            reply = await self._transport.unary(self._transport.flows.ListEdges, request)
            for edge in reply.edges:
                yield edge
            if not reply.next_page_token:
                return
            token = reply.next_page_token
