"""Upper bounds on every duration, TTL, count and size a caller can send
(docs/architecture.md#limits).

One table, three readers: the API edge refuses a request outside a bound before anything is
written (`api/limits.py` and the servicers, through `check`); the Functions library gets the same
numbers as its `Bounds` include (`library.py` appends one `Bounds.<NAME> = <max>` line per row to
`lua/include/bounds.lua`), so a direct FCALL caller meets the same refusal first thing in the
function; and the README's "Limits" table is rendered from it (`markdown_table`; tests/
test_bounds_docs.py checks the README carries exactly that text).

Absolute timestamps (`delay_until`, `execution_deadline_at`, `timeout_at`) are held to the same
horizon as the durations, measured from Valkey's clock inside the function (the edge only checks
they are sane epoch milliseconds), because only the function knows "now".
"""

from __future__ import annotations

from dataclasses import dataclass

from flowfabric.server.valkey.errors import InvalidInput

SECOND_MS = 1000
HOUR_MS = 3600 * SECOND_MS
DAY_MS = 24 * HOUR_MS


@dataclass(frozen=True)
class Bound:
    """One bound: `lo..hi` inclusive in `unit`, applying to the fields `where` names."""

    name: str  # the Lua constant (`Bounds.<name>` is `hi`)
    lo: int
    hi: int
    unit: str  # "ms", "bytes" or "" (a count)
    where: str  # the fields it applies to, for the docs
    error: str = "invalid_input"  # the code a breach gets

    def says(self) -> str:
        unit = f" {self.unit}" if self.unit else ""
        return f"{self.lo}..{self.hi}{unit}"


def _b(name: str, lo: int, hi: int, unit: str, where: str, error: str = "invalid_input") -> Bound:
    return Bound(name, lo, hi, unit, where, error)


# Durations.
LEASE_TTL_MS = _b(
    "LEASE_TTL_MS", 1, HOUR_MS, "ms",
    "`lease_ttl_ms` of ClaimNext, StreamWork, ClaimFromGrant, RenewLease(s), RegisterWorker, "
    "Heartbeat and `CompleteExecutions.claim` (0 = 30000)",
)  # fmt: skip
GRANT_TTL_MS = _b(
    "GRANT_TTL_MS", 1, 60 * SECOND_MS, "ms",
    "`grant_ttl_ms` of ClaimForWorker, ClaimNext, StreamWork",
)  # fmt: skip
LEASE_HISTORY_GRACE_MS = _b(
    "LEASE_HISTORY_GRACE_MS", 0, HOUR_MS, "ms", "`RenewLease.lease_history_grace_ms`"
)
HORIZON_MS = _b(
    "HORIZON_MS", 0, 365 * DAY_MS, "ms",
    "every delay, timeout and deadline: `DelayExecution.delay_until` and "
    "`CreateExecution.delay_until` / `execution_deadline_at` (at most this far after now), "
    "`FailExecution.retry_after_ms`, `ResumeExecution.resume_delay_ms`, "
    "`DeliverSignal.resume_delay_ms`, `Suspend.timeout_in_ms` / `timeout_at` (after now), "
    "`CreatePendingWaitpoint.expires_in_ms`, policy `timeout_policy.*`, `backoff.*_delay_ms`, "
    "`stream_policy.retention_ttl_ms`, resume policy `resume_delay_ms`",
)  # fmt: skip
DEDUP_TTL_MS = _b(
    "DEDUP_TTL_MS", 0, 30 * DAY_MS, "ms",
    "policy `dedup_window_ms`, `DeliverSignal.dedup_ttl_ms`",
)  # fmt: skip
WAIT_MS = _b("WAIT_MS", 0, 30 * SECOND_MS, "ms", "`ClaimNext.wait_ms`")
IDLE_TIMEOUT_MS = _b(
    "IDLE_TIMEOUT_MS", 0, 300 * SECOND_MS, "ms", "`TailAttemptStream.idle_timeout_ms`"
)
TIMESTAMP_MS = _b(
    "TIMESTAMP_MS", 0, 253_402_300_799_999, "ms",
    "every absolute time a caller sends (epoch ms, up to year 9999): `delay_until`, "
    "`execution_deadline_at`, `timeout_at`, `AppendFrame.timestamp`, `DeliverSignal.created_at`",
)  # fmt: skip

