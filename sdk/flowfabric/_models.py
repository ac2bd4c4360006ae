"""The client's value types: public states, submit and list answers, times and payloads, flows,
budgets and quota policies."""

from __future__ import annotations

import builtins
import enum
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from flowfabric._errors import BudgetExceeded
from flowfabric.v1 import execution_pb2, types_pb2

Time = datetime | timedelta | int
"""An absolute time: a datetime, a delay from now (timedelta), or ms since the Unix epoch."""
Payload = bytes | str | Mapping[str, Any] | Sequence[Any]
"""bytes are sent verbatim; str as UTF-8; mappings and lists as JSON."""


class ExecutionState(enum.IntEnum):
    """The public state of an execution (`flowfabric.v1.PublicState`)."""

    UNSPECIFIED = types_pb2.PUBLIC_STATE_UNSPECIFIED
    WAITING = types_pb2.PUBLIC_STATE_WAITING
    DELAYED = types_pb2.PUBLIC_STATE_DELAYED
    RATE_LIMITED = types_pb2.PUBLIC_STATE_RATE_LIMITED
    WAITING_CHILDREN = types_pb2.PUBLIC_STATE_WAITING_CHILDREN
    ACTIVE = types_pb2.PUBLIC_STATE_ACTIVE
    SUSPENDED = types_pb2.PUBLIC_STATE_SUSPENDED
    COMPLETED = types_pb2.PUBLIC_STATE_COMPLETED
    FAILED = types_pb2.PUBLIC_STATE_FAILED
    CANCELLED = types_pb2.PUBLIC_STATE_CANCELLED
    EXPIRED = types_pb2.PUBLIC_STATE_EXPIRED
    SKIPPED = types_pb2.PUBLIC_STATE_SKIPPED

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATES


#: The terminal public states (the one set `ExecutionState.is_terminal` and the CLI use).
TERMINAL_STATES = frozenset(
    {
        ExecutionState.COMPLETED,
        ExecutionState.FAILED,
        ExecutionState.CANCELLED,
        ExecutionState.EXPIRED,
        ExecutionState.SKIPPED,
    }
)
INDEXES = {
    "eligible": execution_pb2.EXECUTION_INDEX_ELIGIBLE,
    "delayed": execution_pb2.EXECUTION_INDEX_DELAYED,
    "terminal": execution_pb2.EXECUTION_INDEX_TERMINAL,
    "suspended": execution_pb2.EXECUTION_INDEX_SUSPENDED,
    "active": execution_pb2.EXECUTION_INDEX_ACTIVE,
}

#: A public state's name -> the lane index that holds it (`Client.list(state="failed")` lists
#: that index with the public-state filter; docs/lifecycle.md#reads). `rate_limited` and
#: `waiting_children` sit in blocked indexes that ListExecutions does not list.
STATE_INDEXES = {
    "waiting": "eligible",
    "completed": "terminal",
    "failed": "terminal",
    "cancelled": "terminal",
    "expired": "terminal",
    "skipped": "terminal",
}


@dataclass(frozen=True)
class Submitted:
    """The answer to `Client.submit`.

    Attributes:
        execution_id: The (server-minted or given) execution id.
        duplicate: True if the id or idempotency key named an existing execution.
        state: The state written (WAITING or DELAYED), or the existing one for a duplicate.
    """

    execution_id: str
    duplicate: bool
    state: ExecutionState


@dataclass(frozen=True)
class Page:
    """One page of `Client.list`; `next_page_token` is empty on the last page."""

    executions: builtins.list[types_pb2.ExecutionSummary]
    next_page_token: str


def to_ms(value: Time) -> int:
    """Milliseconds since the Unix epoch."""
    if isinstance(value, datetime):
        return int(value.timestamp() * 1000)
    if isinstance(value, timedelta):
        return int(time.time() * 1000 + value.total_seconds() * 1000)
    return int(value)


def encode_payload(value: Payload | None) -> tuple[bytes | None, str | None]:
    """(bytes, encoding): bytes verbatim (no encoding), str as `utf8`, the rest as `json`."""
    if value is None:
        return None, None
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value), None
    if isinstance(value, str):
        return value.encode(), "utf8"
    return json.dumps(value, separators=(",", ":")).encode(), "json"


# -- flows --------------------------------------------------------------------------------------


class FlowState(enum.StrEnum):
    """The state of a flow (`FlowSnapshot.public_flow_state`), kept current by its members'
    own transitions (docs/flows.md#flow-state)."""

    OPEN = "open"
    RUNNING = "running"
    BLOCKED = "blocked"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    #: A state this SDK does not know (a newer server); see `FlowInfo.snapshot`.
    UNKNOWN = "unknown"

    @classmethod
    def parse(cls, value: str) -> FlowState:
        try:
            return cls(value)
        except ValueError:
            return cls.UNKNOWN

    @property
    def is_terminal(self) -> bool:
        """Completed, failed or cancelled. A replay can reopen a completed or failed flow."""
        return self in (FlowState.COMPLETED, FlowState.FAILED, FlowState.CANCELLED)


