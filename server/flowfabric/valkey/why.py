"""Why an execution is not running (docs/lifecycle.md#why-an-execution-is-not-running).

A read: the kind comes from the state vector already in hand (the core DescribeExecution read),
and the detail of a kind from a few pipelined reads of the keys the vector points at: the join
and its unresolved edges, then their upstreams, then the upstreams' states (three round trips,
the most any kind needs); the suspension record; the worker registry. Nothing is written: stale
worker index entries are skipped here, not pruned.

Budget and quota blocks are explained from what the block stored (`blocking_detail`) and the
execution's attachments (`budget_ids`, `quota_policy_id`); their messages have room for the
structured fields a budget or quota read will add.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from flowfabric.server.valkey.codec import enum_value, hash_to_dict, opt_int, text
from flowfabric.server.valkey.errors import FlowFabricError
from flowfabric.server.valkey.ids import (
    ExecutionId,
    budget_partition,
    parse_execution_id,
    quota_partition,
)
from flowfabric.server.valkey.keys import (
    LANE_CONTROL,
    WORKERS_INDEX,
    BudgetKeys,
    ExecKeys,
    QuotaKeys,
    WorkerKeys,
)
from flowfabric.server.valkey.store import Store, server_time_ms
from flowfabric.v1 import execution_pb2 as epb
from flowfabric.v1 import types_pb2 as t

K = epb.WhyNotRunning
UPSTREAMS_SHOWN = 20  # unresolved upstreams named in a dependency wait
WORKERS_READ = 256  # live workers compared against a capability wait
ANY_PARTITION = 1 << 16  # upstream ids come from our own records: range-check only the u16
_RETRY_AT = re.compile(r"retry[_ ]at[= ](\d{1,16})")

Explainer = Callable[[Store, ExecutionId, dict[str, str], epb.WhyNotRunning], Awaitable[None]]


def _ms(f: dict[str, str], name: str) -> int | None:
    try:
        return opt_int(f.get(name, ""))
    except (ValueError, FlowFabricError):
        return None  # an explanation never fails on a field it only decorates with


def _csv(value: str) -> list[str]:
    return [tok for tok in value.split(",") if tok]


@dataclass(frozen=True)
class Places:
    """The budget and quota partition counts, so a budget or quota block can be explained
    with live reads of the objects (0 = explain from the stored detail only)."""

    budget_partitions: int = 0
    quota_partitions: int = 0


NOWHERE = Places()


async def explain(
    store: Store, eid: ExecutionId, f: dict[str, str], places: Places = NOWHERE
) -> epb.WhyNotRunning:
    """The explanation for the execution whose core fields are `f`."""
    reason = f.get("blocking_reason") or "none"
    why = K(blocking_reason=enum_value(t.BlockingReason, reason))
    if f.get("blocking_detail"):
        why.blocking_detail = f["blocking_detail"]
    phase = f.get("lifecycle_phase", "")
    if phase == "terminal":
        _terminal(f, why)
    elif phase == "active":
        await _active(store, f, why)
    elif phase == "suspended":
        await _suspended(store, eid, f, why)
    elif phase == "runnable":
        state = f.get("eligibility_state", "")
        explainer = RUNNABLE.get(state)
        if state == "blocked_by_budget":
            await _budget(store, f, why, places)
        elif state == "blocked_by_quota":
            await _quota(store, f, why, places)
        elif explainer is None:
            _other(f, why)
        else:
            await explainer(store, eid, f, why)
    else:
        _other(f, why)
    return why


def _other(f: dict[str, str], why: epb.WhyNotRunning) -> None:
    why.kind = K.KIND_OTHER
    why.summary = (
        f"not explained: phase {f.get('lifecycle_phase') or '?'}, eligibility "
        f"{f.get('eligibility_state') or '?'}, ownership {f.get('ownership_state') or '?'}"
    )


def _terminal(f: dict[str, str], why: epb.WhyNotRunning) -> None:
    outcome = f.get("terminal_outcome") or "failed"
    why.kind = K.KIND_TERMINAL
    cause = f.get("failure_reason") or f.get("cancellation_reason") or ""
    cause = f": {cause}" if cause else ""
    why.summary = f"terminal ({outcome}{cause}); it runs again only if replayed"


async def _active(store: Store, f: dict[str, str], why: epb.WhyNotRunning) -> None:
    owner = f.get("ownership_state", "")
    expires = _ms(f, "lease_expires_at")
    worker = f.get("current_worker_instance_id") or "?"
    if owner == "leased" and (expires is None or expires > await server_time_ms(store)):
        why.kind = K.KIND_RUNNING
        why.summary = f"running on worker {worker} (attempt {f.get('current_attempt_index', '?')})"
        return
    why.kind = K.KIND_RECLAIMABLE
    lapse = "was revoked" if owner == "lease_revoked" else "expired"
    if owner == "lease_revoked":
        expires = _ms(f, "lease_revoked_at") or expires
    if expires is not None:
        why.eta_at = expires
    why.summary = (
        f"the lease of worker {worker} {lapse}; the next claim of lane "
        f"{f.get('lane_id', '')} reclaims it"
    )


async def _suspended(
    store: Store, eid: ExecutionId, f: dict[str, str], why: epb.WhyNotRunning
) -> None:
    s = hash_to_dict(await store.call("HGETALL", ExecKeys(eid).suspension_current))
    why.kind = K.KIND_SUSPENDED
    wait = epb.SuspensionWait(
        suspension_id=f.get("current_suspension_id") or s.get("suspension_id", ""),
        waitpoint_id=f.get("current_waitpoint_id") or s.get("waitpoint_id", ""),
        reason_code=s.get("reason_code", ""),
        timeout_behavior=s.get("timeout_behavior", ""),
        suspended_at=_ms(s, "created_at") or 0,
    )
    timeout = _ms(s, "timeout_at")
    if timeout is not None:
        wait.timeout_at = timeout
        why.eta_at = timeout
    why.suspension.CopyFrom(wait)
    on = f"waitpoint {wait.waitpoint_id}" if wait.waitpoint_id else "no waitpoint"
    if f.get("blocking_reason") == "paused_by_operator":
        why.summary = f"suspended for an operator ({on}); an operator resume or cancel moves it"
    else:
        why.summary = f"suspended ({wait.reason_code or 'waiting'}) on {on}"
    if timeout is not None:
        why.summary += f"; times out ({wait.timeout_behavior or 'fail'}) at {timeout}"


async def _eligible(
    store: Store, eid: ExecutionId, f: dict[str, str], why: epb.WhyNotRunning
) -> None:
    lane = f.get("lane_id", "")
    paused = await _lane_pause(store, lane)
    if paused is not None:  # eligible, but its lane hands nothing out (docs/lanes.md)
        why.kind = K.KIND_LANE_PAUSED
        why.summary = f"eligible, but lane {lane} is paused" + (f": {paused}" if paused else "")
        return
    why.kind = K.KIND_WAITING_FOR_WORKER
    why.summary = f"eligible; waiting for a worker to claim it from lane {lane}"


async def _lane_pause(store: Store, lane: str) -> str | None:
    """The pause reason of `lane` ("" when none was given), None when it is not paused: its
    entry in the lane control hash (docs/lanes.md#lane-control)."""
    raw = await store.call("HGET", LANE_CONTROL, lane)
    if raw is None:
        return None
    try:
        row = json.loads(text(raw))
    except ValueError:
        return None  # an explanation never fails on a field it only decorates with
    if not isinstance(row, dict) or row.get("state") != "paused":
        return None
    return str(row.get("reason", ""))


async def _delayed(
    store: Store, eid: ExecutionId, f: dict[str, str], why: epb.WhyNotRunning
) -> None:
    why.kind = K.KIND_DELAY
    due = _ms(f, "delay_until")
    what = "retry backoff" if f.get("blocking_reason") == "waiting_for_retry_backoff" else "delay"
    if due is None:
        why.summary = f"delayed ({what}), no due time recorded"
        return
    why.eta_at = due
    why.summary = f"delayed ({what}) until {due}"


async def _dependencies(
    store: Store, eid: ExecutionId, f: dict[str, str], why: epb.WhyNotRunning
) -> None:
    k = ExecKeys(eid)
    pipe = store.pipeline()
    pipe.hgetall(k.deps_meta)
    pipe.smembers(k.deps_unresolved)
    meta_raw, unresolved_raw = await store.run_pipeline(pipe)
    meta = hash_to_dict(meta_raw)
    edges = sorted(text(e) for e in unresolved_raw or ())
    wait = _join(meta, len(edges))
    shown = edges[:UPSTREAMS_SHOWN]
    if shown:
        pipe = store.pipeline()
        for edge in shown:
            pipe.hget(k.dep(edge), "upstream_execution_id")
        ups = [text(u) for u in await store.run_pipeline(pipe)]
        pipe = store.pipeline()
        parsed = [_upstream_id(u) for u in ups]
        for up in parsed:
            if up is not None:
                pipe.hget(ExecKeys(up).core, "public_state")
        states = iter(await store.run_pipeline(pipe) if any(parsed) else ())
        for edge, up_text, up in zip(shown, ups, parsed, strict=True):
            state = text(next(states)) if up is not None else ""
            wait.upstreams.append(
                epb.UnresolvedUpstream(
                    edge_id=edge,
                    execution_id=up_text,
                    public_state=_public(state),
                )
            )
    why.kind = K.KIND_DEPENDENCIES
    why.dependencies.CopyFrom(wait)
    if not meta and not edges:
        why.summary = "waiting for its flow to release it (no dependency edges yet)"
        return
    named = ", ".join(
        f"{u.execution_id} ({_public_name(u.public_state)})" for u in wait.upstreams[:3]
    )
    more = f" and {wait.unresolved - 3} more" if wait.unresolved > 3 else ""
    why.summary = (
        f"waiting for dependencies: join {wait.join_kind} needs {wait.required}, "
        f"{wait.satisfied} of {wait.total} satisfied, {wait.unresolved} unresolved"
        + (f" ({named}{more})" if named else "")
    )


def _public(stored: str) -> t.PublicState.ValueType:
    try:
        return enum_value(t.PublicState, stored) if stored else t.PUBLIC_STATE_UNSPECIFIED
    except FlowFabricError:
        return t.PUBLIC_STATE_UNSPECIFIED  # the upstream's own reads report its corruption


def _public_name(state: t.PublicState.ValueType) -> str:
    if state == t.PUBLIC_STATE_UNSPECIFIED:
        return "missing"
    return t.PublicState.Name(state).removeprefix("PUBLIC_STATE_").lower()


def _upstream_id(value: str) -> ExecutionId | None:
    try:
        return parse_execution_id(value, ANY_PARTITION)
    except FlowFabricError:
        return None  # a missing or unparsable edge copy: named as it is, without a state


def _join(meta: dict[str, str], unresolved: int) -> epb.DependencyWait:
    def count(name: str) -> int:
        return _ms(meta, name) or 0

    kind = meta.get("join_kind") or "all"
    total = count("total_count")
    expected = count("join_edges")
    if kind == "any":
        required = 1
    elif kind == "quorum":
        required = count("join_quorum") or total
    else:
        required = max(total, expected)
    return epb.DependencyWait(
        join_kind=kind,
        required=required,
        total=total,
        satisfied=count("satisfied_count"),
        impossible=count("impossible_required_count"),
        unresolved=unresolved,
    )


async def _route(store: Store, eid: ExecutionId, f: dict[str, str], why: epb.WhyNotRunning) -> None:
    required = sorted(set(_csv(f.get("required_capabilities", ""))))
    offered = await _live_capability_sets(store)
    union = frozenset().union(*offered) if offered else frozenset()
    wait = epb.CapabilityWait(
        required=required,
        missing=[tok for tok in required if tok not in union],
        live_workers=len(offered),
        capable_workers=sum(1 for caps in offered if set(required) <= caps),
    )
    mismatch = _ms(f, "last_capability_mismatch_at")
    if mismatch is not None:
        wait.last_mismatch_at = mismatch
    why.kind = K.KIND_CAPABILITY
    why.capability.CopyFrom(wait)
    needs = ",".join(required) or "(none)"
    if wait.capable_workers:
        why.summary = (
            f"requires {needs}; {wait.capable_workers} live worker(s) cover it, so the unblock "
            "scanner returns it to eligible on its next pass"
        )
    elif wait.missing:
        why.summary = (
            f"requires {needs}; no live worker offers {','.join(wait.missing)} "
            f"({wait.live_workers} live)"
        )
    else:
        why.summary = f"requires {needs}; no single live worker offers all of them"


async def _live_capability_sets(store: Store) -> list[frozenset[str]]:
    """Each live worker's capabilities, read-only: entries whose alive key is gone are skipped
    (pruning them is the registry's job, docs/lifecycle.md#the-worker-registry)."""
    instances = sorted(text(m) for m in await store.call("SMEMBERS", WORKERS_INDEX))
    instances = instances[:WORKERS_READ]
    if not instances:
        return []
    pipe = store.pipeline()
    for instance in instances:
        keys = WorkerKeys(instance)
        pipe.exists(keys.alive)
        pipe.get(keys.caps)
    rows = await store.run_pipeline(pipe)
    out = []
    for i in range(0, len(rows), 2):
        if rows[i]:
            out.append(frozenset(_csv(text(rows[i + 1]))))
    return out


# What a budget block records: `budget <id>: <dimension> <usage>/<limit>` (BudgetCheck).
_BUDGET_DETAIL = re.compile(r"^budget (\S+): (.+) (\d{1,19})/(\d{1,19})$")


async def _budget(store: Store, f: dict[str, str], why: epb.WhyNotRunning, places: Places) -> None:
    detail = f.get("blocking_detail", "")
    why.kind = K.KIND_BUDGET
    wait = epb.BudgetWait(budget_ids=_csv(f.get("budget_ids", "")), detail=detail)
    m = _BUDGET_DETAIL.match(detail)
    if m:
        wait.budget_id, wait.dimension = m.group(1), m.group(2)
        wait.usage, wait.limit = int(m.group(3)), int(m.group(4))
        reset = await _next_reset(store, wait.budget_id, places)
        if reset is not None:
            wait.next_reset_at = reset
            why.eta_at = reset
    why.budget.CopyFrom(wait)
    why.summary = f"blocked by a budget: {detail or 'no detail recorded'}"
    if why.HasField("eta_at"):
        why.summary += "; it resets at its next reset"


async def _next_reset(store: Store, budget_id: str, places: Places) -> int | None:
    """The budget's `next_reset_at`, when it has one (and the id is a budget's)."""
    if not places.budget_partitions or not valid_uuid(budget_id):
        return None
    keys = BudgetKeys.of(budget_partition(budget_id, places.budget_partitions), budget_id)
    raw = text(await store.call("HGET", keys.definition, "next_reset_at"))
    return int(raw) if raw.isdigit() and int(raw) > 0 else None


def valid_uuid(raw: str) -> bool:
    try:
        return str(uuid.UUID(raw)) == raw
    except ValueError:
        return False


async def quota_holders(
    store: Store, keys: QuotaKeys, concurrency_key: str, shown: int
) -> tuple[int, list[str]]:
    """How many executions hold the bucket's slots, and up to `shown` of them, oldest
    admission first (the bucket's admitted set, docs/budgets.md#keys)."""
    admitted = keys.bucket(concurrency_key).admitted
    pipe = store.pipeline()
    pipe.zcard(admitted)
    pipe.zrange(admitted, 0, shown - 1)
    total, members = await store.run_pipeline(pipe)
    return int(total or 0), [text(m) for m in members or []]


# What a quota block records: `... concurrency cap <c>` (QuotaCheck).
_CAP = re.compile(r"concurrency cap (\d{1,7})")
HOLDERS_SHOWN = 16


async def _quota(store: Store, f: dict[str, str], why: epb.WhyNotRunning, places: Places) -> None:
    detail = f.get("blocking_detail", "")
    concurrency = "concurrency" in detail
    why.kind = K.KIND_QUOTA_CONCURRENCY if concurrency else K.KIND_QUOTA_RATE
    qid = f.get("quota_policy_id", "")
    wait = epb.QuotaWait(
        quota_policy_id=qid, detail=detail, concurrency_key=f.get("concurrency_key", "")
    )
    retry = _RETRY_AT.search(detail)
    if retry:
        wait.retry_at = why.eta_at = int(retry.group(1))
    cap = _CAP.search(detail)
    if cap:
        wait.concurrency_cap = int(cap.group(1))
    if concurrency and places.quota_partitions and valid_uuid(qid):
        keys = QuotaKeys.of(quota_partition(qid, places.quota_partitions), qid)
        total, shown = await quota_holders(store, keys, wait.concurrency_key, HOLDERS_SHOWN)
        wait.holders_total = total
        wait.holders.extend(shown)
    why.quota.CopyFrom(wait)
    limit = "concurrency cap" if concurrency else "rate limit"
    why.summary = f"blocked by a quota's {limit}: {detail or 'no detail recorded'}"
    if wait.holders_total:
        why.summary += f"; {wait.holders_total} running hold its slots"


async def _operator(
    store: Store, eid: ExecutionId, f: dict[str, str], why: epb.WhyNotRunning
) -> None:
    why.kind = K.KIND_OPERATOR_PAUSE
    detail = f.get("blocking_detail", "")
    why.summary = "paused by an operator" + (f": {detail}" if detail else "")


async def _lane(store: Store, eid: ExecutionId, f: dict[str, str], why: epb.WhyNotRunning) -> None:
    why.kind = K.KIND_LANE_PAUSED
    detail = f.get("blocking_detail", "")
    why.summary = f"paused by the state of lane {f.get('lane_id', '')}" + (
        f": {detail}" if detail else ""
    )


# Runnable eligibility -> its explainer (docs/architecture.md#the-state-vector).
RUNNABLE: dict[str, Explainer] = {
    "eligible_now": _eligible,
    "not_eligible_until_time": _delayed,
    "blocked_by_dependencies": _dependencies,
    "blocked_by_route": _route,
    "blocked_by_operator": _operator,
    "blocked_by_lane_state": _lane,
}
