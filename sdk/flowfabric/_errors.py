"""Errors: server failures typed from `google.rpc.ErrorInfo`, and handler-raised outcomes.

Every server failure carries an ErrorInfo in the `grpc-status-details-bin` trailer: its
`reason` is the contract code verbatim and its metadata holds `class`, `retryable` and the
code's detail slots. The class raised here is chosen from the reason first, then the
status code — never from message text.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, cast

import grpc
from google.rpc import error_details_pb2, status_pb2

_STATUS_DETAILS_KEY = "grpc-status-details-bin"

#: Reasons that mean "this lease is gone; stop working on the task".
LEASE_LOST_REASONS = frozenset(
    {"stale_lease", "lease_expired", "lease_revoked", "execution_not_active", "execution_not_found"}
)


class FlowFabricError(Exception):
    """A failed FlowFabric RPC.

    Attributes:
        code: The gRPC status code.
        reason: The ErrorInfo reason (the contract code, e.g. `stale_lease`); empty when the
            failure did not come from the FlowFabric server (e.g. a transport error).
        metadata: ErrorInfo metadata: `class`, `retryable` and the code's detail slots.
        retryable: Whether the same call may succeed if retried.
        retry_delay: The server's suggested delay in seconds (google.rpc.RetryInfo), if any.
    """

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode = grpc.StatusCode.UNKNOWN,
        reason: str = "",
        metadata: Mapping[str, str] | None = None,
        retry_delay: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})
        self.retry_delay = retry_delay

    @property
    def retryable(self) -> bool:
        if "retryable" in self.metadata:
            return self.metadata["retryable"] == "true"
        return self.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)

    @property
    def non_retryable(self) -> bool:
        return not self.retryable

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}(code={self.code.name}, reason={self.reason!r}, {self.message!r})"


class InvalidArgument(FlowFabricError):
    """INVALID_ARGUMENT: bad input; nothing was changed."""


class NotFound(FlowFabricError):
    """NOT_FOUND: e.g. `execution_not_found`."""


class ResultNotReady(NotFound):
    """NOT_FOUND `result_not_found`: the execution has not completed successfully."""


class AlreadyExists(FlowFabricError):
    """ALREADY_EXISTS: e.g. `duplicate_worker_instance`."""


class PermissionDenied(FlowFabricError):
    """PERMISSION_DENIED: e.g. `admin_token_required`."""


class InvalidWaitpointToken(PermissionDenied):
    """PERMISSION_DENIED `invalid_token`, `token_expired`, `missing_token` or
    `waitpoint_not_token_bound`: the token does not authorise a signal to this waitpoint.

    A waitpoint that does not exist (or belongs to another execution) also answers
    `invalid_token`, so existence cannot be probed. The token itself is never part of the
    message.
    """

    @property
    def expired(self) -> bool:
        """True for `token_expired`: signed by a key whose grace period has ended."""
        return self.reason == "token_expired"


class Unauthenticated(FlowFabricError):
    """UNAUTHENTICATED: a missing or wrong bearer token."""


class FailedPrecondition(FlowFabricError):
    """FAILED_PRECONDITION: the execution is in the wrong state for the call."""


class WaitpointClosed(FailedPrecondition):
    """FAILED_PRECONDITION `waitpoint_closed` or `target_not_signalable`: the waitpoint no
    longer takes signals (its condition was met, it was closed or timed out, or the execution
    ended)."""


class ExecutionFailed(FailedPrecondition):
    """FAILED_PRECONDITION `execution_failed`, `execution_cancelled` or `execution_expired`: the
    execution ended without a result (docs/lifecycle.md#why-did-it-fail)."""

    @property
    def outcome(self) -> str:
        """`failed`, `cancelled` or `expired`."""
        return self.reason.removeprefix("execution_")

    @property
    def failure_reason(self) -> str:
        return self.metadata.get("failure_reason", "")

    @property
    def failure_category(self) -> str:
        return self.metadata.get("failure_category", "")

    @property
    def attempt_index(self) -> int:
        raw = self.metadata.get("attempt_index", "")
        return int(raw) if raw.isdigit() else 0


class ExecutionNotActive(FailedPrecondition):
    """FAILED_PRECONDITION `execution_not_active`; the metadata says what really happened."""

    @property
    def terminal_outcome(self) -> str:
        return self.metadata.get("terminal_outcome", "")

    @property
    def lifecycle_phase(self) -> str:
        return self.metadata.get("lifecycle_phase", "")


class Aborted(FlowFabricError):
    """ABORTED: a fence or grant conflict."""


class StaleLease(Aborted):
    """ABORTED `stale_lease`, `lease_expired` or `lease_revoked`: the lease is no longer ours."""


class ResourceExhausted(FlowFabricError):
    """RESOURCE_EXHAUSTED: rate, concurrency, budget or size limits."""


class Unavailable(FlowFabricError):
    """UNAVAILABLE: the server or its Valkey cannot be reached right now."""


class DeadlineExceeded(FlowFabricError):
    """DEADLINE_EXCEEDED: the call ran past its deadline (it may still have been applied)."""


_BY_REASON: dict[str, type[FlowFabricError]] = {
    "result_not_found": ResultNotReady,
    "execution_failed": ExecutionFailed,
    "execution_cancelled": ExecutionFailed,
    "execution_expired": ExecutionFailed,
    "execution_not_active": ExecutionNotActive,
    "stale_lease": StaleLease,
    "lease_expired": StaleLease,
    "lease_revoked": StaleLease,
    "invalid_token": InvalidWaitpointToken,
    "token_expired": InvalidWaitpointToken,
    "missing_token": InvalidWaitpointToken,
    "waitpoint_not_token_bound": InvalidWaitpointToken,
    "waitpoint_closed": WaitpointClosed,
    "target_not_signalable": WaitpointClosed,
}
_BY_CODE: dict[grpc.StatusCode, type[FlowFabricError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.ABORTED: Aborted,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}


def _status_details(
    trailers: grpc.aio.Metadata | None,
) -> tuple[error_details_pb2.ErrorInfo | None, float | None]:
    info: error_details_pb2.ErrorInfo | None = None
    delay: float | None = None
    for key, value in trailers or ():
        if key != _STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                delay = retry.retry_delay.ToMilliseconds() / 1000
    return info, delay


_CODES = {code.value[0]: code for code in grpc.StatusCode}


def from_rpc_error(exc: grpc.aio.AioRpcError) -> FlowFabricError:
    """The typed error for a failed call (reason first, then status code)."""
    code = exc.code()
    # typed by grpc's stubs as the sync RpcError's tuple; on an aio error it is aio Metadata
    trailers = cast("grpc.aio.Metadata | None", exc.trailing_metadata())
    info, delay = _status_details(trailers)
    reason = info.reason if info is not None else ""
    metadata = dict(info.metadata) if info is not None else {}
    cls = _BY_REASON.get(reason) or _BY_CODE.get(code, FlowFabricError)
    return cls(
        exc.details() or code.name,
        code=code,
        reason=reason,
        metadata=metadata,
        retry_delay=delay,
    )


def from_item_error(
    code: int, reason: str, message: str, metadata: Mapping[str, str]
) -> FlowFabricError:
    """The typed error for one failed item of a batch call (`RenewLeasesResponse.ItemError`):
    the same class the single call's status would have raised."""
    status = _CODES.get(code, grpc.StatusCode.UNKNOWN)
    cls = _BY_REASON.get(reason) or _BY_CODE.get(status, FlowFabricError)
    return cls(message or status.name, code=status, reason=reason, metadata=metadata)


# -- raised by handlers -------------------------------------------------------------------------


class HandlerError(Exception):
    """Raise from a handler to choose how the attempt fails.

    Any other exception fails the attempt with the execution's stored retry policy deciding
    (category = the exception class name).

    Attributes:
        message: The failure reason recorded on the execution.
        category: The failure category (matched against the policy's `retryable_categories`).
        non_retryable: End the execution now, whatever its retry policy says.
        retry_after_ms: Retry after exactly this delay instead of the policy's backoff (still
            within the policy's retry budget).
    """

    default_category: ClassVar[str] = "handler_error"

    def __init__(
        self,
        message: str = "",
        *,
        category: str | None = None,
        non_retryable: bool = False,
        retry_after_ms: int | None = None,
    ) -> None:
        super().__init__(message)
        if retry_after_ms is not None and retry_after_ms < 0:
            raise ValueError("retry_after_ms must be >= 0")
        self.message = message
        self.category = category or self.default_category
        self.non_retryable = non_retryable
        self.retry_after_ms = retry_after_ms


class NonRetryableError(HandlerError):
    """Fail the execution at once (FAILED), whatever its retry policy allows."""

    default_category = "non_retryable"

    def __init__(self, message: str = "", *, category: str | None = None) -> None:
        super().__init__(message, category=category, non_retryable=True)


class RetryAfter(HandlerError):
    """Fail this attempt and retry after `delay_ms` (within the policy's retry budget)."""

    default_category = "retry_after"

    def __init__(self, delay_ms: int, message: str = "", *, category: str | None = None) -> None:
        super().__init__(
            message or f"retry after {delay_ms} ms", category=category, retry_after_ms=delay_ms
        )
        self.delay_ms = delay_ms


class BudgetExceeded(NonRetryableError):
    """A usage report hit a hard limit (`UsageReport.raise_if_hard_breach`): raised from a
    handler, it fails the execution at once with failure reason and category
    `budget_exceeded`.

    Attributes:
        budget_id: The budget, when known (set by `TaskContext.report_usage`'s check).
        dimension: The dimension that would have passed its hard limit.
        usage: Its usage (the refused report was not applied).
        limit: Its hard limit.
    """

    default_category = "budget_exceeded"

    def __init__(self, dimension: str, usage: int, limit: int, budget_id: str = "") -> None:
        super().__init__("budget_exceeded", category="budget_exceeded")
        self.budget_id = budget_id
        self.dimension = dimension
        self.usage = usage
        self.limit = limit

    def __str__(self) -> str:
        where = f"budget {self.budget_id} " if self.budget_id else ""
        return f"budget_exceeded: {where}{self.dimension} at {self.usage} of {self.limit}"


# -- control flow -------------------------------------------------------------------------------


class TaskSuspended(BaseException):
    """Raised by `TaskContext.suspend` once the execution is suspended: the lease is released
    and the handler must stop. Let it propagate; the worker catches it and neither completes nor
    fails the task. The execution comes back (same attempt, the handler re-run from the top)
    when its resume condition is met, an operator resumes it, or its timeout auto-resumes it.

    It derives from BaseException, like `asyncio.CancelledError`, so that a handler's
    `except Exception:` does not swallow it; `finally:` blocks and context managers still run.

    Attributes:
        suspension_id: The suspension.
        waitpoint_id: The waitpoint signals must target.
        waitpoint_key: The waitpoint's label.
        waitpoint_token: The token senders must present (a credential: not in `repr`).
    """

    def __init__(
        self, suspension_id: str, waitpoint_id: str, waitpoint_key: str, waitpoint_token: str
    ) -> None:
        super().__init__(f"suspended on waitpoint {waitpoint_id}")
        self.suspension_id = suspension_id
        self.waitpoint_id = waitpoint_id
        self.waitpoint_key = waitpoint_key
        self.waitpoint_token = waitpoint_token

    def __repr__(self) -> str:
        return f"TaskSuspended(waitpoint_id={self.waitpoint_id!r})"
