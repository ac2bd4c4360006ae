"""FlowFabric: a durable execution control plane on gRPC and Valkey Functions.

The Python SDK: `Client` (async) and `SyncClient` submit and operate on executions; `Worker`
runs `async` handlers for the executions it claims. Everything public is re-exported here from
private modules; `tests/sdk/test_exports.py` pins the list.
"""

from flowfabric._client import Client, ExecutionState, Page, Submitted
from flowfabric._errors import (
    Aborted,
    AlreadyExists,
    DeadlineExceeded,
    ExecutionNotActive,
    FailedPrecondition,
    FlowFabricError,
    HandlerError,
    InvalidArgument,
    NonRetryableError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    ResultNotReady,
    RetryAfter,
    StaleLease,
    Unauthenticated,
    Unavailable,
)
from flowfabric._retry import RetryPolicy
from flowfabric._sync import SyncClient
from flowfabric._task import TaskContext
from flowfabric._worker import Worker, WorkerStats

__all__ = [
    "Aborted",
    "AlreadyExists",
    "Client",
    "DeadlineExceeded",
    "ExecutionNotActive",
    "ExecutionState",
    "FailedPrecondition",
    "FlowFabricError",
    "HandlerError",
    "InvalidArgument",
    "NonRetryableError",
    "NotFound",
    "Page",
    "PermissionDenied",
    "ResourceExhausted",
    "ResultNotReady",
    "RetryAfter",
    "RetryPolicy",
    "StaleLease",
    "Submitted",
    "SyncClient",
    "TaskContext",
    "Unauthenticated",
    "Unavailable",
    "Worker",
    "WorkerStats",
]
