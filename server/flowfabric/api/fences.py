"""The lease fence of a worker request, one typed decoder per wire shape.

A request names its lease in one of three shapes: a `LeaseHandle` (`lease`, as a claim returned
it; a `fence` given alongside must agree with it), a `LeaseFence` message (`fence`, with
`execution_id` and `attempt_index`), or loose `lease_id` / `lease_epoch` / `attempt_id` fields
next to `execution_id`. Epochs start at 1, so a proto3 `lease_epoch` of 0 is "absent": a fence
missing only its epoch is refused by the function as `partial_fence_triple`, and an empty fence
is no fence at all.
"""

from __future__ import annotations

from dataclasses import dataclass

from flowfabric.server.api.servicers.base import ServerContext
from flowfabric.server.valkey.errors import InvalidInput
from flowfabric.server.valkey.functions import Fence
from flowfabric.server.valkey.ids import ExecutionId
from flowfabric.v1 import types_pb2 as t
from flowfabric.v1 import worker_pb2 as pb

# The requests with a `lease` handle and a `fence` message (and `execution_id`, `attempt_index`).
LeaseOrFenceRequest = (
    pb.CompleteExecutionRequest | pb.FailExecutionRequest | pb.DelayExecutionRequest
    | pb.MoveToWaitingChildrenRequest | pb.RenewLeaseRequest | pb.SuspendRequest
)  # fmt: skip
# The requests with a `lease` handle and loose `lease_id` / `lease_epoch` / `attempt_id` fields.
LooseFenceRequest = (
    pb.UpdateProgressRequest | pb.AppendFrameRequest | pb.CreatePendingWaitpointRequest
)


@dataclass(frozen=True)
class Fenced:
    """The execution a request names, its fence and its attempt index."""

    eid: ExecutionId
    fence: Fence
    attempt_index: int

    def parts(self) -> tuple[ExecutionId, Fence, int]:
        return self.eid, self.fence, self.attempt_index


def of_handle(
    ctx: ServerContext, execution_id: str, handle: t.LeaseHandle, fence: t.LeaseFence | None = None
) -> Fenced:
    """A `LeaseHandle`; `execution_id` and `fence`, when given, must agree with it."""
    if execution_id and execution_id != handle.execution_id:
        raise InvalidInput("execution_id", "execution_id differs from lease.execution_id")
    eid = ctx.execution_id(handle.execution_id, "lease.execution_id")
    if fence is not None and (fence.lease_id, fence.lease_epoch, fence.attempt_id) != (
        handle.lease_id, handle.lease_epoch, handle.attempt_id,
    ):  # fmt: skip
        raise InvalidInput("fence", "fence differs from the lease handle")
    return Fenced(
        eid, Fence(handle.lease_id, handle.lease_epoch or None, handle.attempt_id),
        handle.attempt_index,
    )  # fmt: skip


def of_fence(
    ctx: ServerContext, execution_id: str, fence: t.LeaseFence | None, attempt_index: int
) -> Fenced:
    """A `LeaseFence` message next to `execution_id` (None: the request is unfenced)."""
    eid = ctx.execution_id(execution_id)
    if fence is None:
        return Fenced(eid, Fence(), attempt_index)
    return Fenced(
        eid, Fence(fence.lease_id, fence.lease_epoch or None, fence.attempt_id), attempt_index
    )


def of_fields(
    ctx: ServerContext, execution_id: str, lease_id: str, lease_epoch: int, attempt_id: str
) -> Fenced:
    """Loose `lease_id` / `lease_epoch` / `attempt_id` fields; the attempt index is 0 (such
    requests carry their own `attempt_index` where they need one)."""
    eid = ctx.execution_id(execution_id)
    return Fenced(eid, Fence(lease_id, lease_epoch or None, attempt_id), 0)


def of_request(ctx: ServerContext, request: LeaseOrFenceRequest) -> Fenced:
    """The lease handle when given (a `fence` alongside must agree), else the fence message,
    else unfenced."""
    fence = request.fence if request.HasField("fence") else None
    if request.HasField("lease"):
        return of_handle(ctx, request.execution_id, request.lease, fence)
    return of_fence(ctx, request.execution_id, fence, request.attempt_index)


def of_loose_request(ctx: ServerContext, request: LooseFenceRequest) -> Fenced:
    """The lease handle when given, else the loose fence fields."""
    if request.HasField("lease"):
        return of_handle(ctx, request.execution_id, request.lease)
    return of_fields(
        ctx, request.execution_id, request.lease_id, request.lease_epoch, request.attempt_id
    )
