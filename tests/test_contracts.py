"""The gRPC API covers every engine contract, and follows the API's naming rules.

Each contract of the seed file (`ff_core_contracts_mod.rs`) is mapped here to the protobuf
message that encodes it:

* an `*Args` struct to a request message holding every contract field (extra fields allowed);
* a `*Result` / `*Outcome` enum to a message whose `oneof outcome` has one case per variant;
* a read model to a message holding every contract field.

A test parses the seed file, when present, so a contract added or changed there fails here until
the mapping (and the protos) follow. No Valkey needed.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import re
from pathlib import Path
from types import ModuleType

import pytest
from google.protobuf import descriptor, descriptor_pb2, descriptor_pool, json_format

import flowfabric.v1

PKG = "flowfabric.v1"
SEED = Path(__file__).resolve().parents[2] / "shared/seed/ff_core_contracts_mod.rs"

# Contract Args struct -> (request message, contract field names in contract order).
ARGS: dict[str, tuple[str, list[str]]] = {
    "CreateExecutionArgs": (
        "CreateExecutionRequest",
        [
            "execution_id",
            "namespace",
            "lane_id",
            "execution_kind",
            "input_payload",
            "payload_encoding",
            "priority",
            "creator_identity",
            "idempotency_key",
            "tags",
            "policy",
            "delay_until",
            "execution_deadline_at",
            "partition_id",
            "now",
        ],
    ),
    "IssueClaimGrantArgs": (
        "ClaimForWorkerRequest",
        [
            "execution_id",
            "lane_id",
            "worker_id",
            "worker_instance_id",
            "capability_hash",
            "route_snapshot_json",
            "admission_summary",
            "worker_capabilities",
            "grant_ttl_ms",
            "now",
        ],
    ),
    "ClaimExecutionArgs": (
        "ClaimExecutionArgs",
        [
            "execution_id",
            "worker_id",
            "worker_instance_id",
            "lane_id",
            "lease_id",
            "lease_ttl_ms",
            "attempt_id",
            "expected_attempt_index",
            "attempt_policy_json",
            "attempt_timeout_ms",
            "execution_deadline_at",
            "now",
        ],
    ),
    "CompleteExecutionArgs": (
        "CompleteExecutionRequest",
        [
            "execution_id",
            "fence",
            "attempt_index",
            "result_payload",
            "result_encoding",
            "source",
            "now",
        ],
    ),
    "RenewLeaseArgs": (
        "RenewLeaseRequest",
        ["execution_id", "attempt_index", "fence", "lease_ttl_ms", "lease_history_grace_ms"],
    ),
    "MarkLeaseExpiredArgs": ("MarkLeaseExpiredArgs", ["execution_id"]),
    "CancelExecutionArgs": (
        "CancelExecutionRequest",
        ["execution_id", "reason", "source", "lease_id", "lease_epoch", "attempt_id", "now"],
    ),
    "RevokeLeaseArgs": (
        "RevokeLeaseRequest",
        ["execution_id", "expected_lease_id", "worker_instance_id", "reason"],
    ),
    "DelayExecutionArgs": (
        "DelayExecutionRequest",
        ["execution_id", "fence", "attempt_index", "delay_until", "source", "now"],
    ),
    "MoveToWaitingChildrenArgs": (
        "MoveToWaitingChildrenRequest",
        ["execution_id", "fence", "attempt_index", "source", "now"],
    ),
    "ChangePriorityArgs": (
        "ChangePriorityRequest",
        ["execution_id", "new_priority", "lane_id", "now"],
    ),
    "UpdateProgressArgs": (
        "UpdateProgressRequest",
        [
            "execution_id",
            "lease_id",
            "lease_epoch",
            "attempt_id",
            "progress_pct",
            "progress_message",
            "now",
        ],
    ),
    "FailExecutionArgs": (
        "FailExecutionRequest",
        [
            "execution_id",
            "fence",
            "attempt_index",
            "failure_reason",
            "failure_category",
            "retry_policy_json",
            "next_attempt_policy_json",
            "source",
        ],
    ),
    "IssueReclaimGrantArgs": (
        "IssueReclaimGrantArgs",
        [
            "execution_id",
            "worker_id",
            "worker_instance_id",
            "lane_id",
            "capability_hash",
            "grant_ttl_ms",
            "route_snapshot_json",
            "admission_summary",
            "now",
        ],
    ),
    "ReclaimExecutionArgs": (
        "ReclaimExecutionArgs",
        [
            "execution_id",
            "worker_id",
            "worker_instance_id",
            "lane_id",
            "capability_hash",
            "lease_id",
            "lease_ttl_ms",
            "attempt_id",
            "attempt_policy_json",
            "max_reclaim_count",
            "old_worker_instance_id",
            "current_attempt_index",
        ],
    ),
    "ExpireExecutionArgs": ("ExpireExecutionArgs", ["execution_id", "expire_reason"]),
    "SuspendExecutionArgs": (
        "SuspendRequest",
        [
            "execution_id",
            "fence",
            "attempt_index",
            "suspension_id",
            "waitpoint_id",
            "waitpoint_key",
            "reason_code",
            "requested_by",
            "resume_condition_json",
            "resume_policy_json",
            "continuation_metadata_pointer",
            "timeout_at",
            "use_pending_waitpoint",
            "timeout_behavior",
        ],
    ),
    "ResumeExecutionArgs": (
        "ResumeExecutionRequest",
        ["execution_id", "trigger_type", "resume_delay_ms"],
    ),
    "CreatePendingWaitpointArgs": (
        "CreatePendingWaitpointRequest",
        [
            "execution_id",
            "lease_id",
            "lease_epoch",
            "attempt_index",
            "attempt_id",
            "waitpoint_id",
            "waitpoint_key",
            "expires_in_ms",
        ],
    ),
    "CloseWaitpointArgs": ("CloseWaitpointRequest", ["waitpoint_id", "reason"]),
    "DeliverSignalArgs": (
        "DeliverSignalRequest",
        [
            "execution_id",
            "waitpoint_id",
            "signal_id",
            "signal_name",
            "signal_category",
            "source_type",
            "source_identity",
            "payload",
            "payload_encoding",
            "correlation_id",
            "idempotency_key",
            "target_scope",
            "created_at",
            "dedup_ttl_ms",
            "resume_delay_ms",
            "max_signals_per_execution",
            "signal_maxlen",
            "waitpoint_token",
            "now",
        ],
    ),
    "BufferSignalArgs": (
        "BufferSignalArgs",
        [
            "execution_id",
            "waitpoint_id",
            "signal_id",
            "signal_name",
            "signal_category",
            "source_type",
            "source_identity",
            "payload",
            "payload_encoding",
            "idempotency_key",
            "target_scope",
            "waitpoint_token",
            "now",
        ],
    ),
    "ExpireSuspensionArgs": ("ExpireSuspensionArgs", ["execution_id"]),
    "ClaimResumedExecutionArgs": (
        "ClaimResumedExecutionArgs",
        [
            "execution_id",
            "worker_id",
            "worker_instance_id",
            "lane_id",
            "lease_id",
            "lease_ttl_ms",
            "current_attempt_index",
            "remaining_attempt_timeout_ms",
            "now",
        ],
    ),
    "AppendFrameArgs": (
        "AppendFrameRequest",
        [
            "execution_id",
            "attempt_index",
            "lease_id",
            "lease_epoch",
            "attempt_id",
            "frame_type",
            "timestamp",
            "payload",
            "encoding",
            "metadata_json",
            "correlation_id",
            "source",
            "retention_maxlen",
            "max_payload_bytes",
        ],
    ),
    "ReadFramesArgs": (
        "ReadAttemptStreamRequest",
        ["execution_id", "attempt_index", "from_id", "to_id", "count_limit"],
    ),
    "CreateBudgetArgs": (
        "CreateBudgetRequest",
        [
            "budget_id",
            "scope_type",
            "scope_id",
            "enforcement_mode",
            "on_hard_limit",
            "on_soft_limit",
            "reset_interval_ms",
            "dimensions",
            "hard_limits",
            "soft_limits",
            "now",
        ],
    ),
    "CreateQuotaPolicyArgs": (
        "CreateQuotaPolicyRequest",
        ["quota_policy_id", "window_seconds", "max_requests_per_window", "max_concurrent", "now"],
    ),
    "ReportUsageArgs": ("ReportUsageRequest", ["dimensions", "deltas", "now", "dedup_key"]),
    "ResetBudgetArgs": ("ResetBudgetRequest", ["budget_id", "now"]),
    "CheckAdmissionArgs": (
        "CheckAdmissionArgs",
        ["execution_id", "now", "window_seconds", "rate_limit", "concurrency_cap", "jitter_ms"],
    ),
    "ReleaseAdmissionArgs": ("ReleaseAdmissionArgs", ["execution_id"]),
    "BlockExecutionArgs": (
        "BlockExecutionArgs",
        ["execution_id", "blocking_reason", "blocking_detail", "now"],
    ),
    "UnblockExecutionArgs": (
        "UnblockExecutionArgs",
        ["execution_id", "now", "expected_blocking_reason"],
    ),
    "CreateFlowArgs": ("CreateFlowRequest", ["flow_id", "flow_kind", "namespace", "now"]),
    "AddExecutionToFlowArgs": ("AddExecutionToFlowRequest", ["flow_id", "execution_id", "now"]),
    "CancelFlowArgs": ("CancelFlowRequest", ["flow_id", "reason", "cancellation_policy", "now"]),
    "StageDependencyEdgeArgs": (
        "StageDependencyEdgeRequest",
        [
            "flow_id",
            "edge_id",
            "upstream_execution_id",
            "downstream_execution_id",
            "dependency_kind",
            "data_passing_ref",
            "expected_graph_revision",
            "now",
        ],
    ),
    "ApplyDependencyToChildArgs": (
        "ApplyDependencyToChildRequest",
        [
            "flow_id",
            "edge_id",
            "downstream_execution_id",
            "upstream_execution_id",
            "graph_revision",
            "dependency_kind",
            "data_passing_ref",
            "now",
        ],
    ),
    "ResolveDependencyArgs": ("ResolveDependencyArgs", ["edge_id", "upstream_outcome", "now"]),
    "PromoteBlockedToEligibleArgs": ("PromoteBlockedToEligibleArgs", ["execution_id", "now"]),
    "EvaluateFlowEligibilityArgs": ("EvaluateFlowEligibilityArgs", ["execution_id"]),
    "ReplayExecutionArgs": ("ReplayExecutionRequest", ["execution_id", "now"]),
    "SetExecutionTagsArgs": ("SetExecutionTagsRequest", ["execution_id", "tags"]),
    "SetFlowTagsArgs": ("SetFlowTagsRequest", ["flow_id", "tags"]),
    "RotateWaitpointHmacSecretArgs": (
        "RotateWaitpointHmacSecretArgs",
        ["new_kid", "new_secret_hex", "grace_ms"],
    ),
    "ListWaitpointHmacKidsArgs": ("ListWaitpointHmacKidsArgs", []),
}

# Contract Result/Outcome enum -> (message, variants as lower_snake_case `oneof outcome` cases).
RESULTS: dict[str, tuple[str, list[str]]] = {
    "CreateExecutionResult": ("CreateExecutionResponse", ["created", "duplicate"]),
    "IssueClaimGrantResult": ("ClaimForWorkerResponse", ["granted"]),
    "ClaimExecutionResult": ("ClaimExecutionResult", ["claimed"]),
    "CompleteExecutionResult": ("CompleteExecutionResponse", ["completed"]),
    "RenewLeaseResult": ("RenewLeaseResponse", ["renewed"]),
    "MarkLeaseExpiredResult": ("MarkLeaseExpiredResult", ["marked_expired", "already_satisfied"]),
    "CancelExecutionResult": ("CancelExecutionResponse", ["cancelled"]),
    "RevokeLeaseResult": ("RevokeLeaseResponse", ["revoked", "already_satisfied"]),
    "DelayExecutionResult": ("DelayExecutionResponse", ["delayed"]),
    "MoveToWaitingChildrenResult": ("MoveToWaitingChildrenResponse", ["moved"]),
    "ChangePriorityResult": ("ChangePriorityResponse", ["changed"]),
    "UpdateProgressResult": ("UpdateProgressResponse", ["updated"]),
    "FailExecutionResult": ("FailExecutionResponse", ["retry_scheduled", "terminal_failed"]),
    "IssueReclaimGrantResult": ("IssueReclaimGrantResult", ["granted"]),
    "ReclaimExecutionResult": ("ReclaimExecutionResult", ["reclaimed", "max_reclaims_exceeded"]),
    "ExpireExecutionResult": ("ExpireExecutionResult", ["expired", "already_terminal"]),
    "SuspendExecutionResult": ("SuspendResponse", ["suspended", "already_satisfied"]),
    "ResumeExecutionResult": ("ResumeExecutionResponse", ["resumed"]),
    "CreatePendingWaitpointResult": ("CreatePendingWaitpointResponse", ["created"]),
    "CloseWaitpointResult": ("CloseWaitpointResponse", ["closed"]),
    "DeliverSignalResult": ("DeliverSignalResponse", ["accepted", "duplicate"]),
    "BufferSignalResult": ("BufferSignalResult", ["buffered", "duplicate"]),
    "ExpireSuspensionResult": ("ExpireSuspensionResult", ["expired", "already_satisfied"]),
    "ClaimResumedExecutionResult": ("ClaimResumedExecutionResult", ["claimed"]),
    "AppendFrameResult": ("AppendFrameResponse", ["appended"]),
    "ReadFramesResult": ("ReadAttemptStreamResponse", ["frames"]),
    "CreateBudgetResult": ("CreateBudgetResponse", ["created", "already_satisfied"]),
    "CreateQuotaPolicyResult": ("CreateQuotaPolicyResponse", ["created", "already_satisfied"]),
    "ReportUsageResult": (
        "ReportUsageResponse",
        ["ok", "soft_breach", "hard_breach", "already_applied"],
    ),
    "ResetBudgetResult": ("ResetBudgetResponse", ["reset"]),
    "CheckAdmissionResult": (
        "CheckAdmissionResult",
        ["admitted", "already_admitted", "rate_exceeded", "concurrency_exceeded"],
    ),
    "ReleaseAdmissionResult": ("ReleaseAdmissionResult", ["released"]),
    "BlockExecutionResult": ("BlockExecutionResult", ["blocked"]),
    "UnblockExecutionResult": ("UnblockExecutionResult", ["unblocked"]),
    "CreateFlowResult": ("CreateFlowResponse", ["created", "already_satisfied"]),
    "AddExecutionToFlowResult": ("AddExecutionToFlowResponse", ["added", "already_member"]),
    "CancelFlowResult": (
        "CancelFlowResponse",
        ["cancelled", "cancellation_scheduled", "partially_cancelled"],
    ),
    "StageDependencyEdgeResult": ("StageDependencyEdgeResponse", ["staged"]),
    "ApplyDependencyToChildResult": (
        "ApplyDependencyToChildResponse",
        ["applied", "already_applied"],
    ),
    "ResolveDependencyResult": (
        "ResolveDependencyResult",
        ["satisfied", "impossible", "already_resolved"],
    ),
    "PromoteBlockedToEligibleResult": ("PromoteBlockedToEligibleResult", ["promoted"]),
    "EvaluateFlowEligibilityResult": ("EvaluateFlowEligibilityResult", ["status"]),
    "ReplayExecutionResult": ("ReplayExecutionResponse", ["replayed"]),
    "SetExecutionTagsResult": ("SetExecutionTagsResponse", ["ok"]),
    "SetFlowTagsResult": ("SetFlowTagsResponse", ["ok"]),
    "RotateWaitpointHmacSecretOutcome": ("RotateWaitpointHmacSecretOutcome", ["rotated", "noop"]),
}

# `oneof outcome` cases an RPC adds beyond its contract's variants.
EXTRA_OUTCOMES: dict[str, list[str]] = {
    # ClaimForWorker runs the scheduler, which may find nothing to grant.
    "IssueClaimGrantResult": ["no_work"],
}

# Read-model struct -> (message, contract field names).
READ_MODELS: dict[str, tuple[str, list[str]]] = {
    "ClaimGrant": ("ClaimGrant", ["execution_id", "partition_key", "grant_key", "expires_at_ms"]),
    "ReclaimGrant": (
        "ReclaimGrant",
        ["execution_id", "partition_key", "grant_key", "expires_at_ms", "lane_id"],
    ),
    "ClaimedExecution": (
        "ClaimedExecution",
        [
            "execution_id",
            "lease_id",
            "lease_epoch",
            "attempt_index",
            "attempt_id",
            "attempt_type",
            "lease_expires_at",
        ],
    ),
    "ClaimedResumedExecution": (
        "ClaimedResumedExecution",
        [
            "execution_id",
            "lease_id",
            "lease_epoch",
            "attempt_index",
            "attempt_id",
            "lease_expires_at",
        ],
    ),
    "PendingWaitpointInfo": (
        "PendingWaitpointInfo",
        [
            "waitpoint_id",
            "waitpoint_key",
            "state",
            "waitpoint_token",
            "required_signal_names",
            "created_at",
            "activated_at",
            "expires_at",
        ],
    ),
    "StreamFrame": ("StreamFrame", ["id", "fields"]),
    "StreamFrames": ("StreamFrames", ["frames", "closed_at", "closed_reason"]),
    "BudgetStatus": (
        "BudgetStatus",
        [
            "budget_id",
            "scope_type",
            "scope_id",
            "enforcement_mode",
            "usage",
            "hard_limits",
            "soft_limits",
            "breach_count",
            "soft_breach_count",
            "last_breach_at",
            "last_breach_dim",
            "next_reset_at",
            "created_at",
        ],
    ),
    "ExecutionInfo": (
        "ExecutionInfo",
        [
            "execution_id",
            "namespace",
            "lane_id",
            "priority",
            "execution_kind",
            "state_vector",
            "public_state",
            "created_at",
            "started_at",
            "completed_at",
            "current_attempt_index",
            "flow_id",
            "blocking_detail",
        ],
    ),
    "ExecutionSnapshot": (
        "ExecutionSnapshot",
        [
            "execution_id",
            "flow_id",
            "lane_id",
            "namespace",
            "public_state",
            "blocking_reason",
            "blocking_detail",
            "current_attempt",
            "current_lease",
            "current_waitpoint",
            "created_at",
            "last_mutation_at",
            "total_attempt_count",
            "tags",
        ],
    ),
    "AttemptSummary": ("AttemptSummary", ["attempt_id", "attempt_index"]),
    "LeaseSummary": ("LeaseSummary", ["lease_epoch", "worker_instance_id", "expires_at"]),
    "FlowSnapshot": (
        "FlowSnapshot",
        [
            "flow_id",
            "flow_kind",
            "namespace",
            "public_flow_state",
            "graph_revision",
            "node_count",
            "edge_count",
            "created_at",
            "last_mutation_at",
            "cancelled_at",
            "cancel_reason",
            "cancellation_policy",
            "tags",
        ],
    ),
    "EdgeSnapshot": (
        "EdgeSnapshot",
        [
            "edge_id",
            "flow_id",
            "upstream_execution_id",
            "downstream_execution_id",
            "dependency_kind",
            "satisfaction_condition",
            "data_passing_ref",
            "edge_state",
            "created_at",
            "created_by",
        ],
    ),
    "StateSummary": ("StateSummary", ["state_vector", "current_attempt_index"]),
    "ExecutionSummary": (
        "ExecutionSummary",
        [
            "execution_id",
            "namespace",
            "lane_id",
            "execution_kind",
            "public_state",
            "priority",
            "created_at",
        ],
    ),
    "ListExecutionsResult": ("ListExecutionsResponse", ["executions", "total_returned"]),
    "WaitpointHmacKids": ("WaitpointHmacKids", ["current_kid", "verifying"]),
    "VerifyingKid": ("VerifyingKid", ["kid", "expires_at_ms"]),
}

# Read-model enums encoded as a message oneof: enum -> (message, oneof name, variants).
ONEOF_MODELS: dict[str, tuple[str, str, list[str]]] = {
    "EdgeDirection": ("EdgeDirection", "direction", ["outgoing", "incoming"]),
}

# Contracts encoded as a string field: StreamCursor is a string with its grammar documented on
# each cursor field (these are the read's).
STRING_MODELS: dict[str, list[str]] = {
    "StreamCursor": ["ReadAttemptStreamRequest.from_id", "ReadAttemptStreamRequest.to_id"],
}
STREAM_CURSOR_VARIANTS = ["start", "end", "at"]

# Seed items with no protobuf encoding. StreamCursorParseError is the Rust-side parse error of
# StreamCursor; on the wire a bad cursor is INVALID_ARGUMENT `invalid_input`, not a message.
NOT_ENCODED = {"StreamCursorParseError"}

# Every contract name -> fully-qualified protobuf name (message, or field for STRING_MODELS).
CONTRACTS: dict[str, str] = {
    **{name: f"{PKG}.{msg}" for name, (msg, _) in ARGS.items()},
    **{name: f"{PKG}.{msg}" for name, (msg, _) in RESULTS.items()},
    **{name: f"{PKG}.{msg}" for name, (msg, _) in READ_MODELS.items()},
    **{name: f"{PKG}.{msg}" for name, (msg, _, _) in ONEOF_MODELS.items()},
    **{name: f"{PKG}.{fields[0]}" for name, fields in STRING_MODELS.items()},
}

# Services and their RPCs; value: "" unary, "server" / "client" streaming.
SERVICES: dict[str, dict[str, str]] = {
    "ExecutionService": {
        "CreateExecution": "",
        "CreateExecutions": "",
        "GetExecution": "",
        "GetExecutionState": "",
        "DescribeExecution": "",
        "ListExecutions": "",
        "GetExecutionResult": "",
        "CancelExecution": "",
        "ChangePriority": "",
        "ReplayExecution": "",
        "RevokeLease": "",
        "SetExecutionTags": "",
        "ResumeExecution": "",
        "WatchExecution": "server",
    },
    "WorkerService": {
        "RegisterWorker": "",
        "Heartbeat": "",
        "DeregisterWorker": "",
        "ClaimForWorker": "",
        "ClaimFromGrant": "",
        "ClaimNext": "",
        "StreamWork": "server",
        "RenewLease": "",
        "RenewLeases": "",
        "UpdateProgress": "",
        "AppendFrame": "",
        "AppendFrames": "client",
        "CreatePendingWaitpoint": "",
        "Suspend": "",
        "GetResumeSignals": "",
        "CloseWaitpoint": "",
        "CompleteExecution": "",
        "CompleteExecutions": "",
        "FailExecution": "",
        "CancelLeasedExecution": "",
        "DelayExecution": "",
        "MoveToWaitingChildren": "",
    },
    "SignalService": {
        "DeliverSignal": "",
        "ListPendingWaitpoints": "",
        "WatchWaitpoints": "server",
        "WatchSignals": "server",
    },
    "StreamService": {"ReadAttemptStream": "", "TailAttemptStream": "server"},
    "FlowService": {
        "CreateFlow": "",
        "AddExecutionToFlow": "",
        "StageDependencyEdge": "",
        "ApplyDependencyToChild": "",
        "AddDependency": "",
        "CancelFlow": "",
        "DescribeFlow": "",
        "DescribeEdge": "",
        "ListEdges": "",
        "SetFlowTags": "",
        # issue 13: a whole DAG in one call; releasing a member created blocked
        "SubmitFlow": "",
        "PromoteBlockedToEligible": "",
        # issue 13: re-running what did not complete; streaming member and flow states
        "ReplayFlow": "",
        "WatchFlow": "server",
    },
    "BudgetService": {
        "CreateBudget": "",
        "GetBudgetStatus": "",
        "ReportUsage": "",
        "ResetBudget": "",
        "CreateQuotaPolicy": "",
        "GetQuotaPolicy": "",
        # issue 14: paged listings of both stored object kinds
        "ListBudgets": "",
        "ListQuotaPolicies": "",
    },
    # issue 15 item 4: periodic work (docs/schedules.md)
    "ScheduleService": {
        "CreateSchedule": "",
        "GetSchedule": "",
        "ListSchedules": "",
        "PauseSchedule": "",
        "ResumeSchedule": "",
        "DeleteSchedule": "",
        "TriggerSchedule": "",
    },
    "LaneService": {
        "PauseLane": "",
        "ResumeLane": "",
        "DrainLane": "",
        "ListLanes": "",
        "GetLane": "",
        "StartBulkAction": "",
        "GetBulkAction": "",
        "ListBulkActions": "",
        "CancelBulkAction": "",
    },
    "AdminService": {
        "RotateWaitpointSecret": "",
        "ListWaitpointKids": "",
        "GetServerInfo": "",
        "PartitionCollisions": "",
        # project addition: the guarded repair sweep (docs/architecture.md#repair-sweep)
        "RepairSweep": "",
    },
}

# Engine strings each state enum maps to (docs/architecture.md#identifiers,
# docs/architecture.md#the-state-vector). The convention: the value
# name minus the enum prefix, lowercased.
STORED_STRINGS: dict[str, list[str]] = {
    "LifecyclePhase": ["submitted", "runnable", "active", "suspended", "terminal"],
    "OwnershipState": ["unowned", "leased", "lease_expired_reclaimable", "lease_revoked"],
    "EligibilityState": [
        "eligible_now",
        "not_eligible_until_time",
        "blocked_by_dependencies",
        "blocked_by_budget",
        "blocked_by_quota",
        "blocked_by_route",
        "blocked_by_lane_state",
        "blocked_by_operator",
        "not_applicable",
    ],
    "BlockingReason": [
        "none",
        "waiting_for_worker",
        "waiting_for_retry_backoff",
        "waiting_for_resume_delay",
        "waiting_for_delay",
        "waiting_for_signal",
        "waiting_for_approval",
        "waiting_for_callback",
        "waiting_for_tool_result",
        "waiting_for_children",
        "waiting_for_budget",
        "waiting_for_quota",
        "waiting_for_capable_worker",
        "waiting_for_locality_match",
        "paused_by_operator",
        "paused_by_policy",
        "paused_by_flow_cancel",
    ],
    "TerminalOutcome": ["none", "success", "failed", "cancelled", "expired", "skipped"],
    "AttemptState": [
        "none",
        "pending_first_attempt",
        "running_attempt",
        "attempt_interrupted",
        "pending_retry_attempt",
        "pending_replay_attempt",
        "attempt_terminal",
    ],
    "PublicState": [
        "waiting",
        "delayed",
        "rate_limited",
        "waiting_children",
        "active",
        "suspended",
        "completed",
        "failed",
        "cancelled",
        "expired",
        "skipped",
    ],
    "AttemptType": ["initial", "retry", "reclaim", "replay", "fallback"],
    "CancelSource": ["operator_override", "lease_holder", "flow_cascade", "system_timeout"],
    "ExecutionIndex": ["eligible", "delayed", "terminal", "suspended", "active"],
}


def _import_generated() -> list[ModuleType]:
    modules = [
        importlib.import_module(f"{PKG}.{info.name}")
        for info in pkgutil.iter_modules(flowfabric.v1.__path__)
        if info.name.endswith(("_pb2", "_pb2_grpc"))
    ]
    assert modules, "no generated modules; run protos/generate.py"
    return modules


MODULES = _import_generated()
FILES: list[descriptor.FileDescriptor] = [m.DESCRIPTOR for m in MODULES if hasattr(m, "DESCRIPTOR")]
POOL = descriptor_pool.Default()


def message(name: str) -> descriptor.Descriptor:
    return POOL.FindMessageTypeByName(f"{PKG}.{name}")


def snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def all_messages() -> list[descriptor.Descriptor]:
    out: list[descriptor.Descriptor] = []
    stack = [m for f in FILES for m in f.message_types_by_name.values()]
    while stack:
        msg = stack.pop()
        out.append(msg)
        stack.extend(msg.nested_types)
    return out


def all_enums() -> list[descriptor.EnumDescriptor]:
    enums = [e for f in FILES for e in f.enum_types_by_name.values()]
    return enums + [e for m in all_messages() for e in m.enum_types]


def services() -> dict[str, descriptor_pb2.ServiceDescriptorProto]:
    out = {}
    for f in FILES:
        proto = descriptor_pb2.FileDescriptorProto()
        f.CopyToProto(proto)
        out.update({s.name: s for s in proto.service})
    return out


def parse_seed(text: str) -> dict[str, tuple[str, list[str]]]:
    """Map each `pub struct` / `pub enum` to (kind, field names or snake_case variants)."""
    items: dict[str, tuple[str, list[str]]] = {}
    for match in re.finditer(r"^pub (struct|enum) (\w+)\s*(\{\})?", text, re.M):
        kind, name, empty = match.groups()
        body = "" if empty else text[match.end() : match.end() + text[match.end() :].find("\n}")]
        if kind == "struct":
            members = re.findall(r"^\s*pub (\w+):", body, re.M)
        else:
            members = [snake(v) for v in re.findall(r"^\s*([A-Z]\w*)\s*(?:[({,]|$)", body, re.M)]
        items[name] = (kind, members)
    return items


# --- Every contract has an encoding ----------------------------------------------------------


@pytest.mark.parametrize("contract", sorted(CONTRACTS))
def test_contract_encoding_exists(contract: str) -> None:
    full = CONTRACTS[contract]
    if contract in STRING_MODELS:
        for field_path in STRING_MODELS[contract]:
            field = POOL.FindFieldByName(f"{PKG}.{field_path}")
            assert field.type == descriptor.FieldDescriptor.TYPE_STRING, field_path
    else:
        assert POOL.FindMessageTypeByName(full).full_name == full


@pytest.mark.parametrize("contract", sorted(ARGS))
def test_args_message_has_every_contract_field(contract: str) -> None:
    msg_name, fields = ARGS[contract]
    missing = [f for f in fields if f not in message(msg_name).fields_by_name]
    assert not missing, f"{msg_name} lacks {contract} fields {missing}"


@pytest.mark.parametrize("contract", sorted(READ_MODELS))
def test_read_model_message_has_every_contract_field(contract: str) -> None:
    msg_name, fields = READ_MODELS[contract]
    missing = [f for f in fields if f not in message(msg_name).fields_by_name]
    assert not missing, f"{msg_name} lacks {contract} fields {missing}"


@pytest.mark.parametrize("contract", sorted(RESULTS))
def test_result_outcome_has_one_case_per_variant(contract: str) -> None:
    msg_name, variants = RESULTS[contract]
    msg = message(msg_name)
    assert "outcome" in msg.oneofs_by_name, f"{msg_name} has no `oneof outcome`"
    cases = [f.name for f in msg.oneofs_by_name["outcome"].fields]
    assert cases == variants + EXTRA_OUTCOMES.get(contract, [])
    for case in msg.oneofs_by_name["outcome"].fields:
        assert case.message_type is not None, f"{msg_name}.{case.name} must be a message"


@pytest.mark.parametrize("contract", sorted(ONEOF_MODELS))
def test_oneof_model_has_one_case_per_variant(contract: str) -> None:
    msg_name, oneof, variants = ONEOF_MODELS[contract]
    assert [f.name for f in message(msg_name).oneofs_by_name[oneof].fields] == variants


def test_seed_contracts_are_all_mapped() -> None:
    if not SEED.exists():
        pytest.skip(f"contracts seed not found at {SEED}")
    found = set(parse_seed(SEED.read_text()))
    unmapped = sorted(found - set(CONTRACTS) - NOT_ENCODED)
    assert not unmapped, f"seed contracts with no protobuf mapping: {unmapped}"
    gone = sorted(set(CONTRACTS) - found)
    assert not gone, f"mapped contracts no longer in the seed: {gone}"


def test_seed_fields_and_variants_match_the_held_lists() -> None:
    if not SEED.exists():
        pytest.skip(f"contracts seed not found at {SEED}")
    seed = parse_seed(SEED.read_text())
    held: dict[str, list[str]] = {
        **{name: fields for name, (_, fields) in ARGS.items()},
        **{name: variants for name, (_, variants) in RESULTS.items()},
        **{name: fields for name, (_, fields) in READ_MODELS.items()},
        **{name: variants for name, (_, _, variants) in ONEOF_MODELS.items()},
        "StreamCursor": STREAM_CURSOR_VARIANTS,
    }
    stale = {name: (held[name], seed[name][1]) for name in held if held[name] != seed[name][1]}
    assert not stale, f"held lists differ from the seed (held, seed): {stale}"


# --- API naming rules -----------------------------------------------------------------------


def test_services_and_rpcs_are_exactly_the_spec_list() -> None:
    actual = {
        name: {
            m.name: "server" if m.server_streaming else "client" if m.client_streaming else ""
            for m in svc.method
        }
        for name, svc in services().items()
    }
    assert actual == SERVICES


def test_every_rpc_has_its_own_request_and_response() -> None:
    for svc in services().values():
        for method in svc.method:
            assert method.input_type == f".{PKG}.{method.name}Request", method.name
            assert method.output_type == f".{PKG}.{method.name}Response", method.name


def test_enum_values_are_prefixed_and_start_unspecified() -> None:
    enums = all_enums()
    assert enums
    for enum in enums:
        prefix = snake(enum.name).upper() + "_"
        assert enum.values[0].number == 0
        assert enum.values[0].name == prefix + "UNSPECIFIED", enum.full_name
        for value in enum.values:
            assert value.name.startswith(prefix), f"{enum.full_name}.{value.name}"


@pytest.mark.parametrize("enum_name", sorted(STORED_STRINGS))
def test_enum_values_map_to_stored_strings(enum_name: str) -> None:
    enum = POOL.FindEnumTypeByName(f"{PKG}.{enum_name}")
    prefix = snake(enum_name).upper() + "_"
    stored = [v.name.removeprefix(prefix).lower() for v in enum.values if v.number != 0]
    assert stored == STORED_STRINGS[enum_name]


# --- Execution policy serialises to the stored JSON shape -----------------------------------


def test_execution_policy_json_matches_the_stored_shape() -> None:
    types_pb2 = importlib.import_module(f"{PKG}.types_pb2")
    policy = types_pb2.ExecutionPolicy(
        retry_policy=types_pb2.RetryPolicy(
            max_retries=2,
            backoff=types_pb2.Backoff(
                type="exponential",
                initial_delay_ms=1000,
                max_delay_ms=60000,
                multiplier=2.0,
                jitter=False,
            ),
            retryable_categories=["timeout"],
        ),
        timeout_policy=types_pb2.TimeoutPolicy(attempt_timeout_ms=500),
        max_reclaim_count=0,
        suspension_policy=types_pb2.SuspensionPolicy(timeout_behavior="fail"),
        budget_ids=["b1"],
        routing_requirements=types_pb2.RoutingRequirements(required_capabilities=["gpu"]),
        dedup_window_ms=86_400_000,
        stream_policy=types_pb2.StreamPolicy(durability_mode="buffered", retention_maxlen=10000),
        max_signals_per_execution=10000,
    )
    encoded = json_format.MessageToJson(policy, preserving_proto_field_name=True)
    assert json.loads(encoded) == {
        "retry_policy": {
            "max_retries": 2,
            "backoff": {
                "type": "exponential",
                "initial_delay_ms": 1000,
                "max_delay_ms": 60000,
                "multiplier": 2.0,
                "jitter": False,
            },
            "retryable_categories": ["timeout"],
        },
        "timeout_policy": {"attempt_timeout_ms": 500},
        "max_reclaim_count": 0,
        "suspension_policy": {"timeout_behavior": "fail"},
        "budget_ids": ["b1"],
        "routing_requirements": {"required_capabilities": ["gpu"]},
        "dedup_window_ms": 86400000,
        "stream_policy": {"durability_mode": "buffered", "retention_maxlen": 10000},
        "max_signals_per_execution": 10000,
    }
    # Numbers stay JSON numbers (the Lua side compares them), and the JSON parses back.
    assert '"dedup_window_ms": 86400000' in encoded
    assert json_format.Parse(encoded, types_pb2.ExecutionPolicy()) == policy


def test_fixed_backoff_and_empty_policy_json() -> None:
    types_pb2 = importlib.import_module(f"{PKG}.types_pb2")
    fixed = types_pb2.RetryPolicy(backoff=types_pb2.Backoff(type="fixed", delay_ms=1500))
    assert json.loads(json_format.MessageToJson(fixed, preserving_proto_field_name=True)) == {
        "backoff": {"type": "fixed", "delay_ms": 1500}
    }
    empty = types_pb2.ExecutionPolicy()
    assert json_format.MessageToJson(empty, preserving_proto_field_name=True) == "{}"