# Counts.
MAX_RETRIES = _b("MAX_RETRIES", 0, 1000, "", "policy `retry_policy.max_retries`")
MAX_RECLAIM_COUNT = _b("MAX_RECLAIM_COUNT", 0, 10_000, "", "policy `max_reclaim_count`")
MAX_REPLAY_COUNT = _b("MAX_REPLAY_COUNT", 0, 1000, "", "policy `max_replay_count`")
MAX_SIGNALS = _b(
    "MAX_SIGNALS", 0, 1_000_000, "",
    "policy `max_signals_per_execution`, `DeliverSignal.max_signals_per_execution`",
)  # fmt: skip
STREAM_MAXLEN = _b(
    "STREAM_MAXLEN", 0, 100_000, "",
    "policy `stream_policy.retention_maxlen`, `AppendFrame.retention_maxlen`, "
    "`DeliverSignal.signal_maxlen`",
)  # fmt: skip
TAGS = _b("TAGS", 0, 256, "", "tags per execution (CreateExecution, after SetExecutionTags)")
LANES = _b(
    "LANES", 0, 256, "",
    "`lane_ids` of ClaimNext, StreamWork, RegisterWorker; `PartitionCollisions.lanes`",
)  # fmt: skip
LIST_ITEMS = _b(
    "LIST_ITEMS", 0, 64, "",
    "policy `retry_policy.retryable_categories`, `budget_ids`; keys of an attempt policy; "
    "`ListExecutions.public_states`",
)  # fmt: skip
BATCH_ITEMS = _b(
    "BATCH_ITEMS",
    1,
    1000,
    "",
    "`RenewLeases.renewals`, `CompleteExecutions.items`, `CreateExecutions.items`",
)
MAX_TASKS = _b("MAX_TASKS", 0, 100, "", "`ClaimNext.max_tasks` (0 or 1 = one)")
TENANT_WEIGHT = _b(
    "TENANT_WEIGHT", 1, 1000, "",
    "each namespace weight of `FF_TENANT_WEIGHTS` (docs/lifecycle.md#tenant-fairness)",
)  # fmt: skip
MAX_IN_FLIGHT = _b("MAX_IN_FLIGHT", 0, 1000, "", "`StreamWork.max_in_flight` (0 = 1)")
REPLY_BYTES = _b(
    "REPLY_BYTES", 0, 256 << 20, "bytes",
    "`ClaimNext.max_reply_bytes`, the caller's receive limit (0 = 4194304, gRPC's default; "
    "otherwise at least 2097152, which fits one task at the maxima)",
)  # fmt: skip
PAGE = _b(
    "PAGE", 0, 1000, "",
    "`ListExecutions.limit`, `ListPendingWaitpoints.page_size`, "
    "`ReadAttemptStream.count_limit`, `TailAttemptStream.batch`",
)  # fmt: skip

# Budgets and quota policies (docs/budgets.md#limits).
BUDGET_DIMENSIONS = _b(
    "BUDGET_DIMENSIONS", 0, 64, "",
    "`dimensions` of CreateBudget and ReportUsage (with their parallel arrays)",
)  # fmt: skip
DIMENSION_BYTES = _b("DIMENSION_BYTES", 1, 256, "bytes", "a budget dimension name")
BUDGET_AMOUNT = _b(
    "BUDGET_AMOUNT", 0, (1 << 53) - 1, "",
    "each of CreateBudget `hard_limits` / `soft_limits`, ReportUsage `deltas`",
)  # fmt: skip
QUOTA_WINDOW_S = _b("QUOTA_WINDOW_S", 0, 365 * 24 * 3600, "s", "CreateQuotaPolicy `window_seconds`")
QUOTA_LIMIT = _b(
    "QUOTA_LIMIT", 0, 1_000_000, "",
    "CreateQuotaPolicy `max_requests_per_window`, `max_concurrent`",
)  # fmt: skip
QUOTA_JITTER_MS = _b("QUOTA_JITTER_MS", 0, 60 * SECOND_MS, "ms", "CreateQuotaPolicy `jitter_ms`")

