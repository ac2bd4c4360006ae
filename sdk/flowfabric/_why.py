"""`Client.why`: why an execution is not running, as typed values
(docs/lifecycle.md#why-an-execution-is-not-running)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from flowfabric._models import ExecutionState
from flowfabric.v1 import execution_pb2, types_pb2

_W = execution_pb2.WhyNotRunning


class WhyKind(enum.StrEnum):
    """What holds an execution (`WhyNotRunning.Kind`), or that nothing does."""

    RUNNING = "running"
    #: Its lease expired or was revoked; the next claim of its lane reclaims it.
    RECLAIMABLE = "reclaimable"
    #: Eligible; no worker has claimed it yet.
    WAITING_FOR_WORKER = "waiting_for_worker"
    #: A delay or a retry backoff; `Why.eta_at` is when it ends.
    DELAY = "delay"
    DEPENDENCIES = "dependencies"
    CAPABILITY = "capability"
    SUSPENDED = "suspended"
    BUDGET = "budget"
    QUOTA_RATE = "quota_rate"
    QUOTA_CONCURRENCY = "quota_concurrency"
    OPERATOR_PAUSE = "operator_pause"
    LANE_PAUSED = "lane_paused"
    TERMINAL = "terminal"
    #: A state combination the server does not explain.
    OTHER = "other"
    #: A kind this SDK does not know (a newer server); read `Why.summary`.
    UNKNOWN = "unknown"

    @classmethod
    def from_proto(cls, number: int) -> WhyKind:
        if number == _W.KIND_UNSPECIFIED or number not in _W.Kind.values():
            return cls.UNKNOWN
        name = _W.Kind.Name(number).removeprefix("KIND_").lower()  # type: ignore[arg-type]
        try:
            return cls(name)
        except ValueError:
            return cls.UNKNOWN


@dataclass(frozen=True)
class WhyUpstream:
    """One unresolved inbound edge of a flow member and its upstream's state (UNSPECIFIED when
    the upstream record is missing)."""

    edge_id: str
    execution_id: str
    state: ExecutionState


@dataclass(frozen=True)
class WhyDependencies:
    """A flow member waiting on its upstreams.

    Attributes:
        join: `all`, `any` or `quorum`.
        required: Satisfied edges the join needs.
        total: Edges applied so far.
        satisfied: Edges satisfied.
        impossible: Edges that can no longer be satisfied.
        unresolved: Edges not yet resolved.
        upstreams: The first unresolved edges (at most 20) with their upstreams.
    """

    join: str
    required: int
    total: int
    satisfied: int
    impossible: int
    unresolved: int
    upstreams: tuple[WhyUpstream, ...]


@dataclass(frozen=True)
class WhyCapability:
    """An execution whose required capabilities no live worker covers.

    Attributes:
        required: What it requires.
        missing: Required tokens no live worker offers.
        live_workers: Live registered workers the server compared.
        capable_workers: Of those, how many cover every token (non-zero: it is returned to
            eligible on the unblock scanner's next pass).
        last_mismatch_at: When a claim last found a worker lacking them (ms since the epoch).
    """

    required: tuple[str, ...]
    missing: tuple[str, ...]
    live_workers: int
    capable_workers: int
    last_mismatch_at: int | None


@dataclass(frozen=True)
class WhySuspension:
    """A suspended execution's waitpoint and timeout (`timeout_at` None: no timeout)."""

    suspension_id: str
    waitpoint_id: str
    reason_code: str
    timeout_at: int | None
    timeout_behavior: str
    suspended_at: int


@dataclass(frozen=True)
class WhyBudget:
    """A budget block: the budgets attached, the block's detail as the server wrote it, and
    what refused the claim (`budget_id`, `dimension`, `usage` of `limit`; empty and 0 when the
    detail names none), with the budget's next reset when it has a reset interval (the ETA)."""

    budget_ids: tuple[str, ...]
    detail: str
    budget_id: str = ""
    dimension: str = ""
    usage: int = 0
    limit: int = 0
    next_reset_at: int | None = None


@dataclass(frozen=True)
class WhyQuota:
    """A quota block: the quota policy attached, the block's detail as written, and for a
    rate block when the window frees room (`retry_at`, the ETA); for a concurrency block the
    cap, the execution's `concurrency_key` and the executions holding the bucket's slots
    (`holders_total`, and up to 16 `holders`, oldest first)."""

    quota_policy_id: str
    detail: str
    retry_at: int | None = None
    concurrency_key: str = ""
    concurrency_cap: int = 0
    holders_total: int = 0
    holders: tuple[str, ...] = ()


Detail = WhyDependencies | WhyCapability | WhySuspension | WhyBudget | WhyQuota


@dataclass(frozen=True)
class Why:
    """Why an execution is not running (`Client.why`).

    Attributes:
        execution_id: The execution.
        kind: What holds it; `running` when nothing does.
        summary: One sentence for people (its wording may change: do not parse it).
        eta_at: When it is expected to become claimable (for RECLAIMABLE: when it became so),
            in ms since the Unix epoch; None when not known.
        state: Its public state.
        blocking_reason: The stored blocking reason (`waiting_for_budget`, ...).
        blocking_detail: The stored blocking detail, if any.
        detail: The kind's detail (`WhyDependencies`, `WhyCapability`, `WhySuspension`,
            `WhyBudget`, `WhyQuota`), None for kinds without one.
        raw: The server's message as sent (fields newer than this SDK included).
    """

    execution_id: str
    kind: WhyKind
    summary: str
    eta_at: int | None
    state: ExecutionState
    blocking_reason: str
    blocking_detail: str | None
    detail: Detail | None
    raw: execution_pb2.WhyNotRunning

    @property
    def running(self) -> bool:
        return self.kind is WhyKind.RUNNING

    @classmethod
    def from_proto(cls, reply: execution_pb2.DescribeExecutionResponse) -> Why:
        w, snap = reply.why, reply.snapshot
        reason = types_pb2.BlockingReason.Name(w.blocking_reason)
        return cls(
            execution_id=snap.execution_id,
            kind=WhyKind.from_proto(w.kind),
            summary=w.summary,
            eta_at=w.eta_at if w.HasField("eta_at") else None,
            state=ExecutionState(snap.public_state),
            blocking_reason=reason.removeprefix("BLOCKING_REASON_").lower(),
            blocking_detail=w.blocking_detail if w.HasField("blocking_detail") else None,
            detail=_detail(w),
            raw=w,
        )


def _detail(w: execution_pb2.WhyNotRunning) -> Detail | None:
    which = w.WhichOneof("detail")
    if which == "dependencies":
        d = w.dependencies
        ups = tuple(
            WhyUpstream(u.edge_id, u.execution_id, ExecutionState(u.public_state))
            for u in d.upstreams
        )
        return WhyDependencies(
            d.join_kind, d.required, d.total, d.satisfied, d.impossible, d.unresolved, ups
        )
    if which == "capability":
        c = w.capability
        mismatch = c.last_mismatch_at if c.HasField("last_mismatch_at") else None
        return WhyCapability(
            tuple(c.required), tuple(c.missing), c.live_workers, c.capable_workers, mismatch
        )
    if which == "suspension":
        s = w.suspension
        timeout = s.timeout_at if s.HasField("timeout_at") else None
        return WhySuspension(
            s.suspension_id, s.waitpoint_id, s.reason_code, timeout, s.timeout_behavior,
            s.suspended_at,
        )  # fmt: skip
    if which == "budget":
        b = w.budget
        return WhyBudget(
            tuple(b.budget_ids), b.detail, b.budget_id, b.dimension, b.usage, b.limit,
            b.next_reset_at if b.HasField("next_reset_at") else None,
        )  # fmt: skip
    if which == "quota":
        q = w.quota
        return WhyQuota(
            q.quota_policy_id, q.detail, q.retry_at if q.HasField("retry_at") else None,
            q.concurrency_key, q.concurrency_cap, q.holders_total, tuple(q.holders),
        )  # fmt: skip
    return None
