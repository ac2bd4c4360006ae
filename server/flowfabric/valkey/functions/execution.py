"""`lua/execution.lua`: create, tag, complete, fail, delay, wait for children, cancel, progress,
expire and replay an execution."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from flowfabric.server.valkey.errors import FlowFabricError
from flowfabric.server.valkey.functions.core import (
    Batch,
    Decl,
    Fence,
    KeyCtx,
    Outcome,
    arg,
    call,
    call_batch,
    ek,
    exec_ctx,
    key,
    lane,
    ok,
    opt,
    pk,
    record,
    routed,
    tail,
)
from flowfabric.server.valkey.ids import ExecutionId
from flowfabric.server.valkey.store import Store


@dataclass(frozen=True)
class NewExecution:
    """Everything `ff_create_execution` needs."""

    execution_id: ExecutionId
    namespace: str
    lane_id: str
    execution_kind: str
    input_payload: bytes
    priority: int
    creator_identity: str
    policy_json: str = ""
    payload_encoding: str = ""
    idempotency_key: str = ""
    tags: Mapping[str, str] | None = None
    delay_until: int | None = None
    execution_deadline_at: int | None = None
    quota_policy_id: str = ""
    # Its bucket of the quota policy (docs/budgets.md#per-key-limits); "" = policy-wide.
    concurrency_key: str = ""
    # Start blocked_by_dependencies (a flow member whose edges come later; docs/flows.md).
    blocked_by_dependencies: bool = False
    # The submitter's trace context, stored form (valkey/tracecontext.py); "" = none.
    trace_context: str = ""


@dataclass(frozen=True)
class Created:
    execution_id: str
    public_state: str


@dataclass(frozen=True)
class Duplicate:
    existing_id: str


@dataclass(frozen=True)
class TagsSet:
    count: int


@dataclass(frozen=True)
class FailOutcome:
    """`retry_scheduled delay_until next_attempt_index` or `terminal_failed`."""

    outcome: str
    delay_until: int | None = None
    next_attempt_index: int | None = None


@dataclass(frozen=True)
class Delayed:
    delay_until: int


@dataclass(frozen=True)
class Replayed:
    """ALREADY_SATISFIED `replayed [<outcome>]`: the fence's own transition had already
    committed (a retry after a lost reply); nothing written (docs/lifecycle.md#replays)."""

    reason: str
    outcome: str = ""


@dataclass(frozen=True)
class FailReplayed:
    """ALREADY_SATISFIED `replayed retry_scheduled delay_until next_attempt_index` or
    `replayed terminal_failed`: the fence's own failure had already committed."""

    reason: str
    outcome: str
    delay_until: int | None = None
    next_attempt_index: int | None = None


@dataclass(frozen=True)
class DelayReplayed:
    """ALREADY_SATISFIED `replayed delay_until`: the fence's own delay had already committed."""

    reason: str
    delay_until: int


@dataclass(frozen=True)
class Ended:
    """`cancelled|expired <previous phase>`, or a bare outcome word."""

    outcome: str
    previous_phase: str = ""


@dataclass(frozen=True)
class PublicState:
    public_state: str


def _idem(c: KeyCtx) -> str:
    if not c.idempotency_key:
        return c.part.noop
    return c.exec.idempotency(c.namespace, c.idempotency_key)


FENCE = (arg("lease_id"), opt("lease_epoch"), arg("attempt_id"))

CREATE: Decl[Created | Duplicate] = Decl(
    "ff_create_execution",
    (ek("core"), ek("payload"), ek("policy"), ek("tags"), lane("eligible"), lane("delayed"),
     key("idempotency key or noop", _idem), pk("execution_deadline"), pk("all_executions"),
     pk("lanes")),
    (arg("execution_id"), arg("namespace"), arg("lane_id"), arg("execution_kind"),
     arg("priority", "int"), arg("creator_identity"), arg("policy_json", default=""),
     arg("input_payload", "bytes"), opt("delay_until"), opt("dedup_ttl_ms"),
     arg("tags_json", "json", default={}), opt("execution_deadline_at"),
     arg("partition_id", "int"), arg("payload_encoding", default=""),
     arg("quota_policy_id", default=""), arg("blocked_by_dependencies", "bool", default=False),
     arg("concurrency_key", default=""), arg("trace_context", default="")),
    {"OK": record(Created), "DUPLICATE": record(Duplicate)},
)  # fmt: skip


@dataclass(frozen=True)
class CreatedMany:
    """`ff_create_executions`: one outcome per item, in order; an item's error reply is its
    `FlowFabricError` (not raised)."""

    results: tuple[Created | Duplicate | FlowFabricError, ...]


CREATES: Batch[Created | Duplicate] = Batch("ff_create_executions", CREATE)
SET_TAGS: Decl[TagsSet] = Decl(
    "ff_set_execution_tags", (ek("core"), ek("tags")), (tail("pairs"),), ok(record(TagsSet))
)
COMPLETE: Decl[Outcome | Replayed] = Decl(
    "ff_complete_execution",
    (ek("core"), routed("attempt hash"), pk("lease_expiry"), routed("worker leases"),
     routed("lane terminal"), ek("lease_current"), ek("lease_history"), routed("lane active"),
     routed("stream meta"), ek("result"), pk("attempt_timeout"), pk("execution_deadline")),
    (arg("execution_id"), *FENCE, arg("result_payload", "bytes"), arg("source"),
     arg("result_encoding")),
    {"OK": record(Outcome), "ALREADY_SATISFIED": record(Replayed)},
)  # fmt: skip
COMPLETES: Batch[Outcome | Replayed] = Batch("ff_complete_executions", COMPLETE)
FAIL: Decl[FailOutcome | FailReplayed] = Decl(
    "ff_fail_execution",
    (ek("core"), routed("attempt hash"), pk("lease_expiry"), routed("worker leases"),
     routed("lane terminal"), routed("lane delayed"), ek("lease_current"), ek("lease_history"),
     routed("lane active"), routed("stream meta"), pk("attempt_timeout"),
     pk("execution_deadline")),
    (arg("execution_id"), *FENCE, arg("failure_reason"), arg("failure_category"),
     arg("retry_policy_json", default=""), arg("source"), opt("retry_after_ms"),
     arg("failure_details", default="")),
    {"OK": record(FailOutcome), "ALREADY_SATISFIED": record(FailReplayed)},
)  # fmt: skip
_PAUSE_KEYS = (
    ek("core"), routed("attempt hash"), ek("lease_current"), ek("lease_history"),
    pk("lease_expiry"), routed("worker leases"), routed("lane active"), routed("target lane"),
    pk("attempt_timeout"),
)  # fmt: skip
DELAY: Decl[Delayed | DelayReplayed] = Decl(
    "ff_delay_execution",
    _PAUSE_KEYS,
    (arg("execution_id"), *FENCE, arg("delay_until", "int"), arg("source")),
    {"OK": record(Delayed), "ALREADY_SATISFIED": record(DelayReplayed)},
)
WAIT_CHILDREN: Decl[Outcome | Replayed] = Decl(
    "ff_move_to_waiting_children",
    _PAUSE_KEYS,
    (arg("execution_id"), *FENCE, arg("source")),
    {"OK": record(Outcome), "ALREADY_SATISFIED": record(Replayed)},
)
CANCEL: Decl[Ended | Replayed] = Decl(
    "ff_cancel_execution",
    (ek("core"), routed("attempt hash"), routed("stream meta"), ek("lease_current"),
     ek("lease_history"), pk("lease_expiry"), routed("worker leases"), ek("suspension_current"),
     routed("waitpoint hash"), routed("waitpoint condition"), pk("suspension_timeout"),
     routed("lane terminal"), pk("attempt_timeout"), pk("execution_deadline"),
     routed("lane eligible"), routed("lane delayed"), routed("lane blocked:dependencies"),
     routed("lane blocked:budget"), routed("lane blocked:quota"), routed("lane blocked:route"),
     routed("lane blocked:operator")),
    (arg("execution_id"), arg("reason"), arg("source"), *FENCE),
    {"OK": record(Ended), "ALREADY_SATISFIED": record(Replayed)},
)  # fmt: skip
PROGRESS: Decl[Outcome] = Decl(
    "ff_update_progress",
    (ek("core"),),
    (arg("execution_id"), arg("lease_id"), opt("lease_epoch"), opt("progress_pct"),
     arg("progress_message")),
    ok(record(Outcome)),
)  # fmt: skip
EXPIRE: Decl[Ended | Outcome] = Decl(
    "ff_expire_execution",
    (ek("core"), routed("attempt hash"), routed("stream meta"), ek("lease_current"),
     ek("lease_history"), pk("lease_expiry"), routed("worker leases"), routed("lane active"),
     routed("lane terminal"), pk("attempt_timeout"), pk("execution_deadline"),
     routed("lane suspended"), pk("suspension_timeout"), ek("suspension_current")),
    (arg("execution_id"), arg("expire_reason")),
    {"OK": record(Ended), "ALREADY_SATISFIED": record(Outcome)},
)  # fmt: skip
REPLAY: Decl[PublicState] = Decl(
    "ff_replay_execution",
    (ek("core"), routed("lane terminal"), routed("lane eligible"), ek("lease_history")),
    (arg("execution_id"), arg("now_ms", default=""), tail("inbound_edge_ids")),
    ok(record(PublicState)),
)

BATCHES = (CREATES, COMPLETES)

DECLS = (
    CREATE,
    SET_TAGS,
    COMPLETE,
    FAIL,
    DELAY,
    WAIT_CHILDREN,
    CANCEL,
    PROGRESS,
    EXPIRE,
    REPLAY,
)


def _create_values(x: NewExecution) -> dict[str, object]:
    """`ff_create_execution`'s ARGV values for `x` (also each item of `ff_create_executions`)."""
    return {
        "execution_id": str(x.execution_id), "namespace": x.namespace, "lane_id": x.lane_id,
        "execution_kind": x.execution_kind, "priority": x.priority,
        "creator_identity": x.creator_identity, "policy_json": x.policy_json,
        "input_payload": x.input_payload, "delay_until": x.delay_until,
        "tags_json": dict(x.tags or {}), "execution_deadline_at": x.execution_deadline_at,
        "partition_id": x.execution_id.partition, "payload_encoding": x.payload_encoding,
        "quota_policy_id": x.quota_policy_id,
        "blocked_by_dependencies": x.blocked_by_dependencies,
        "concurrency_key": x.concurrency_key, "trace_context": x.trace_context,
    }  # fmt: skip


def _create_ctx(x: NewExecution) -> KeyCtx:
    return exec_ctx(
        x.execution_id, lane=x.lane_id, namespace=x.namespace, idempotency_key=x.idempotency_key
    )


class ExecutionFunctions:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def create_execution(self, x: NewExecution) -> Created | Duplicate:
        return await call(self.store, CREATE, _create_ctx(x), _create_values(x))

    async def create_executions(
        self, tag: str, partition: int, items: Sequence[NewExecution]
    ) -> CreatedMany:
        """Several creates on partition `partition` (tag `tag`) in one call: each item exactly
        as `create_execution`, answered on its own, in order (docs/lifecycle.md#batch-create;
        one batched Function, docs/lifecycle.md#batched-functions)."""
        assert all(x.execution_id.tag == tag for x in items), "one partition per call"
        replies: list[Created | Duplicate | FlowFabricError] = await call_batch(
            self.store, CREATES, [(_create_ctx(x), _create_values(x)) for x in items]
        )
        return CreatedMany(tuple(replies))

    async def set_execution_tags(self, eid: ExecutionId, tags: Mapping[str, str]) -> TagsSet:
        pairs = [v for k in sorted(tags) for v in (k, tags[k])]
        return await call(self.store, SET_TAGS, exec_ctx(eid), {"pairs": pairs})

    async def complete_execution(
        self, eid: ExecutionId, fence: Fence, result: bytes, encoding: str, source: str
    ) -> Outcome | Replayed:
        return await call(self.store, COMPLETE, exec_ctx(eid), {
            "execution_id": str(eid), **fence.values(), "result_payload": result,
            "source": source, "result_encoding": encoding,
        })  # fmt: skip

    async def complete_executions(
        self, items: Sequence[tuple[ExecutionId, Fence, bytes, str, str]]
    ) -> list[Outcome | Replayed | FlowFabricError]:
        """`complete_execution` for each (eid, fence, result, encoding, source), all on one
        partition, in one FCALL: per item its reply or its error, in order."""
        return await call_batch(self.store, COMPLETES, [(exec_ctx(eid), {
            "execution_id": str(eid), **fence.values(), "result_payload": result,
            "source": source, "result_encoding": encoding,
        }) for eid, fence, result, encoding, source in items])  # fmt: skip

    async def fail_execution(
        self, eid: ExecutionId, fence: Fence, reason: str, category: str, source: str,
        retry_policy_json: str = "", retry_after_ms: int | None = None, details: str = "",
    ) -> FailOutcome | FailReplayed:  # fmt: skip
        """`retry_policy_json` "" = the function reads the stored policy's retry_policy;
        `retry_after_ms` = that policy (or 3 retries) with a fixed backoff of that many ms."""
        return await call(self.store, FAIL, exec_ctx(eid), {
            "execution_id": str(eid), **fence.values(), "failure_reason": reason,
            "failure_category": category, "retry_policy_json": retry_policy_json,
            "source": source, "retry_after_ms": retry_after_ms, "failure_details": details,
        })  # fmt: skip

    async def delay_execution(
        self, eid: ExecutionId, fence: Fence, delay_until: int, source: str
    ) -> Delayed | DelayReplayed:
        return await call(self.store, DELAY, exec_ctx(eid), {
            "execution_id": str(eid), **fence.values(), "delay_until": delay_until,
            "source": source,
        })  # fmt: skip

    async def move_to_waiting_children(
        self, eid: ExecutionId, fence: Fence, source: str
    ) -> Outcome | Replayed:
        values = {"execution_id": str(eid), **fence.values(), "source": source}
        return await call(self.store, WAIT_CHILDREN, exec_ctx(eid), values)

    async def cancel_execution(
        self, eid: ExecutionId, reason: str, source: str, fence: Fence
    ) -> Ended | Replayed:
        values = {"execution_id": str(eid), "reason": reason, "source": source, **fence.values()}
        return await call(self.store, CANCEL, exec_ctx(eid), values)

    async def update_progress(
        self, eid: ExecutionId, fence: Fence, pct: int | None, message: str
    ) -> Outcome:
        return await call(self.store, PROGRESS, exec_ctx(eid), {
            "execution_id": str(eid), "lease_id": fence.lease_id,
            "lease_epoch": fence.lease_epoch, "progress_pct": pct, "progress_message": message,
        })  # fmt: skip

    async def expire_execution(self, eid: ExecutionId, reason: str) -> Ended | Outcome:
        values = {"execution_id": str(eid), "expire_reason": reason}
        return await call(self.store, EXPIRE, exec_ctx(eid), values)

    async def replay_execution(
        self, eid: ExecutionId, inbound_edge_ids: tuple[str, ...] = ()
    ) -> PublicState:
        """`inbound_edge_ids`: a skipped flow member's inbound edges (its flow's `in:` set), so
        the replay can reopen the impossible ones."""
        values = {"execution_id": str(eid), "inbound_edge_ids": inbound_edge_ids}
        return await call(self.store, REPLAY, exec_ctx(eid), values)
