"""Class C reads (docs/lifecycle.md#reads): direct reads of exec_core and indexes, no FCALL.

Stored values are parsed strictly: an unknown state string or a malformed number is a
`corrupt_record` error, never a silent default.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

from flowfabric.server.valkey import why
from flowfabric.server.valkey.codec import enum_value, hash_to_dict, int64, opt_int, text
from flowfabric.server.valkey.errors import FlowFabricError, InvalidInput
from flowfabric.server.valkey.ids import ExecutionId, parse_execution_id
from flowfabric.server.valkey.keys import ExecKeys, PartitionKeys
from flowfabric.server.valkey.store import Store
from flowfabric.v1 import execution_pb2 as epb
from flowfabric.v1 import types_pb2 as t

LIST_STATES = ("eligible", "delayed", "terminal", "suspended", "active")
LIST_FIELDS = ("namespace", "lane_id", "execution_kind", "public_state", "priority", "created_at")
PARTITIONS_PER_ROUND = 32
ATTEMPTS_SHOWN = 20  # ExecutionSnapshot.attempts: the latest this many


def _int(fields: dict[str, str], name: str, default: int | None = None) -> int:
    raw = fields.get(name, "")
    if raw == "" and default is not None:
        return default
    try:
        return int64(int(raw))
    except ValueError:
        raise FlowFabricError(
            "corrupt_record", message=f"exec_core field {name} is not an integer: {raw!r}"
        ) from None


def state_vector(f: dict[str, str]) -> t.StateVector:
    return t.StateVector(
        lifecycle_phase=enum_value(t.LifecyclePhase, f.get("lifecycle_phase", "")),
        ownership_state=enum_value(t.OwnershipState, f.get("ownership_state", "")),
        eligibility_state=enum_value(t.EligibilityState, f.get("eligibility_state", "")),
        blocking_reason=enum_value(t.BlockingReason, f.get("blocking_reason", "")),
        terminal_outcome=enum_value(t.TerminalOutcome, f.get("terminal_outcome", "")),
        attempt_state=enum_value(t.AttemptState, f.get("attempt_state", "")),
    )


async def _core(store: Store, eid: ExecutionId) -> dict[str, str]:
    fields = hash_to_dict(await store.call("HGETALL", ExecKeys(eid).core))
    if not fields:
        raise FlowFabricError("execution_not_found", message=f"no execution {eid}")
    return fields


def _failed_index(f: dict[str, str]) -> str:
    """The attempt a stored failure belongs to: the one a retry is pending after, else the
    current one."""
    return f.get("pending_previous_attempt_index") or f.get("current_attempt_index") or ""


def last_failure(f: dict[str, str], attempt: dict[str, str]) -> t.LastFailure | None:
    """The core's failure (docs/lifecycle.md#why-did-it-fail) with its attempt's detail; None
    when the execution has not failed."""
    reason = f.get("failure_reason") or f.get("cancellation_reason") or ""
    if not reason:
        return None
    return t.LastFailure(
        reason=reason,
        category=attempt.get("failure_category", ""),
        attempt_index=max(0, _int(attempt, "attempt_index", 0)),
        worker_instance_id=attempt.get("worker_instance_id", ""),
        failed_at=_int(attempt, "ended_at", 0) or _int(f, "completed_at", 0),
        details=attempt.get("failure_details", ""),
    )


async def _failure(store: Store, eid: ExecutionId, f: dict[str, str]) -> t.LastFailure | None:
    if not (f.get("failure_reason") or f.get("cancellation_reason")):
        return None
    idx = _failed_index(f)
    attempt: dict[str, str] = {}
    if idx.isdigit():
        attempt = hash_to_dict(await store.call("HGETALL", ExecKeys(eid).attempt(int(idx))))
    return last_failure(f, attempt)


def attempt_outcome(a: dict[str, str]) -> t.AttemptOutcome:
    return t.AttemptOutcome(
        attempt_index=max(0, _int(a, "attempt_index", 0)),
        outcome=a.get("attempt_state", ""),
        started_at=_int(a, "started_at", 0),
        ended_at=opt_int(a.get("ended_at", "")),
        worker_instance_id=a.get("worker_instance_id", ""),
        failure_reason=a.get("failure_reason", ""),
        failure_category=a.get("failure_category", ""),
    )


async def _attempts(store: Store, eid: ExecutionId, total: int) -> list[dict[str, str]]:
    """The latest ATTEMPTS_SHOWN attempt hashes, oldest first: attempts are numbered 0 ..
    total_attempt_count - 1 (a claim starts the next one)."""
    k = ExecKeys(eid)
    idxs = list(range(max(0, total - ATTEMPTS_SHOWN), total))
    if not idxs:
        return []
    pipe = store.pipeline()
    for i in idxs:
        pipe.hgetall(k.attempt(i))
    rows = [hash_to_dict(r) for r in await store.run_pipeline(pipe)]
    return [r for r in rows if r]


async def get_execution(store: Store, eid: ExecutionId) -> t.ExecutionInfo:
    f = await _core(store, eid)
    failure = await _failure(store, eid, f)
    return t.ExecutionInfo(
        last_failure=failure,
        execution_id=str(eid),
        namespace=f.get("namespace", ""),
        lane_id=f.get("lane_id", ""),
        priority=_int(f, "priority", 0),
        execution_kind=f.get("execution_kind", ""),
        state_vector=state_vector(f),
        public_state=enum_value(t.PublicState, f.get("public_state", "")),
        created_at=_int(f, "created_at"),
        started_at=opt_int(f.get("started_at", "")),
        completed_at=opt_int(f.get("completed_at", "")),
        current_attempt_index=_int(f, "current_attempt_index", 0),
        flow_id=f.get("flow_id") or None,
        blocking_detail=f.get("blocking_detail", ""),
    )


async def get_public_state(store: Store, eid: ExecutionId) -> int:
    raw = await store.call("HGET", ExecKeys(eid).core, "public_state")
    if raw is None:
        raise FlowFabricError("execution_not_found", message=f"no execution {eid}")
    return enum_value(t.PublicState, text(raw))


async def describe_execution(
    store: Store, eid: ExecutionId, places: why.Places = why.NOWHERE
) -> tuple[t.ExecutionSnapshot, epb.WhyNotRunning]:
    """The snapshot and why the execution is not running
    (docs/lifecycle.md#why-an-execution-is-not-running), both from one core read."""
    k = ExecKeys(eid)
    pipe = store.pipeline()
    pipe.hgetall(k.core)
    pipe.hgetall(k.tags)
    core_raw, tags_raw = await store.run_pipeline(pipe)
    f = hash_to_dict(core_raw)
    if not f:
        raise FlowFabricError("execution_not_found", message=f"no execution {eid}")
    snap = t.ExecutionSnapshot(
        execution_id=str(eid),
        flow_id=f.get("flow_id") or None,
        lane_id=f.get("lane_id", ""),
        namespace=f.get("namespace", ""),
        public_state=enum_value(t.PublicState, f.get("public_state", "")),
        blocking_reason=enum_value(t.BlockingReason, f.get("blocking_reason") or "none"),
        blocking_detail=f.get("blocking_detail") or None,
        current_waitpoint=f.get("current_waitpoint_id") or None,
        created_at=_int(f, "created_at"),
        last_mutation_at=_int(f, "last_mutation_at"),
        total_attempt_count=_int(f, "total_attempt_count", 0),
        tags=hash_to_dict(tags_raw),
        progress_pct=opt_int(f.get("progress_pct", "")),
        progress_message=f.get("progress_message") or None,
        progress_updated_at=opt_int(f.get("progress_updated_at", "")),
        execution_kind=f.get("execution_kind", ""),
        priority=_int(f, "priority", 0),
    )
    attempts = await _attempts(store, eid, _int(f, "total_attempt_count", 0))
    snap.attempts.extend(attempt_outcome(a) for a in attempts)
    idx = _failed_index(f)
    failed = next((a for a in attempts if a.get("attempt_index") == idx), None)
    failure = last_failure(f, failed) if failed is not None else await _failure(store, eid, f)
    if failure is not None:
        snap.last_failure.CopyFrom(failure)
    if f.get("current_attempt_id"):
        snap.current_attempt.CopyFrom(
            t.AttemptSummary(
                attempt_id=f["current_attempt_id"],
                attempt_index=_int(f, "current_attempt_index"),
            )
        )
    if f.get("current_worker_instance_id") and f.get("lease_expires_at"):
        snap.current_lease.CopyFrom(
            t.LeaseSummary(
                lease_epoch=_int(f, "current_lease_epoch"),
                worker_instance_id=f["current_worker_instance_id"],
                expires_at=_int(f, "lease_expires_at"),
            )
        )
    return snap, await why.explain(store, eid, f, places)


NO_RESULT = {"failed": "execution_failed", "cancelled": "execution_cancelled",
             "expired": "execution_expired"}  # fmt: skip


async def get_result(store: Store, eid: ExecutionId) -> tuple[bytes, str]:
    """The result; an execution that ended without one is `execution_<outcome>` with its
    failure, one still running `result_not_found` (docs/lifecycle.md#why-did-it-fail)."""
    k = ExecKeys(eid)
    pipe = store.pipeline()
    pipe.get(k.result)
    pipe.hgetall(k.core)
    payload, core_raw = await store.run_pipeline(pipe)
    f = hash_to_dict(core_raw)
    if not f:
        raise FlowFabricError("execution_not_found", message=f"no execution {eid}")
    if payload is not None:
        return bytes(payload), f.get("result_encoding", "")
    outcome = f.get("terminal_outcome", "")
    if f.get("lifecycle_phase") == "terminal" and outcome in NO_RESULT:
        failure = await _failure(store, eid, f) or t.LastFailure()
        raise FlowFabricError(
            NO_RESULT[outcome],
            message=f"execution {eid} {outcome}: {failure.reason}",
            metadata={
                "failure_reason": failure.reason,
                "failure_category": failure.category,
                "attempt_index": str(failure.attempt_index),
            },
        )
    raise FlowFabricError("result_not_found", message=f"execution {eid} has not finished yet")


@dataclass(frozen=True)
class Page:
    partition: int
    offset: int

    def token(self) -> str:
        return base64.urlsafe_b64encode(f"v1:{self.partition}:{self.offset}".encode()).decode()

    @classmethod
    def parse(cls, token: str) -> Page:
        try:
            tag, part, off = base64.urlsafe_b64decode(token.encode()).decode().split(":")
            if tag != "v1":
                raise ValueError(tag)
            return cls(int(part), int(off))
        except (ValueError, UnicodeDecodeError):
            raise InvalidInput("page_token", "page_token is malformed") from None


async def list_executions(
    store: Store,
    *,
    num_partitions: int,
    lane: str,
    state: str,
    limit: int,
    partition: int | None,
    page: Page | None,
    public_states: frozenset[int] = frozenset(),
) -> tuple[list[t.ExecutionSummary], Page | None]:
    """One lane index, in score order, walking partitions when none is named.

    `public_states` (non-empty) keeps only the executions in one of them: the page still reads
    at most `limit` index entries, so a filtered page may be short, even empty, with a next
    page (docs/lifecycle.md#reads)."""
    start = page or Page(partition if partition is not None else 0, 0)
    last = start.partition if partition is not None else num_partitions - 1
    ids: list[tuple[int, int, str]] = []  # (partition, offset-after, eid)
    cursor, offset = start.partition, start.offset
    while cursor <= last and len(ids) < limit:
        batch = list(range(cursor, min(cursor + PARTITIONS_PER_ROUND, last + 1)))
        pipe = store.pipeline()
        for i, p in enumerate(batch):
            off = offset if i == 0 else 0
            key = PartitionKeys.of(p).lane(lane, state)
            pipe.zrange(key, "-inf", "+inf", byscore=True, offset=off, num=limit)
        results = await store.run_pipeline(pipe)
        for i, (p, members) in enumerate(zip(batch, results, strict=True)):
            off = offset if i == 0 else 0
            for j, member in enumerate(members):
                if len(ids) < limit:
                    ids.append((p, off + j + 1, text(member)))
        cursor, offset = batch[-1] + 1, 0
    next_page: Page | None = None
    if ids and len(ids) == limit:
        p, off, _ = ids[-1]
        next_page = Page(p, off)
    elif cursor <= last:
        next_page = Page(cursor, 0)
    rows = await _summaries(store, [eid for _, _, eid in ids], num_partitions)
    if public_states:
        rows = [row for row in rows if row.public_state in public_states]
    return rows, next_page


async def _summaries(
    store: Store, members: list[str], num_partitions: int
) -> list[t.ExecutionSummary]:

    parsed = []
    for member in members:
        try:
            parsed.append(parse_execution_id(member, num_partitions))
        except FlowFabricError:
            continue  # unparsable index members are skipped (docs/lifecycle.md#reads)
    if not parsed:
        return []
    pipe = store.pipeline()
    for eid in parsed:
        pipe.hmget(ExecKeys(eid).core, list(LIST_FIELDS))
    rows = await store.run_pipeline(pipe)
    out = []
    for eid, row in zip(parsed, rows, strict=True):
        f = dict(zip(LIST_FIELDS, (text(v) for v in row), strict=True))
        if not f["public_state"]:
            continue  # removed between the index read and the core read
        out.append(
            t.ExecutionSummary(
                execution_id=str(eid),
                namespace=f["namespace"],
                lane_id=f["lane_id"],
                execution_kind=f["execution_kind"],
                public_state=enum_value(t.PublicState, f["public_state"]),
                priority=_int(f, "priority", 0),
                created_at=_int(f, "created_at", 0),
            )
        )
    return out
