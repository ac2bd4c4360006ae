"""FlowFabric: a durable execution control plane on gRPC and Valkey Functions.

The Python SDK: `Client` (async) and `SyncClient` submit and operate on executions and deliver
signals; `Worker` runs `async` handlers for the executions it claims, which may suspend until
signals arrive (`TaskContext.suspend`, `TaskContext.wait_for_signal`); `Client.flow()` builds
a DAG of executions (`FlowBuilder`) submitted in one call; budgets and quota policies are
created, read and charged through the client (`create_budget`, `report_usage`, ...) and by
handlers (`TaskContext.report_usage`). Everything public is re-exported here from private
modules; `tests/sdk/test_exports.py` pins the list.
"""

from flowfabric._client import Client, ExecutionState, Page, Submitted
from flowfabric._client_lanes import BulkAction, Lane
from flowfabric._client_schedules import Schedule
from flowfabric._errors import (
    Aborted,
    AlreadyExists,
    BudgetExceeded,
    DeadlineExceeded,
    ExecutionFailed,
    ExecutionNotActive,
    FailedPrecondition,
    FlowFabricError,
    HandlerError,
    InvalidArgument,
    InvalidWaitpointToken,
    NonRetryableError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    ResultNotReady,
    RetryAfter,
    StaleLease,
    TaskSuspended,
    Unauthenticated,
    Unavailable,
    WaitpointClosed,
)
from flowfabric._flows import FlowBuilder, FlowHandle, InvalidFlow
from flowfabric._models import (
    BudgetCreated,
    BudgetStatus,
    FlowCancellation,
    FlowFailure,
    FlowInfo,
    FlowReplay,
    FlowState,
    QuotaPolicy,
    QuotaPolicyCreated,
    SubmittedFlow,
    UsageOutcome,
    UsageReport,
)
from flowfabric._retry import RetryPolicy
from flowfabric._signals import (
    SecretRotation,
    Signal,
    SignalDelivery,
    Waitpoint,
    WaitpointEvent,
    WaitpointKids,
)
from flowfabric._sync import SyncClient
from flowfabric._task import PendingWaitpoint, TaskContext
from flowfabric._tasks import Cancelled, SyncTaskContext, Task, TaskFailed, TaskHandle, task
from flowfabric._why import (
    Why,
    WhyBudget,
    WhyCapability,
    WhyDependencies,
    WhyKind,
    WhyQuota,
    WhySuspension,
    WhyUpstream,
)
from flowfabric._worker import Worker, WorkerStats

__all__ = [
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
