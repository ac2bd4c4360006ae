"""The one error table: contract codes (and server-side codes) → gRPC status
(docs/architecture.md#error-model).

Every non-OK status carries `google.rpc.ErrorInfo` with `reason` = the contract code verbatim,
`domain` = `flowfabric`, and metadata `class`, `retryable` and the code's detail slots under
named keys; retryable transport faults also carry `google.rpc.RetryInfo`. Unknown codes become
INTERNAL naming the code, never a success.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

DOMAIN = "flowfabric"

C = grpc.StatusCode


@dataclass(frozen=True)
class ErrorSpec:
    status: grpc.StatusCode
    klass: str  # terminal | retryable | informational | cooperative | bug
    slots: tuple[str, ...] = ()  # names for the detail strings Lua returns after the code


def _table() -> dict[str, ErrorSpec]:
    t: dict[str, ErrorSpec] = {}

    def put(status: grpc.StatusCode, klass: str, codes: str, slots: tuple[str, ...] = ()) -> None:
        for code in codes.split():
            t[code] = ErrorSpec(status, klass, slots)

    # INVALID_ARGUMENT
    put(C.INVALID_ARGUMENT, "terminal", "invalid_input", ("detail",))
    put(C.INVALID_ARGUMENT, "terminal", "invalid_capabilities", ("detail",))
    put(C.INVALID_ARGUMENT, "terminal", "invalid_policy_json", ("detail",))
    put(C.INVALID_ARGUMENT, "terminal", "invalid_tag_key", ("key",))
    put(
        C.INVALID_ARGUMENT,
        "terminal",
        "invalid_kid invalid_secret_hex invalid_grace_ms invalid_waitpoint_key invalid_dependency "
        "self_referencing_edge invalid_budget_scope invalid_quota_spec invalid_blocking_reason "
        "invalid_resume_condition fence_required partial_fence_triple payload_too_large "
        "partition_mismatch invalid_cron invalid_time_zone invalid_schedule",
        ("detail",),
    )
    put(C.INVALID_ARGUMENT, "informational", "invalid_frame_type", ("detail",))
    put(C.INVALID_ARGUMENT, "retryable", "invalid_offset", ("detail",))
    # NOT_FOUND
    put(
        C.NOT_FOUND,
        "terminal",
        "execution_not_found flow_not_found budget_not_found quota_policy_not_found "
        "attempt_not_found result_not_found edge_not_found schedule_not_found "
        "bulk_action_not_found",
    )
    put(C.NOT_FOUND, "retryable", "waitpoint_not_found")
    put(C.NOT_FOUND, "informational", "stream_not_found")
    # ALREADY_EXISTS
    put(
        C.ALREADY_EXISTS,
        "terminal",
        "dependency_already_exists execution_already_in_flow rotation_conflict "
        "budget_attach_conflict quota_attach_conflict duplicate_worker_instance schedule_exists",
        ("detail",),
    )
    put(C.ALREADY_EXISTS, "informational", "waitpoint_already_exists", ("detail",))
    # PERMISSION_DENIED
    put(
        C.PERMISSION_DENIED,
        "terminal",
        "invalid_token token_expired missing_token waitpoint_not_token_bound unauthorized "
        "hmac_secret_not_initialized admin_token_required",
    )
    # FAILED_PRECONDITION
    put(
        C.FAILED_PRECONDITION,
        "terminal",
        "execution_not_active",
        ("terminal_outcome", "lease_epoch", "lifecycle_phase", "attempt_id"),
    )
    put(
        C.FAILED_PRECONDITION,
        "terminal",
        "execution_failed execution_cancelled execution_expired",
        ("failure_reason", "failure_category", "attempt_index"),
    )
    put(C.FAILED_PRECONDITION, "retryable", "capability_mismatch", ("missing",))
    put(C.FAILED_PRECONDITION, "retryable", "lane_draining", ("lane_id",))
    put(
        C.FAILED_PRECONDITION,
        "retryable",
        "execution_not_leaseable use_claim_resumed_execution not_a_resumed_execution "
        "waitpoint_pending_use_buffer_script",
        ("detail",),
    )
    put(
        C.FAILED_PRECONDITION,
        "informational",
        "execution_not_suspended already_suspended execution_not_eligible "
        "execution_not_in_eligible_set execution_not_reclaimable waitpoint_closed "
        "waitpoint_not_open waitpoint_not_pending pending_waitpoint_expired no_active_lease "
        "deps_not_satisfied not_blocked_by_deps stream_already_closed",
        ("detail",),
    )
    put(
        C.FAILED_PRECONDITION,
        "terminal",
        "execution_not_terminal execution_not_eligible_for_attempt not_runnable terminal "
        "target_not_signalable invalid_waitpoint_for_execution invalid_lease_for_suspend "
        "resume_condition_not_met flow_already_terminal execution_not_in_flow cycle_detected "
        "attempt_not_started attempt_already_terminal stream_closed stale_owner_cannot_append "
        "max_replays_exhausted replay_not_allowed max_retries_exhausted "
        "budget_override_not_allowed unknown_lane",
        ("detail",),
    )
    # a flow bound (docs/flows.md#limits): which one, its maximum, and what the call would reach
    put(C.FAILED_PRECONDITION, "terminal", "flow_limit_exceeded", ("limit", "max", "detail"))
    # ABORTED
    put(C.ABORTED, "terminal", "stale_lease lease_expired lease_revoked", ("detail",))
    put(
        C.ABORTED,
        "retryable",
        "lease_conflict stale_graph_revision invalid_claim_grant claim_grant_expired",
        ("detail",),
    )
    put(C.ABORTED, "informational", "grant_already_exists", ("detail",))
    # RESOURCE_EXHAUSTED
    put(
        C.RESOURCE_EXHAUSTED,
        "retryable",
        "rate_limit_exceeded concurrency_limit_exceeded concurrency_limit",
        ("detail",),
    )
    put(C.RESOURCE_EXHAUSTED, "cooperative", "budget_exceeded", ("detail",))
    put(
        C.RESOURCE_EXHAUSTED,
        "terminal",
        "signal_limit_exceeded retention_limit_exceeded",
        ("detail",),
    )
    # UNAVAILABLE / DEADLINE_EXCEEDED
    put(C.UNAVAILABLE, "retryable", "backend_unavailable library_reload_failed shutting_down")
    # the transition is applied but not yet as durable as FF_DURABILITY promises
    put(C.UNAVAILABLE, "retryable", "durability_timeout")
    put(C.DEADLINE_EXCEEDED, "retryable", "backend_timeout")
    # INTERNAL
    put(
        C.INTERNAL,
        "bug",
        "active_attempt_exists attempt_not_in_created_state invalid_keys_missing_hmac "
        "invalid_secret protocol_error backend_error unknown_code corrupt_record",
        ("detail",),
    )
    put(C.UNAUTHENTICATED, "terminal", "unauthenticated")
    put(C.UNIMPLEMENTED, "terminal", "not_implemented")
    return t


ERROR_TABLE: dict[str, ErrorSpec] = _table()


METADATA_VALUE_MAX = 256
MESSAGE_MAX = 1024


def _clip(text: str, limit: int) -> str:
    """`text` cut to at most `limit` UTF-8 bytes, saying how long it was."""
    raw = text.encode()
    if len(raw) <= limit:
        return text
    head = raw[: limit - 32].decode(errors="ignore")
    return f"{head}... ({len(raw)} bytes)"


@dataclass
class FlowFabricError(Exception):
    """An error outcome on its way to the wire: a contract or server code plus details."""

    code: str
    details: list[str] = field(default_factory=list)
    message: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    retry_after_ms: int | None = None

    def __post_init__(self) -> None:
        super().__init__(self.message or self.code)

    @property
    def spec(self) -> ErrorSpec:
        return ERROR_TABLE.get(self.code) or ERROR_TABLE["unknown_code"]

    def to_status(self) -> status_pb2.Status:
        """Build the `google.rpc.Status` (with ErrorInfo, and RetryInfo when known)."""
        known = self.code in ERROR_TABLE
        spec = self.spec
        reason = self.code if known else "unknown_code"
        meta = {"class": spec.klass, "retryable": str(spec.klass == "retryable").lower()}
        if not known:
            meta["code"] = self.code
        slots = spec.slots
        for i, value in enumerate(self.details):
            name = slots[i] if i < len(slots) else f"detail_{i}"
            meta[name] = value
        meta.update(self.metadata)
        # Both travel in the trailers, which a client caps (8 KiB by default): a caller's
        # oversized id echoed back must not turn the answer into RESOURCE_EXHAUSTED.
        meta = {k: _clip(v, METADATA_VALUE_MAX) for k, v in meta.items()}
        info = error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=meta)
        status = status_pb2.Status(
            code=getattr(code_pb2, spec.status.name),
            message=_clip(self.describe(), MESSAGE_MAX),
        )
        status.details.add().Pack(info)
        if self.retry_after_ms is not None:
            delay = duration_pb2.Duration()
            delay.FromMilliseconds(self.retry_after_ms)
            status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        return status

    def describe(self) -> str:
        if self.message:
            return self.message
        if self.code not in ERROR_TABLE:
            return f"unknown error code from the engine: {self.code}"
        if self.details:
            return f"{self.code}: {', '.join(self.details)}"
        return self.code


def InvalidInput(field_name: str, message: str) -> FlowFabricError:
    """Server-side `invalid_input` naming the offending field."""
    return FlowFabricError("invalid_input", message=message, metadata={"field": field_name})


def not_implemented(rpc: str, issue: str) -> FlowFabricError:
    return FlowFabricError(
        "not_implemented", message=f"{rpc} is declared but not implemented yet ({issue})"
    )
