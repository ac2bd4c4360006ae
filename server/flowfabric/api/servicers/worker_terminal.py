"""WorkerService, part 4: the fenced terminal and pausing transitions (CompleteExecution,
CompleteExecutions, FailExecution, CancelLeasedExecution, DelayExecution, MoveToWaitingChildren).

A retry after a lost reply is recognised by the function itself (docs/lifecycle.md#replays): its
`replayed` reply variant is answered as the success variant with `replayed = true`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

from flowfabric.server.api import fences, limits
from flowfabric.server.api.limits import bounds
from flowfabric.server.api.servicers.base import ServerContext
from flowfabric.server.api.servicers.worker_claims import (
    WorkerParts,
    item_error,
    task_message,
)
from flowfabric.server.engine.scheduler import ClaimRequest
from flowfabric.server.valkey.codec import cancel_source
from flowfabric.server.valkey.errors import FlowFabricError, InvalidInput
from flowfabric.server.valkey.functions import Claimer, Fence, Outcome
from flowfabric.server.valkey.functions.execution import DelayReplayed, FailReplayed, Replayed
from flowfabric.server.valkey.ids import ExecutionId, parse_execution_id
from flowfabric.v1 import types_pb2 as t
from flowfabric.v1 import worker_pb2 as pb

MAX_COMPLETIONS = bounds.BATCH_ITEMS.hi

log = logging.getLogger("flowfabric.rpc")


def source_text(source: int, fenced: bool) -> str:
    """Unfenced worker calls must say OPERATOR_OVERRIDE explicitly (UNSPECIFIED is refused)."""
    if source == t.CANCEL_SOURCE_UNSPECIFIED and not fenced:
        raise FlowFabricError(
            "fence_required",
            message="unfenced calls need source = CANCEL_SOURCE_OPERATOR_OVERRIDE",
        )
    return cancel_source(source, "lease_holder")


CompleteArgs = tuple[ExecutionId, Fence, bytes, str, str]


def complete_args(ctx: ServerContext, request: pb.CompleteExecutionRequest) -> CompleteArgs:
    """A completion checked at the edge: (eid, fence, result, encoding, source)."""
    limits.control_part(request, request.result_payload, "result_payload")
    eid, fence, _ = fences.of_request(ctx, request).parts()
    source = source_text(request.source, bool(fence.lease_id))
    return eid, fence, request.result_payload, request.result_encoding, source


def completed(eid: ExecutionId, reply: Outcome | Replayed) -> pb.CompleteExecutionResponse:
    done = pb.CompleteExecutionResponse.Completed(
        execution_id=str(eid), public_state=t.PUBLIC_STATE_COMPLETED
    )
    return pb.CompleteExecutionResponse(completed=done, replayed=isinstance(reply, Replayed))


async def complete_execution(
    ctx: ServerContext, request: pb.CompleteExecutionRequest
) -> pb.CompleteExecutionResponse:
    """One completion: CompleteExecution."""
    args = complete_args(ctx, request)
    return completed(args[0], await ctx.functions.execution.complete_execution(*args))


class TerminalMixin(WorkerParts):
    """The fenced terminal and pausing transitions."""

    async def CompleteExecution(
        self, request: pb.CompleteExecutionRequest, context: Any
    ) -> pb.CompleteExecutionResponse:
        return await complete_execution(self.ctx, request)

    async def CompleteExecutions(
        self, request: pb.CompleteExecutionsRequest, context: Any
    ) -> pb.CompleteExecutionsResponse:
        """Each item as CompleteExecution, one FCALL per partition; one result per item, in order.
        With `claim`, then claims as ClaimNext with `wait_ms` = 0 would."""
        if not request.items:
            raise InvalidInput("items", "at least one completion is required")
        if len(request.items) > MAX_COMPLETIONS:
            raise InvalidInput("items", f"at most {MAX_COMPLETIONS} completions per call")
        claim = self._claim_after(request.claim) if request.HasField("claim") else None
        limit = limits.REQUEST_LIMITS["/flowfabric.v1.WorkerService/CompleteExecution"]
        result = pb.CompleteExecutionsResponse.Result

        # Each item checked as CompleteExecution would be, then one ff_complete_executions
        # per partition, the partitions in parallel (docs/lifecycle.md#batched-functions).
        results: list[pb.CompleteExecutionsResponse.Result | None] = [None] * len(request.items)
        groups: dict[str, list[tuple[int, str, CompleteArgs]]] = {}
        for i, item in enumerate(request.items):
            eid_text = item.lease.execution_id if item.HasField("lease") else item.execution_id
            try:
                if item.ByteSize() > limit:
                    raise FlowFabricError(
                        "payload_too_large",
                        message=f"item is {item.ByteSize()} bytes; the limit is {limit}",
                        metadata={"limit_bytes": str(limit)},
                    )
                args = complete_args(self.ctx, item)
            except FlowFabricError as exc:
                results[i] = result(execution_id=eid_text, error=item_error(exc))
                continue
            groups.setdefault(args[0].tag, []).append((i, eid_text, args))

        await asyncio.gather(*(self._complete_partition(g, results) for g in groups.values()))
        reply = pb.CompleteExecutionsResponse(results=[r for r in results if r is not None])
        if claim is not None:
            # A flow member's completion released its dependents on its own partition, in
            # the call that just returned; its announcement is still on its way, so look
            # there first (docs/lifecycle.md#work-off-the-lane-partition).
            for res in reply.results:
                if res.HasField("completed"):
                    with contextlib.suppress(FlowFabricError):
                        eid = parse_execution_id(res.execution_id, self.ctx.partitions)
                        for lane in claim.lanes:
                            if eid.partition not in self.scheduler.lane_parts.of(lane):
                                self.scheduler.hints.note(lane, eid.partition)
            await self._claim_into(claim, reply)
        return reply

    async def _complete_partition(
        self,
        group: list[tuple[int, str, CompleteArgs]],
        results: list[pb.CompleteExecutionsResponse.Result | None],
    ) -> None:
        """One ff_complete_executions for the items of one partition; each item's result into
        its slot of `results`."""
        result = pb.CompleteExecutionsResponse.Result
        replies: Sequence[Outcome | Replayed | FlowFabricError]
        try:
            replies = await self.fn.execution.complete_executions([a for _, _, a in group])
        except FlowFabricError as exc:  # the call itself failed: every item says so
            replies = [exc] * len(group)
        except Exception:  # as the interceptor does for a whole call: logged, not leaked
            log.exception("unexpected error completing a batch of %d", len(group))
            replies = [FlowFabricError("protocol_error", message="internal error")] * len(group)
        for (i, eid_text, args), reply in zip(group, replies, strict=True):
            if isinstance(reply, FlowFabricError):
                results[i] = result(execution_id=eid_text, error=item_error(reply))
            else:
                results[i] = result(execution_id=eid_text, completed=completed(args[0], reply))

    def _claim_after(self, claim: pb.ClaimNextRequest) -> ClaimRequest:
        """The claim of a CompleteExecutions, validated before any item runs."""
        if claim.wait_ms:
            raise InvalidInput("claim.wait_ms", "a claim after completions cannot wait")
        limits.check(bounds.MAX_TASKS, claim.max_tasks, "claim.max_tasks")
        lanes, caps = list(claim.lane_ids), list(claim.capabilities)
        return self._claim_request(claim, lanes, caps, max(claim.max_tasks, 1))

    async def _claim_into(self, req: ClaimRequest, reply: pb.CompleteExecutionsResponse) -> None:
        """Claim after the completions committed; a failure is reported, never raised (the
        completions stand)."""
        try:
            claimed = await self.scheduler.claim_next(req, 0)
        except FlowFabricError as exc:
            reply.claim_error.CopyFrom(item_error(exc))
            return
        except Exception:  # as the interceptor does for a whole call: logged, not leaked
            log.exception("unexpected error claiming after completions")
            internal = FlowFabricError("protocol_error", message="internal error")
            reply.claim_error.CopyFrom(item_error(internal))
            return
        who = Claimer(req.worker_id, req.worker_instance_id, "", req.capabilities_csv)
        reply.claimed.extend(task_message(c, who, req.lease_ttl_ms) for c in claimed)

    async def FailExecution(
        self, request: pb.FailExecutionRequest, context: Any
    ) -> pb.FailExecutionResponse:
        eid, fence, _ = fences.of_request(self.ctx, request).parts()
        source = source_text(request.source, bool(fence.lease_id))
        retry_after = limits.optional(bounds.HORIZON_MS, request, "retry_after_ms")
        if retry_after is not None and request.retry_policy_json:
            raise InvalidInput(
                "retry_after_ms", "retry_after_ms and retry_policy_json are mutually exclusive"
            )
        bounds.check_size(bounds.FAILURE_DETAILS_BYTES, request.failure_details, "failure_details")
        reply = await self.fn.execution.fail_execution(
            eid, fence, request.failure_reason, request.failure_category, source,
            request.retry_policy_json, retry_after, request.failure_details,
        )  # fmt: skip
        replayed = isinstance(reply, FailReplayed)
        if reply.outcome == "retry_scheduled":
            return pb.FailExecutionResponse(
                retry_scheduled=pb.FailExecutionResponse.RetryScheduled(
                    delay_until=reply.delay_until or 0,
                    next_attempt_index=reply.next_attempt_index or 0,
                ),
                replayed=replayed,
            )
        return pb.FailExecutionResponse(
            terminal_failed=pb.FailExecutionResponse.TerminalFailed(), replayed=replayed
        )

    async def CancelLeasedExecution(
        self, request: pb.CancelLeasedExecutionRequest, context: Any
    ) -> pb.CancelLeasedExecutionResponse:
        if request.HasField("lease"):
            fence_msg = request.fence if request.HasField("fence") else None
            f = fences.of_handle(self.ctx, request.execution_id, request.lease, fence_msg)
        else:
            msg = request.fence if request.HasField("fence") else None
            f = fences.of_fence(self.ctx, request.execution_id, msg, 0)
        eid, fence = f.eid, f.fence
        if not fence.lease_id:
            raise FlowFabricError("fence_required", message="CancelLeasedExecution needs a fence")
        if not (fence.lease_epoch and fence.attempt_id):
            # ff_cancel_execution accepts a lease id alone (an operator's CancelExecution may
            # name only the lease); this RPC is the holder's, so its fence is the whole triple
            raise FlowFabricError(
                "partial_fence_triple",
                message="fence needs lease_id, lease_epoch and attempt_id (or pass `lease`)",
            )
        reply = await self.fn.execution.cancel_execution(eid, request.reason, "lease_holder", fence)
        done = pb.CancelLeasedExecutionResponse.Cancelled(
            execution_id=str(eid), public_state=t.PUBLIC_STATE_CANCELLED
        )
        return pb.CancelLeasedExecutionResponse(
            cancelled=done, replayed=isinstance(reply, Replayed)
        )

    async def DelayExecution(
        self, request: pb.DelayExecutionRequest, context: Any
    ) -> pb.DelayExecutionResponse:
        eid, fence, _ = fences.of_request(self.ctx, request).parts()
        source = source_text(request.source, bool(fence.lease_id))
        if request.delay_until <= 0:
            raise InvalidInput("delay_until", "delay_until is required (ms since the epoch)")
        # the horizon from now is the function's check: only it reads Valkey's clock
        limits.check(bounds.TIMESTAMP_MS, request.delay_until, "delay_until")
        reply = await self.fn.execution.delay_execution(eid, fence, request.delay_until, source)
        done = pb.DelayExecutionResponse.Delayed(
            execution_id=str(eid), public_state=t.PUBLIC_STATE_DELAYED
        )
        return pb.DelayExecutionResponse(delayed=done, replayed=isinstance(reply, DelayReplayed))

    async def MoveToWaitingChildren(
        self, request: pb.MoveToWaitingChildrenRequest, context: Any
    ) -> pb.MoveToWaitingChildrenResponse:
        eid, fence, _ = fences.of_request(self.ctx, request).parts()
        source = source_text(request.source, bool(fence.lease_id))
        reply = await self.fn.execution.move_to_waiting_children(eid, fence, source)
        done = pb.MoveToWaitingChildrenResponse.Moved(
            execution_id=str(eid), public_state=t.PUBLIC_STATE_WAITING_CHILDREN
        )
        return pb.MoveToWaitingChildrenResponse(moved=done, replayed=isinstance(reply, Replayed))