@dataclass(frozen=True)
class FlowFailure:
    """One member failure the flow recorded (the first five are kept).

    Attributes:
        execution_id: The member.
        state: FAILED, EXPIRED or CANCELLED.
        reason: The failure (or cancellation) reason the member recorded.
        at: When, in ms since the Unix epoch.
    """

    execution_id: str
    state: ExecutionState
    reason: str
    at: int


_FAILURE_STATES = {s.name.lower(): s for s in ExecutionState}


@dataclass(frozen=True)
class FlowInfo:
    """A flow as `Client.describe_flow` reads it.

    Attributes:
        flow_id: The flow.
        state: Its state; `state.is_terminal` once completed, failed or cancelled.
        counts: Members by public state (`completed`, `failed`, `skipped`, `waiting`,
            `waiting_children`, `active`, ...); states with no member are left out.
        failures: The first member failures, oldest first.
        graph_revision: Bumped by every structural change (members plus edges after a submit).
        node_count: Members.
        edge_count: Edges.
        snapshot: The server's record as sent (kind, namespace, times, tags, cancel fields).
    """

    flow_id: str
    state: FlowState
    counts: Mapping[str, int]
    failures: tuple[FlowFailure, ...]
    graph_revision: int
    node_count: int
    edge_count: int
    snapshot: types_pb2.FlowSnapshot

    @property
    def done(self) -> int:
        """Members in a terminal state."""
        terminal = {s.name.lower() for s in TERMINAL_STATES}
        return sum(n for state, n in self.counts.items() if state in terminal)

    @classmethod
    def from_proto(
        cls,
        snapshot: types_pb2.FlowSnapshot,
        members_by_state: Mapping[str, int],
        failures: Sequence[Any] = (),
    ) -> FlowInfo:
        """From DescribeFlow's (or WatchFlow's) record, counts and failures."""
        return cls(
            flow_id=snapshot.flow_id,
            state=FlowState.parse(snapshot.public_flow_state),
            counts=dict(members_by_state),
            failures=tuple(
                FlowFailure(
                    f.execution_id,
                    _FAILURE_STATES.get(f.public_state, ExecutionState.UNSPECIFIED),
                    f.reason,
                    f.at,
                )
                for f in failures
            ),
            graph_revision=snapshot.graph_revision,
            node_count=snapshot.node_count,
            edge_count=snapshot.edge_count,
            snapshot=snapshot,
        )


@dataclass(frozen=True)
class SubmittedFlow:
    """The answer to a flow's `submit()`: the flow id and each member's execution id.

    Index it with the handle `FlowBuilder.add` returned (or the member's key):
    `flow[fetch]` is the execution id of member `fetch`.

    Attributes:
        flow_id: The flow.
        members: Member key → execution id, in the order they were added.
        states: Member key → the state it was created in (WAITING, or WAITING_CHILDREN for a
            member with upstreams); empty for a duplicate.
        graph_revision: Members plus edges.
        duplicate: True if the flow id named an existing flow (nothing was written; `members`
            are those the first submit named).
    """

    flow_id: str
    members: Mapping[str, str]
    states: Mapping[str, ExecutionState]
    graph_revision: int
    duplicate: bool

    def __getitem__(self, member: Any) -> str:
        key = getattr(member, "key", member)
        return self.members[key]

    @property
    def execution_ids(self) -> builtins.list[str]:
        return builtins.list(self.members.values())


@dataclass(frozen=True)
class FlowCancellation:
    """The answer to `Client.cancel_flow`.

    Attributes:
        outcome: `cancelled` (the flow and every member cancel are done), `scheduled` (member
            cancels run in the background) or `partial` (some member cancels failed; they are
            retried in the background, or retry them with `Client.cancel`).
        policy: The cancellation policy applied (the stored one on a repeat).
        members: The flow's members (capped at 1000 on a repeat).
        failed: With `partial`: the members whose cancel failed.
    """

    outcome: str
    policy: str
    members: tuple[str, ...]
    failed: tuple[str, ...] = ()


@dataclass(frozen=True)
class FlowReplay:
    """The answer to `Client.replay_flow`.

    Attributes:
        execution_ids: The members returned to run (empty: nothing to replay, every member
            completed or is still running).
        reopened_edges: Edges reopened (back to unsatisfied).
        state: The flow's state after the replay.
    """

    execution_ids: tuple[str, ...]
    reopened_edges: int
    state: FlowState


