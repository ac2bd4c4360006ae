"""The typed fence decoders: one per wire shape, same validation as the servicer had."""

from __future__ import annotations

import uuid

import pytest

from flowfabric.server.api import fences
from flowfabric.server.valkey.errors import InvalidInput
from flowfabric.server.valkey.functions import Fence
from flowfabric.server.valkey.ids import ExecutionId
from flowfabric.v1 import types_pb2 as t
from flowfabric.v1 import worker_pb2 as pb


def parse(value: str, field: str) -> ExecutionId:
    if not value:
        raise InvalidInput(field, f"{field} is required")
    return ExecutionId(value)  # type: ignore[call-arg]  # opaque text is enough here


EID = "{fp:0}:" + str(uuid.uuid4())
LEASE = t.LeaseHandle(
    execution_id=EID, lease_id="l1", lease_epoch=3, attempt_id="a1", attempt_index=2
)


def test_lease_handle_wins_and_is_checked_against_the_fence() -> None:
    got = fences.from_fence_message(parse, pb.CompleteExecutionRequest(lease=LEASE))
    assert (got.fence, got.attempt_index) == (Fence("l1", 3, "a1"), 2)
    same = t.LeaseFence(lease_id="l1", lease_epoch=3, attempt_id="a1")
    fences.from_fence_message(parse, pb.CompleteExecutionRequest(lease=LEASE, fence=same))
    other = t.LeaseFence(lease_id="l1", lease_epoch=4, attempt_id="a1")
    with pytest.raises(InvalidInput, match="fence differs"):
        fences.from_fence_message(parse, pb.CompleteExecutionRequest(lease=LEASE, fence=other))
    with pytest.raises(InvalidInput, match="differs from lease.execution_id"):
        fences.from_fence_message(
            parse, pb.CompleteExecutionRequest(lease=LEASE, execution_id="{fp:0}:x")
        )


def test_fence_message_zero_epoch_is_absent_and_no_fence_is_empty() -> None:
    f = t.LeaseFence(lease_id="l1", attempt_id="a1")
    got = fences.from_fence_message(
        parse, pb.FailExecutionRequest(execution_id=EID, fence=f, attempt_index=5)
    )
    assert (got.fence, got.attempt_index) == (Fence("l1", None, "a1"), 5)
    bare = fences.from_fence_message(parse, pb.DelayExecutionRequest(execution_id=EID))
    assert bare.fence == Fence()
    cancel = fences.from_fence_message(
        parse, pb.CancelLeasedExecutionRequest(execution_id=EID, fence=f)
    )
    assert cancel.attempt_index == 0


def test_loose_fields_and_execution_attempt() -> None:
    got = fences.from_loose_fields(
        parse,
        pb.UpdateProgressRequest(execution_id=EID, lease_id="l1", lease_epoch=2, attempt_id="a"),
    )
    assert (got.fence, got.attempt_index) == (Fence("l1", 2, "a"), 0)
    via = fences.from_loose_fields(parse, pb.AppendFrameRequest(lease=LEASE))
    assert via.attempt_index == 2
    res = fences.from_execution_attempt(
        parse, pb.GetResumeSignalsRequest(execution_id=EID, attempt_index=4)
    )
    assert (res.fence, res.attempt_index) == (Fence(), 4)