# Flows (docs/flows.md#limits): FAILED_PRECONDITION `flow_limit_exceeded`, metadata `limit`
# (the bound's name) and `max`.
FLOW_MEMBERS_MAX = _b(
    "FLOW_MEMBERS_MAX", 1, 10_000, "",
    "members of one flow (AddExecutionToFlow, CreateExecution with `flow_id`, SubmitFlow)",
    "flow_limit_exceeded",
)  # fmt: skip
FLOW_EDGES_PER_MEMBER_MAX = _b(
    "FLOW_EDGES_PER_MEMBER_MAX", 0, 1000, "",
    "inbound edges of one member, and outbound edges of one member (StageDependencyEdge, "
    "AddDependency, SubmitFlow); `Join.expected_edges` (`invalid_dependency` past it)",
    "flow_limit_exceeded",
)  # fmt: skip
FLOW_DEPTH_MAX = _b(
    "FLOW_DEPTH_MAX", 1, 256, "",
    "members on the longest chain of edges in one flow (StageDependencyEdge, AddDependency, "
    "SubmitFlow)",
    "flow_limit_exceeded",
)  # fmt: skip

# Sizes.
TAG_KEY_BYTES = _b("TAG_KEY_BYTES", 1, 256, "bytes", "a tag key")
TAG_VALUE_BYTES = _b("TAG_VALUE_BYTES", 0, 4096, "bytes", "a tag value")
FAILURE_DETAILS_BYTES = _b(
    "FAILURE_DETAILS_BYTES", 0, 16384, "bytes", "`FailExecution.failure_details`"
)
LABEL_BYTES = _b(
    "LABEL_BYTES", 0, 256, "bytes",
    "`CreateExecution` `namespace`, `execution_kind`, `idempotency_key`, `payload_encoding`, "
    "`creator_identity`, `quota_policy_id`; policy list items; signal names and labels",
)  # fmt: skip
TRACE_STATE_BYTES = _b(
    "TRACE_STATE_BYTES", 0, 512, "bytes",
    "`trace_context` `tracestate` of CreateExecution and SubmitFlow (docs/observability.md#traces)",
)  # fmt: skip

BOUNDS: tuple[Bound, ...] = (
    LEASE_TTL_MS, GRANT_TTL_MS, LEASE_HISTORY_GRACE_MS, HORIZON_MS, DEDUP_TTL_MS, WAIT_MS,
    IDLE_TIMEOUT_MS, TIMESTAMP_MS, MAX_RETRIES, MAX_RECLAIM_COUNT, MAX_REPLAY_COUNT,
    MAX_SIGNALS, STREAM_MAXLEN, TAGS, LANES, LIST_ITEMS, BATCH_ITEMS, MAX_TASKS, MAX_IN_FLIGHT,
    REPLY_BYTES, PAGE, TENANT_WEIGHT, FLOW_MEMBERS_MAX, FLOW_EDGES_PER_MEMBER_MAX, FLOW_DEPTH_MAX,
    TAG_KEY_BYTES, TAG_VALUE_BYTES, FAILURE_DETAILS_BYTES, LABEL_BYTES, BUDGET_DIMENSIONS,
    DIMENSION_BYTES, BUDGET_AMOUNT, QUOTA_WINDOW_S, QUOTA_LIMIT, QUOTA_JITTER_MS,
    TRACE_STATE_BYTES,
)  # fmt: skip


def check(bound: Bound, value: int, field: str) -> int:
    """`value` if it is within `bound`, else `invalid_input` naming `field`."""
    if not bound.lo <= value <= bound.hi:
        raise InvalidInput(field, f"{field} must be {bound.says()}, got: {value}")
    return value


def check_size(bound: Bound, value: str | bytes, field: str) -> None:
    """A string's (UTF-8) or bytes' length within `bound`."""
    size = len(value.encode() if isinstance(value, str) else value)
    if not bound.lo <= size <= bound.hi:
        raise InvalidInput(field, f"{field} must be {bound.says()}, got: {size} bytes")


def check_count(bound: Bound, n: int, field: str) -> None:
    """A repeated field's or map's length within `bound`."""
    if not bound.lo <= n <= bound.hi:
        raise InvalidInput(field, f"{field} must have {bound.lo}..{bound.hi} entries, got: {n}")


def lua_lines() -> str:
    """The `Bounds` values as Lua, appended to lua/include/bounds.lua at assembly."""
    return "".join(f"Bounds.{b.name} = {b.hi}\n" for b in BOUNDS)


def markdown_table() -> str:
    """The README's Limits table (tests/test_bounds_docs.py keeps the README in step)."""
    rows = ["| Bound | Range | Applies to | Error past it |", "|---|---|---|---|"]
    for b in BOUNDS:
        error = f"`{b.error}`"
        if "policy" in b.where:
            error += " (`invalid_policy_json` for a policy field)"
        rows.append(f"| `{b.name}` | {b.says()} | {b.where} | {error} |")
    return "\n".join(rows) + "\n"