# -- budgets and quota policies -----------------------------------------------------------------


def _opt(message: Any, name: str) -> Any:
    return getattr(message, name) if message.HasField(name) else None


@dataclass(frozen=True)
class BudgetCreated:
    """The answer to `Client.create_budget`.

    Attributes:
        budget_id: The budget (the one given, or the UUID minted for it).
        existed: True if a budget with this id existed already; it was left unchanged (the
            limits and options of this call were ignored).
    """

    budget_id: str
    existed: bool


@dataclass(frozen=True)
class QuotaPolicyCreated:
    """The answer to `Client.create_quota_policy`.

    Attributes:
        quota_policy_id: The policy (the one given, or the UUID minted for it).
        existed: True if the policy existed already; it was left unchanged.
    """

    quota_policy_id: str
    existed: bool


@dataclass(frozen=True)
class BudgetStatus:
    """A budget as `Client.budget` (GetBudgetStatus) and `Client.budgets` read it.

    Attributes:
        budget_id: The budget.
        enforcement: `strict` (meant to stop work) or `advisory` (counted and reported only).
        usage: Dimension → usage so far (dimensions never reported read as 0).
        hard_limits: Dimension → hard limit; 0 = no limit.
        soft_limits: Dimension → soft limit; 0 = no limit.
        breach_count: Hard breaches so far (cumulative, not cleared by a reset).
        soft_breach_count: Soft breaches so far (cumulative).
        reset_count: Resets so far (manual and periodic).
        reset_interval_ms: Period of the reset job; 0 = never resets.
        next_reset_at: The next periodic reset (ms since the epoch); None without an interval.
        last_breach_at: The last hard breach since the last reset (ms); None if none.
        last_breach_dim: Its dimension; None if none.
        last_reset_at: The last reset (ms); None if never reset.
        created_at: ms since the epoch.
        scope_type: `execution`, `flow`, `lane`, `tenant` or empty (descriptive only).
        scope_id: Descriptive only.
        on_hard_limit: What a hard breach does: `block` and `cancel_running` are acted on by
            the engine; the others (`fail`, ...) are hints for the reporting worker.
        on_soft_limit: The stored hint for a soft breach (`warn`, ...); not acted on.
        reserve: Dimension → the estimate each admitted execution holds (only non-zero).
        reserved: Dimension → what admitted executions still hold in all.
        in_flight: Executions admitted on the budget whose lease has not ended.
        raw: The server's record as sent.
    """

    budget_id: str
    enforcement: str
    usage: Mapping[str, int]
    hard_limits: Mapping[str, int]
    soft_limits: Mapping[str, int]
    breach_count: int
    soft_breach_count: int
    reset_count: int
    reset_interval_ms: int
    next_reset_at: int | None
    last_breach_at: int | None
    last_breach_dim: str | None
    last_reset_at: int | None
    created_at: int | None
    scope_type: str
    scope_id: str
    on_hard_limit: str
    on_soft_limit: str
    reserve: Mapping[str, int]
    reserved: Mapping[str, int]
    in_flight: int
    raw: types_pb2.BudgetStatus

    @property
    def dimensions(self) -> builtins.list[str]:
        """Every dimension with a limit entry or usage, sorted."""
        return sorted({*self.hard_limits, *self.soft_limits, *self.usage})

    def remaining(self, dimension: str) -> int | None:
        """What is left of `dimension` under its hard limit (0 when exhausted); None when the
        dimension has no hard limit."""
        limit = self.hard_limits.get(dimension, 0)
        if not limit:
            return None
        return max(limit - self.usage.get(dimension, 0), 0)

    @property
    def exhausted(self) -> bool:
        """Some dimension's usage is at or above its non-zero hard limit (how enforcement reads
        a budget: docs/budgets.md#reconcilers)."""
        return any(self.remaining(d) == 0 for d in self.hard_limits)

    @classmethod
    def from_proto(cls, status: types_pb2.BudgetStatus) -> BudgetStatus:
        return cls(
            budget_id=status.budget_id,
            enforcement=status.enforcement_mode,
            usage=dict(status.usage),
            hard_limits=dict(status.hard_limits),
            soft_limits=dict(status.soft_limits),
            breach_count=status.breach_count,
            soft_breach_count=status.soft_breach_count,
            reset_count=status.reset_count,
            reset_interval_ms=status.reset_interval_ms,
            next_reset_at=_opt(status, "next_reset_at"),
            last_breach_at=_opt(status, "last_breach_at"),
            last_breach_dim=_opt(status, "last_breach_dim"),
            last_reset_at=_opt(status, "last_reset_at"),
            created_at=_opt(status, "created_at"),
            scope_type=status.scope_type,
            scope_id=status.scope_id,
            on_hard_limit=status.on_hard_limit,
            on_soft_limit=status.on_soft_limit,
            reserve=dict(status.reserve),
            reserved=dict(status.reserved),
            in_flight=status.in_flight,
            raw=status,
        )


