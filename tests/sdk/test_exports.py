"""The public surface is pinned: changing it is a deliberate, reviewed act."""

from __future__ import annotations

import re
from pathlib import Path

import flowfabric

EXPORTS = [
    "Aborted",
    "AlreadyExists",
    "BudgetCreated",
    "BudgetExceeded",
    "BudgetStatus",
    "BulkAction",
    "Cancelled",
    "Client",
    "DeadlineExceeded",
    "ExecutionFailed",
    "ExecutionNotActive",
    "ExecutionState",
    "FailedPrecondition",
    "FlowBuilder",
    "FlowCancellation",
    "FlowFabricError",
    "FlowFailure",
    "FlowHandle",
    "FlowInfo",
    "FlowReplay",
    "FlowState",
    "HandlerError",
    "InvalidArgument",
    "InvalidFlow",
    "InvalidWaitpointToken",
    "Lane",
    "NonRetryableError",
    "NotFound",
    "Page",
    "PendingWaitpoint",
    "PermissionDenied",
    "QuotaPolicy",
    "QuotaPolicyCreated",
    "ResourceExhausted",
    "ResultNotReady",
    "RetryAfter",
    "RetryPolicy",
    "Schedule",
    "SecretRotation",
    "Signal",
    "SignalDelivery",
    "StaleLease",
    "Submitted",
    "SubmittedFlow",
    "SyncClient",
    "SyncTaskContext",
    "Task",
    "TaskContext",
    "TaskFailed",
    "TaskHandle",
    "TaskSuspended",
    "Unauthenticated",
    "Unavailable",
    "UsageOutcome",
    "UsageReport",
    "Waitpoint",
    "WaitpointClosed",
    "WaitpointEvent",
    "WaitpointKids",
    "Why",
    "WhyBudget",
    "WhyCapability",
    "WhyDependencies",
    "WhyKind",
    "WhyQuota",
    "WhySuspension",
    "WhyUpstream",
    "Worker",
    "WorkerStats",
    "task",
]


def test_all_is_pinned() -> None:
    assert sorted(flowfabric.__all__) == EXPORTS


def test_exports_come_from_private_modules() -> None:
    for name in flowfabric.__all__:
        assert getattr(flowfabric, name).__module__.startswith("flowfabric._"), name


def test_error_hierarchy() -> None:
    ff = flowfabric
    server_errors = [
        ff.Aborted, ff.AlreadyExists, ff.DeadlineExceeded, ff.FailedPrecondition,
        ff.InvalidArgument, ff.NotFound, ff.PermissionDenied, ff.ResourceExhausted,
        ff.Unauthenticated, ff.Unavailable,
    ]  # fmt: skip
    assert all(issubclass(cls, ff.FlowFabricError) for cls in server_errors)
    assert issubclass(ff.ResultNotReady, ff.NotFound)
    assert issubclass(ff.StaleLease, ff.Aborted)
    assert issubclass(ff.ExecutionNotActive, ff.FailedPrecondition)
    assert issubclass(ff.InvalidWaitpointToken, ff.PermissionDenied)
    assert issubclass(ff.WaitpointClosed, ff.FailedPrecondition)
    # control flow: a handler's `except Exception` must not swallow a suspension
    assert issubclass(ff.TaskSuspended, BaseException)
    assert not issubclass(ff.TaskSuspended, Exception)
    # raised by handlers, not by the server
    assert issubclass(ff.NonRetryableError, ff.HandlerError)
    assert issubclass(ff.RetryAfter, ff.HandlerError)
    assert issubclass(ff.BudgetExceeded, ff.NonRetryableError)
    exceeded = ff.BudgetExceeded("total_tokens", 90, 100)
    assert (exceeded.message, exceeded.category) == ("budget_exceeded", "budget_exceeded")
    assert not issubclass(ff.HandlerError, ff.FlowFabricError)
    assert ff.NonRetryableError("x").non_retryable
    assert ff.RetryAfter(300).retry_after_ms == 300


def test_sdk_modules_keep_out_of_each_others_private_members() -> None:
    """Client, Worker, the running task and the CLI share the transport instead of calling
    each other's internals."""
    root = Path(flowfabric.__file__).parent
    reach = re.compile(r"\b(?:client|ctx|worker|context|run)\._[a-z]|\._call\(")
    hits = [
        f"{path.name}:{n}: {line.strip()}"
        for path in sorted(root.glob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if reach.search(line)
    ]
    assert hits == []