class UsageOutcome(enum.StrEnum):
    """What a usage report did (ReportUsage's outcome)."""

    #: Applied; no limit passed.
    OK = "ok"
    #: Applied; a dimension passed its soft limit.
    SOFT_BREACH = "soft_breach"
    #: Not applied: a dimension would have passed its hard limit.
    HARD_BREACH = "hard_breach"
    #: The dedup key was applied before (within 24 h); nothing changed.
    ALREADY_APPLIED = "already_applied"


@dataclass(frozen=True)
class UsageReport:
    """The answer to `Client.report_usage` and `TaskContext.report_usage`. Breaches are
    outcomes, not errors.

    Attributes:
        outcome: OK, SOFT_BREACH, HARD_BREACH or ALREADY_APPLIED.
        budget_id: The budget reported against.
        dimension: With a breach: the (first) dimension concerned; else None.
        usage: With a soft breach: its usage after the report; with a hard breach: its usage,
            unchanged by the refused report; else None.
        limit: With a breach: the limit passed (soft) or that would have been (hard).
        on_hard_limit: With a hard breach: the budget's action.
        revoked_leases: With a hard breach of a `cancel_running` budget: the leases revoked.
        execution_revoked: The reporting task's own lease was among them.
    """

    outcome: UsageOutcome
    budget_id: str = ""
    dimension: str | None = None
    usage: int | None = None
    limit: int | None = None
    on_hard_limit: str | None = None
    revoked_leases: int = 0
    execution_revoked: bool = False

    @property
    def applied(self) -> bool:
        """The deltas were added by this report (OK or SOFT_BREACH)."""
        return self.outcome in (UsageOutcome.OK, UsageOutcome.SOFT_BREACH)

    @property
    def hard_breach(self) -> bool:
        return self.outcome is UsageOutcome.HARD_BREACH

    def raise_if_hard_breach(self) -> UsageReport:
        """Raise `BudgetExceeded` (a `NonRetryableError` whose failure reason is
        `budget_exceeded`) on a hard breach; return this report otherwise. In a handler,
        letting it propagate fails the execution at once."""
        if self.hard_breach:
            raise BudgetExceeded(
                self.dimension or "", self.usage or 0, self.limit or 0, self.budget_id
            )
        return self

    @classmethod
    def from_proto(cls, reply: Any, budget_id: str = "") -> UsageReport:
        which = reply.WhichOneof("outcome")
        if which == "soft_breach":
            b = reply.soft_breach
            return cls(
                UsageOutcome.SOFT_BREACH, budget_id, b.dimension, b.current_usage, b.soft_limit
            )
        if which == "hard_breach":
            b = reply.hard_breach
            return cls(
                UsageOutcome.HARD_BREACH, budget_id, b.dimension, b.current_usage, b.hard_limit,
                b.on_hard_limit, b.revoked_leases, b.execution_revoked,
            )  # fmt: skip
        if which == "already_applied":
            return cls(UsageOutcome.ALREADY_APPLIED, budget_id)
        return cls(UsageOutcome.OK, budget_id)


@dataclass(frozen=True)
class QuotaPolicy:
    """A quota policy as `Client.quota_policy` and `Client.quota_policies` read it.

    Attributes:
        quota_policy_id: The policy.
        window_seconds: The sliding window.
        max_per_window: Admissions per window; 0 = no rate limit.
        max_concurrent: Executions admitted at once; 0 = no cap.
        jitter_ms: Spread added to the retry hints of callers refused together.
        created_at: ms since the epoch.
        current_concurrency: Slots held now.
        current_window_requests: Admissions inside the current window.
        raw: The server's record as sent.
    """

    quota_policy_id: str
    window_seconds: int
    max_per_window: int
    max_concurrent: int
    jitter_ms: int
    created_at: int
    current_concurrency: int
    current_window_requests: int
    raw: types_pb2.QuotaPolicy

    @classmethod
    def from_proto(cls, policy: types_pb2.QuotaPolicy) -> QuotaPolicy:
        return cls(
            quota_policy_id=policy.quota_policy_id,
            window_seconds=policy.window_seconds,
            max_per_window=policy.max_requests_per_window,
            max_concurrent=policy.max_concurrent,
            jitter_ms=policy.jitter_ms,
            created_at=policy.created_at,
            current_concurrency=policy.current_concurrency,
            current_window_requests=policy.current_window_requests,
            raw=policy,
        )
