"""Helpers for calling the Functions library directly in tests."""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from flowfabric.server.valkey.codec import text
from flowfabric.server.valkey.functions import execution, scheduling, signal
from flowfabric.server.valkey.functions import lease as lease_fns
from flowfabric.server.valkey.functions import suspension as suspension_fns
from flowfabric.server.valkey.functions.core import Decl, KeyCtx, Raw, build, exec_ctx
from flowfabric.server.valkey.ids import ExecutionId
from flowfabric.server.valkey.keys import ExecKeys, PartitionKeys, WaitpointKeys
from flowfabric.server.valkey.store import Store, server_time_ms

LANE = "default"


def new_eid(partition: int = 7) -> ExecutionId:
    return ExecutionId(partition, str(uuid.uuid4()))


# -- the server's builder, with every value sent verbatim ------------------------------------------


def _raw(value: object) -> object:
    if isinstance(value, list | tuple):
        return [_raw(v) for v in value]
    return Raw(value if isinstance(value, bytes) else str(value))


def call_args(
    decl: Decl[Any],
    ctx: KeyCtx,
    values: Mapping[str, object],
    *,
    keys: Sequence[str] | None = None,
    patch: Mapping[int, str] | None = None,
) -> tuple[list[str], list[str | bytes]]:
    """(KEYS, ARGV) as `core.build` makes them for the server, each value sent as given (tests
    send malformed ones on purpose); `keys` replaces the KEYS, `patch` swaps single slots."""
    k, a = build(decl, ctx, {n: _raw(v) for n, v in values.items()}, keys=keys)
    for i, key in (patch or {}).items():
        k[i] = key
    return k, a


async def fcall(
    store: Store,
    decl: Decl[Any],
    ctx: KeyCtx,
    values: Mapping[str, object],
    *,
    keys: Sequence[str] | None = None,
    patch: Mapping[int, str] | None = None,
) -> list:
    """The raw reply of one call built by the server's builder (see `call_args`)."""
    k, a = call_args(decl, ctx, values, keys=keys, patch=patch)
    return await store.fcall(decl.name, k, a, read_only=decl.read_only)  # type: ignore[no-any-return]


def ctx_of(eid: ExecutionId, **more: Any) -> KeyCtx:
    return exec_ctx(eid, lane=LANE, **{"worker_instance_id": INSTANCE, **more})


def fence_values(fence: Sequence[str]) -> dict[str, object]:
    lid, epoch, aid = fence
    return {"lease_id": lid, "lease_epoch": epoch, "attempt_id": aid}


def create_args(eid: ExecutionId, **over: object) -> dict[str, object]:
    base: dict[str, object] = {
        "execution_id": str(eid),
        "namespace": "ns",
        "lane_id": LANE,
        "execution_kind": "k",
        "priority": "0",
        "creator_identity": "tester",
        "policy_json": "",
        "input_payload": b"",
        "delay_until": "",
        "dedup_ttl_ms": "",
        "tags_json": "",
        "execution_deadline_at": "",
        "partition_id": str(eid.partition),
        "payload_encoding": "",
        "quota_policy_id": "",
        "blocked_by_dependencies": "0",
    }
    unknown = set(over) - set(base)
    assert not unknown, f"not create arguments: {unknown}"
    base.update(over)
    return base


async def create(store: Store, eid: ExecutionId, idem: str | None = None, **over: object) -> list:
    ctx = ctx_of(eid, namespace="ns", idempotency_key=idem or "")
    return await fcall(store, execution.CREATE, ctx, create_args(eid, **over))


async def now_ms(store: Store) -> int:
    return await server_time_ms(store)


# -- lifecycle helpers ----------------------------------------------------------------------------

WORKER = "w1"
INSTANCE = "w1-i1"

LANE_SETS = (
    "eligible",
    "delayed",
    "active",
    "suspended",
    "terminal",
    "blocked:dependencies",
    "blocked:budget",
    "blocked:quota",
    "blocked:route",
    "blocked:operator",
)
ELIGIBILITY_SET = {
    "eligible_now": "eligible",
    "not_eligible_until_time": "delayed",
    "blocked_by_dependencies": "blocked:dependencies",
    "blocked_by_budget": "blocked:budget",
    "blocked_by_quota": "blocked:quota",
    "blocked_by_route": "blocked:route",
    "blocked_by_lane_state": "blocked:operator",
    "blocked_by_operator": "blocked:operator",
}
RUNNABLE_PUBLIC = {
    "eligible_now": "waiting",
    "not_eligible_until_time": "delayed",
    "blocked_by_dependencies": "waiting_children",
    "blocked_by_budget": "rate_limited",
    "blocked_by_quota": "rate_limited",
}
TERMINAL_PUBLIC = {
    "success": "completed",
    "failed": "failed",
    "cancelled": "cancelled",
    "expired": "expired",
    "skipped": "skipped",
}


@dataclass(frozen=True)
class Lease:
    """What a successful claim or reclaim returned."""

    eid: ExecutionId
    lease_id: str
    epoch: str
    expires_at: int
    attempt_id: str
    attempt_index: int
    attempt_type: str
    instance: str = INSTANCE

    @property
    def fence(self) -> list[str]:
        return [self.lease_id, self.epoch, self.attempt_id]

    @classmethod
    def from_reply(cls, eid: ExecutionId, reply: list, instance: str) -> Lease:
        assert reply[:2] == [1, b"OK"], reply
        lid, epoch, exp, aid, idx, kind = (v.decode() for v in reply[2:8])
        return cls(eid, lid, epoch, int(exp), aid, int(idx), kind, instance)


async def lease_from_core(store: Store, eid: ExecutionId) -> Lease:
    """The current lease as the core mirror records it."""
    c = await core_of(store, eid)
    return Lease(
        eid,
        c["current_lease_id"],
        c["current_lease_epoch"],
        int(c["lease_expires_at"]),
        c["current_attempt_id"],
        int(c["current_attempt_index"]),
        "",
        c["current_worker_instance_id"],
    )


def exec_key(eid: ExecutionId, suffix: str) -> str:
    """Per-execution keys the shared key schema does not name yet (suspension, deps)."""
    return f"ff:exec:{eid.tag}:{eid}:{suffix}"


async def core_of(store: Store, eid: ExecutionId) -> dict[str, str]:
    raw = await store.call("HGETALL", ExecKeys(eid).core)
    return {a.decode(): b.decode() for a, b in raw.items()}


async def hash_of(store: Store, key: str) -> dict[str, str]:
    raw = await store.call("HGETALL", key)
    return {a.decode(): b.decode() for a, b in raw.items()}


def grant_keys(eid: ExecutionId) -> list[str]:
    return call_args(scheduling.ISSUE_GRANT, ctx_of(eid), grant_values(eid, "", "", 0, ""))[0]


def grant_values(
    eid: ExecutionId, worker: str, instance: str, ttl: object, caps: str
) -> dict[str, object]:
    return {
        "execution_id": str(eid), "worker_id": worker, "worker_instance_id": instance,
        "lane_id": LANE, "capability_hash": "caphash", "grant_ttl_ms": ttl,
        "route_snapshot_json": "{}", "admission_summary": "", "worker_capabilities_csv": caps,
    }  # fmt: skip


async def issue_grant(
    store: Store,
    eid: ExecutionId,
    worker: str = WORKER,
    instance: str = INSTANCE,
    ttl: object = 10_000,
    caps: str = "",
) -> list:
    values = grant_values(eid, worker, instance, ttl, caps)
    return await fcall(store, scheduling.ISSUE_GRANT, ctx_of(eid), values)


def claim_keys(eid: ExecutionId, instance: str) -> list[str]:
    values = {a.name: "" for a in scheduling.CLAIM.argv}
    return call_args(scheduling.CLAIM, ctx_of(eid, worker_instance_id=instance), values)[0]


async def claim_raw(
    store: Store,
    eid: ExecutionId,
    worker: str = WORKER,
    instance: str = INSTANCE,
    ttl: object = 30_000,
    attempt_timeout_ms: str = "",
    attempt_policy_json: str = "",
    deadline: str = "",
    renew_before: object | None = None,
) -> list:
    if renew_before is None:
        renew_before = int(str(ttl)) * 2 // 3 if str(ttl).isdigit() else 0
    values = {
        "execution_id": str(eid), "worker_id": worker, "worker_instance_id": instance,
        "lane_id": LANE, "capability_hash": "caphash", "lease_id": f"lease-{uuid.uuid4()}",
        "lease_ttl_ms": ttl, "renew_before_ms": renew_before,
        "attempt_id": f"attempt-{uuid.uuid4()}", "attempt_policy_json": attempt_policy_json,
        "attempt_timeout_ms": attempt_timeout_ms, "execution_deadline_at": deadline,
    }  # fmt: skip
    ctx = ctx_of(eid, worker_instance_id=instance)
    return await fcall(store, scheduling.CLAIM, ctx, values)


async def claim(
    store: Store,
    eid: ExecutionId,
    worker: str = WORKER,
    instance: str = INSTANCE,
    ttl: int = 30_000,
    caps: str = "",
    **over: str,
) -> Lease:
    """Issue a grant for `worker`, then claim with it; asserts both succeed."""
    granted = await issue_grant(store, eid, worker, instance, caps=caps)
    assert granted[:2] == [1, b"OK"], granted
    reply = await claim_raw(store, eid, worker, instance, ttl, **over)
    return Lease.from_reply(eid, reply, instance)


async def create_and_claim(
    store: Store,
    ttl: int = 30_000,
    caps: str = "",
    attempt_timeout_ms: str = "",
    **create_over: object,
) -> Lease:
    """Create an execution (`create_over` = create arguments), then grant and claim it."""
    eid = new_eid()
    assert (await create(store, eid, **create_over))[1] == b"OK"
    return await claim(store, eid, ttl=ttl, caps=caps, attempt_timeout_ms=attempt_timeout_ms)


async def renew(
    store: Store,
    lease: Lease,
    ttl: int = 30_000,
    fence: list[str] | None = None,
    idx: object = None,
) -> list:
    values = {
        "execution_id": str(lease.eid), **fence_values(fence or lease.fence),
        "attempt_index": lease.attempt_index if idx is None else idx, "lease_ttl_ms": ttl,
        "lease_history_grace_ms": 5000,
    }  # fmt: skip
    return await fcall(store, lease_fns.RENEW, ctx_of(lease.eid), values)


async def complete(
    store: Store,
    eid: ExecutionId,
    fence: list[str],
    payload: bytes = b"",
    source: str = "lease_holder",
    encoding: str = "",
) -> list:
    values = {
        "execution_id": str(eid), **fence_values(fence), "result_payload": payload,
        "source": source, "result_encoding": encoding,
    }  # fmt: skip
    return await fcall(store, execution.COMPLETE, ctx_of(eid), values)


async def fail(
    store: Store,
    eid: ExecutionId,
    fence: list[str],
    reason: str = "boom",
    category: str = "error",
    retry_policy_json: str = "",
    source: str = "lease_holder",
    retry_after_ms: object = "",
) -> list:
    values = {
        "execution_id": str(eid), **fence_values(fence), "failure_reason": reason,
        "failure_category": category, "retry_policy_json": retry_policy_json, "source": source,
        "retry_after_ms": retry_after_ms,
    }  # fmt: skip
    return await fcall(store, execution.FAIL, ctx_of(eid), values)


async def delay(
    store: Store, eid: ExecutionId, fence: list[str], until: object, source: str = "lease_holder"
) -> list:
    values = {"execution_id": str(eid), **fence_values(fence), "delay_until": until,
              "source": source}  # fmt: skip
    return await fcall(store, execution.DELAY, ctx_of(eid), values)


async def move_to_children(
    store: Store, eid: ExecutionId, fence: list[str], source: str = "lease_holder"
) -> list:
    values = {"execution_id": str(eid), **fence_values(fence), "source": source}
    return await fcall(store, execution.WAIT_CHILDREN, ctx_of(eid), values)


async def cancel(
    store: Store,
    eid: ExecutionId,
    reason: str = "stop",
    source: str = "operator_override",
    fence: list[str] | None = None,
) -> list:
    values = {"execution_id": str(eid), "reason": reason, "source": source,
              **fence_values(fence or ["", "", ""])}  # fmt: skip
    return await fcall(store, execution.CANCEL, ctx_of(eid), values)


async def expire(store: Store, eid: ExecutionId, reason: str = "attempt_timeout") -> list:
    values = {"execution_id": str(eid), "expire_reason": reason}
    return await fcall(store, execution.EXPIRE, ctx_of(eid), values)


async def promote(store: Store, eid: ExecutionId, now: int) -> list:
    values = {"execution_id": str(eid), "now_ms": now}
    return await fcall(store, scheduling.PROMOTE, ctx_of(eid), values)


async def replay(store: Store, eid: ExecutionId, edges: tuple[str, ...] = ()) -> list:
    p = PartitionKeys(eid.tag)
    ctx = ctx_of(eid)
    keys = call_args(execution.REPLAY, ctx, {"execution_id": str(eid)})[0]
    if edges:  # the optional keys of a skipped flow member (the server never sends them)
        keys += [
            p.lane(LANE, "blocked:dependencies"),
            exec_key(eid, "deps:meta"),
            exec_key(eid, "deps:unresolved"),
            *(exec_key(eid, f"dep:{e}") for e in edges),
        ]
    values = {"execution_id": str(eid), "now_ms": "0", "inbound_edge_ids": list(edges)}
    return await fcall(store, execution.REPLAY, ctx, values, keys=keys)


def mark_keys(eid: ExecutionId) -> list[str]:
    return call_args(lease_fns.MARK_EXPIRED, ctx_of(eid), {"execution_id": ""})[0]


async def mark_expired(store: Store, eid: ExecutionId) -> list:
    return await fcall(store, lease_fns.MARK_EXPIRED, ctx_of(eid), {"execution_id": str(eid)})


async def revoke(store: Store, eid: ExecutionId, expected: str = "", reason: str = "") -> list:
    values = {"execution_id": str(eid), "expected_lease_id": expected, "revoke_reason": reason}
    return await fcall(store, lease_fns.REVOKE, ctx_of(eid), values)


async def history_events(store: Store, eid: ExecutionId) -> list[dict[str, str]]:
    entries = await store.call("XRANGE", ExecKeys(eid).lease_history, "-", "+")
    return [{a.decode(): b.decode() for a, b in fields.items()} for _, fields in entries]


# -- invariants and snapshots ----------------------------------------------------------------------


def derive_public(c: dict[str, str]) -> str:
    phase = c["lifecycle_phase"]
    if phase == "terminal":
        return TERMINAL_PUBLIC.get(c["terminal_outcome"], "failed")
    if phase in ("suspended", "active"):
        return phase
    return RUNNABLE_PUBLIC.get(c["eligibility_state"], "waiting")


async def lane_sets_of(store: Store, eid: ExecutionId) -> list[str]:
    p = PartitionKeys(eid.tag)
    return [
        which
        for which in LANE_SETS
        if await store.call("ZSCORE", p.lane(LANE, which), str(eid)) is not None
    ]


async def check_namespace_side(store: Store, eid: ExecutionId, namespace: str) -> None:
    """docs/lifecycle.md#tenant-fairness: `eid` is in its namespace's sub-index, at the same
    score, exactly when it is in the lane's eligible set, and the namespace is in the namespace
    set exactly when its sub-index is not empty."""
    p = PartitionKeys(eid.tag)
    sub = p.lane_namespace(LANE, namespace)
    pipe = store.pipeline()
    pipe.zscore(p.lane(LANE, "eligible"), str(eid))
    pipe.zscore(sub, str(eid))
    pipe.zcard(sub)
    pipe.zscore(p.lane_namespaces(LANE), namespace)
    main, side, count, joined = await store.run_pipeline(pipe)
    assert main == side, (eid, namespace, main, side)
    assert (joined is not None) == (count > 0), (namespace, count, joined)


async def lane_eligible_by_namespace(
    store: Store, tag: str, lane: str = LANE
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """The lane's eligible set on partition `tag` and the sub-index of every namespace its
    members' cores name or the namespace set lists, each as member -> score."""
    p = PartitionKeys(tag)

    def scored(pairs: list) -> dict[str, float]:
        return {text(member): float(score) for member, score in pairs}

    main = scored(await store.call("ZRANGE", p.lane(lane, "eligible"), 0, -1, "WITHSCORES"))
    names = {text(n) for n in await store.call("ZRANGE", p.lane_namespaces(lane), 0, -1)}
    for eid in main:
        names.add(text(await store.call("HGET", f"ff:exec:{tag}:{eid}:core", "namespace") or b""))
    subs = {
        ns: scored(await store.call("ZRANGE", p.lane_namespace(lane, ns), 0, -1, "WITHSCORES"))
        for ns in names
    }
    return main, subs


async def check_lane_namespaces(store: Store, tag: str, lane: str = LANE) -> None:
    """The union of the lane's namespace sub-indexes is its eligible set (members and scores),
    each member under its core's namespace, and the namespace set lists exactly the namespaces
    with eligible work (docs/lifecycle.md#tenant-fairness)."""
    main, subs = await lane_eligible_by_namespace(store, tag, lane)
    union: dict[str, float] = {}
    for ns, members in subs.items():
        for eid in members:
            got = await store.call("HGET", f"ff:exec:{tag}:{eid}:core", "namespace")
            assert text(got or b"") == ns, (eid, ns)
        union.update(members)
    assert union == main
    raw = await store.call("ZRANGE", PartitionKeys(tag).lane_namespaces(lane), 0, -1)
    listed = {text(n) for n in raw}
    assert listed == {ns for ns, members in subs.items() if members}


async def check_invariants(store: Store, eid: ExecutionId) -> dict[str, str]:
    """docs/architecture.md#the-state-vector invariants and docs/architecture.md#the-state-vector
    index membership; returns the core."""
    c = await core_of(store, eid)
    p = PartitionKeys(eid.tag)
    phase, own, elig = c["lifecycle_phase"], c["ownership_state"], c["eligibility_state"]
    outcome, attempt = c["terminal_outcome"], c["attempt_state"]
    assert c["public_state"] == derive_public(c)
    assert (outcome != "none") == (phase == "terminal")
    assert c["current_lease_epoch"] != ""
    if c["blocking_reason"] == "none":
        assert c["blocking_detail"] == ""
    if phase in ("terminal", "suspended"):
        assert own != "leased"
    if phase == "terminal":
        assert (own, elig, c["blocking_reason"]) == ("unowned", "not_applicable", "none")
    if elig == "eligible_now":
        assert phase == "runnable"
    if phase == "active":
        assert own in ("leased", "lease_expired_reclaimable", "lease_revoked")
        assert attempt in ("running_attempt", "attempt_interrupted")
        assert c["current_attempt_id"]
    if phase == "runnable":
        assert attempt != "running_attempt"
        assert own == "unowned"
    expected = {"active": "active", "suspended": "suspended", "terminal": "terminal"}.get(phase)
    assert await lane_sets_of(store, eid) == [expected or ELIGIBILITY_SET[elig]]
    await check_namespace_side(store, eid, c["namespace"])
    in_expiry = await store.call("ZSCORE", p.lease_expiry, str(eid)) is not None
    assert in_expiry == (phase == "active")
    if own == "leased":
        holder = p.worker_leases(c["current_worker_instance_id"])
        assert await store.call("SISMEMBER", holder, str(eid)) == 1
        # the lane active set is scored at the lease expiry: claims find due leases by it
        score = await store.call("ZSCORE", p.lane(LANE, "active"), str(eid))
        assert int(float(score)) == int(c["lease_expires_at"])
    started = 0
    for i in range(int(c["total_attempt_count"])):
        state = await store.call("HGET", ExecKeys(eid).attempt(i), "attempt_state")
        started += state == b"started"
    assert started <= 1
    return c


async def snapshot(store: Store, eid: ExecutionId, instances: tuple[str, ...] = ()) -> dict:
    """Everything lifecycle functions write for one execution (for "nothing changed" checks)."""
    k, p = ExecKeys(eid), PartitionKeys(eid.tag)
    out: dict = {
        "core": await store.call("HGETALL", k.core),
        "lease": await store.call("HGETALL", k.lease_current),
        "grant": await store.call("HGETALL", k.claim_grant),
        "history": await store.call("XLEN", k.lease_history),
        "result": await store.call("GET", k.result),
        "attempts": await store.call("ZRANGE", k.attempts, 0, -1, "WITHSCORES"),
    }
    for which in LANE_SETS:
        out[which] = await store.call("ZSCORE", p.lane(LANE, which), str(eid))
    for name in ("lease_expiry", "attempt_timeout", "execution_deadline", "suspension_timeout"):
        out[name] = await store.call("ZSCORE", f"ff:idx:{eid.tag}:{name}", str(eid))
    for i in range(4):
        out[f"attempt{i}"] = await store.call("HGETALL", k.attempt(i))
        out[f"meta{i}"] = await store.call("HGETALL", k.stream_meta(i))
    for inst in (INSTANCE, *instances):
        out[inst] = await store.call("SISMEMBER", p.worker_leases(inst), str(eid))
    return out


async def open_stream(store: Store, eid: ExecutionId, idx: int) -> None:
    """A stream meta as the first append would create it (streams are another area's), with
    the core's pointer to it (`stream_attempt`)."""
    await store.call(
        "HSET", ExecKeys(eid).stream_meta(idx), "stream_id", f"{eid}:{idx}", "closed_at", ""
    )
    await store.call("HSET", ExecKeys(eid).stream_meta(idx), "closed_reason", "")
    await store.call("HSET", ExecKeys(eid).core, "stream_attempt", str(idx))


# -- pub/sub ---------------------------------------------------------------------------------------


class Listener:
    """Messages published on one channel since subscribing (JSON-decoded)."""

    def __init__(self, pubsub: aioredis.client.PubSub) -> None:
        self.pubsub = pubsub

    async def drain(self, wait: float = 0.3) -> list[dict]:
        out = []
        while (msg := await self.pubsub.get_message(timeout=wait)) is not None:
            if msg["type"] in ("message", "smessage"):
                out.append(json.loads(msg["data"]))
        return out


@asynccontextmanager
async def listening(store: Store, channel: str, sharded: bool = False) -> AsyncIterator[Listener]:
    """Subscribe on the node that sees `channel` (the slot owner for a sharded channel)."""
    if store.cluster:
        node = (
            store.client.get_node_from_key(channel) if sharded else store.client.get_primaries()[0]
        )
        host, port = node.host, node.port
    else:
        kwargs = store.client.connection_pool.connection_kwargs
        host, port = kwargs["host"], kwargs["port"]
    client = aioredis.Redis(host=host, port=port)
    pubsub = client.pubsub()
    try:
        await (pubsub.ssubscribe(channel) if sharded else pubsub.subscribe(channel))
        confirm = await pubsub.get_message(timeout=2.0)
        assert confirm is not None and confirm["type"] in ("subscribe", "ssubscribe")
        yield Listener(pubsub)
    finally:
        await pubsub.aclose()
        await client.aclose()


# -- stand-ins for other areas ---------------------------------------------------------------------


async def fake_suspend(store: Store, lease: Lease, timeout_at: int) -> str:
    """What suspend_execution (suspension area, not built yet) leaves behind; returns the
    waitpoint id."""
    eid, now = lease.eid, await now_ms(store)
    k, p = ExecKeys(eid), PartitionKeys(eid.tag)
    wp, sid = str(uuid.uuid4()), str(uuid.uuid4())
    vector = {
        "lifecycle_phase": "suspended",
        "ownership_state": "unowned",
        "eligibility_state": "not_applicable",
        "blocking_reason": "waiting_for_signal",
        "blocking_detail": "waiting for signal",
        "terminal_outcome": "none",
        "attempt_state": "attempt_interrupted",
        "public_state": "suspended",
        "current_suspension_id": sid,
        "current_waitpoint_id": wp,
        "current_lease_id": "",
        "current_worker_id": "",
        "current_worker_instance_id": "",
        "lease_expires_at": "",
    }
    await store.call("HSET", k.core, *(x for kv in vector.items() for x in kv))
    attempt = k.attempt(lease.attempt_index)
    await store.call("HSET", attempt, "attempt_state", "suspended", "suspended_at", str(now))
    suspension = exec_key(eid, "suspension:current")
    await store.call("HSET", suspension, "suspension_id", sid, "waitpoint_id", wp, "closed_at", "")
    await store.call("HSET", f"ff:wp:{eid.tag}:{wp}", "state", "active", "closed_at", "")
    await store.call("HSET", f"ff:wp:{eid.tag}:{wp}:condition", "closed", "0")
    await store.call("DEL", k.lease_current)
    await store.call("ZREM", p.lease_expiry, str(eid))
    await store.call("ZREM", p.lane(LANE, "active"), str(eid))
    await store.call("ZREM", p.attempt_timeout, str(eid))
    await store.call("SREM", p.worker_leases(lease.instance), str(eid))
    await store.call("ZADD", p.lane(LANE, "suspended"), timeout_at, str(eid))
    await store.call("ZADD", p.suspension_timeout, timeout_at, str(eid))
    return wp


async def make_flow_member(store: Store, eid: ExecutionId, flow_id: str = "flow-1") -> None:
    """What add_execution_to_flow (flows area, not built yet) stamps on the core."""
    await store.call("HSET", ExecKeys(eid).core, "flow_id", flow_id)


# -- suspension, waitpoints and signals (docs/suspension.md)
# -------------------------------------------------

HMAC_SECRET = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"


def keystore(eid: ExecutionId) -> str:
    return PartitionKeys(eid.tag).hmac_keystore


async def install_secret(
    store: Store, eid: ExecutionId, secret: str = HMAC_SECRET, kid: str = "k1"
) -> list:
    return await fcall(store, signal.INSTALL, ctx_of(eid), {"kid": kid, "secret_hex": secret})


def hmac_token(secret_hex: str, wpid: str, wpkey: str, created_at: object, kid: str = "k1") -> str:
    """docs/suspension.md#waitpoint-tokens, computed with Python's hmac module."""
    msg = f"{wpid}|{wpkey}|{created_at}".encode()
    return f"{kid}:{hmac.new(bytes.fromhex(secret_hex), msg, hashlib.sha1).hexdigest()}"


def flip_last(token: str) -> str:
    return token[:-1] + ("0" if token[-1] != "0" else "1")


def wp_key(eid: ExecutionId, wpid: str) -> str:
    return WaitpointKeys(eid.tag, wpid).waitpoint


async def create_pending(
    store: Store,
    lease: Lease,
    wpid: str | None = None,
    expires_in_ms: object = 60_000,
    fence: list[str] | None = None,
    idx: object = None,
    ks: str | None = None,
    wpkey: str | None = None,
) -> list:
    eid = lease.eid
    wpid = wpid or str(uuid.uuid4())
    values = {
        "execution_id": str(eid), **fence_values(lease.fence if fence is None else fence),
        "attempt_index": lease.attempt_index if idx is None else idx, "waitpoint_id": wpid,
        "waitpoint_key": f"wpk:{wpid}" if wpkey is None else wpkey,
        "expires_in_ms": expires_in_ms,
    }  # fmt: skip
    ctx = ctx_of(eid, waitpoint_id=wpid)
    patch = {3: ks} if ks else None
    return await fcall(store, suspension_fns.CREATE_PENDING, ctx, values, patch=patch)


def condition(*names: str, mode: str | None = None, minimum: int = 1, **extra: object) -> str:
    """resume_condition_json as the reference SDK builds it (any for <= 1 name, all for >= 2)."""
    body: dict[str, object] = {
        "condition_type": "signal_set",
        "required_signal_names": list(names),
        "signal_match_mode": mode or ("all" if len(names) >= 2 else "any"),
        "minimum_signal_count": minimum,
    }
    body.update(extra)
    return json.dumps(body)


async def suspend(
    store: Store,
    lease: Lease,
    cond: str | None = None,
    wpid: str | None = None,
    reason: str = "waiting_for_signal",
    timeout_at: object = "",
    behavior: str = "",
    use_pending: bool = False,
    policy: str = "",
    fence: list[str] | None = None,
    idx: object = None,
    sid: str | None = None,
    ks: str | None = None,
    timeout_in_ms: object = "",
) -> list:
    eid = lease.eid
    wpid = wpid or str(uuid.uuid4())
    values = {
        "execution_id": str(eid), **fence_values(lease.fence if fence is None else fence),
        "attempt_index": lease.attempt_index if idx is None else idx,
        "suspension_id": sid or str(uuid.uuid4()), "waitpoint_id": wpid,
        "waitpoint_key": f"wpk:{wpid}", "reason_code": reason, "requested_by": "worker",
        "resume_condition_json": condition("go") if cond is None else cond,
        "resume_policy_json": policy, "continuation_metadata_pointer": "cont-ptr",
        "timeout_at": timeout_at, "use_pending_waitpoint": "1" if use_pending else "0",
        "timeout_behavior": behavior, "timeout_in_ms": timeout_in_ms,
    }  # fmt: skip
    ctx = ctx_of(eid, waitpoint_id=wpid)
    patch = {3: ks} if ks else None
    return await fcall(store, suspension_fns.SUSPEND, ctx, values, patch=patch)


def _signal_ctx(eid: ExecutionId, wpid: str, sig: str, idem: str = "") -> KeyCtx:
    return ctx_of(eid, waitpoint_id=wpid, signal_id=sig, idempotency_key=idem)


def signal_keys(eid: ExecutionId, wpid: str, sig: str, idem: str = "") -> list[str]:
    values = {a.name: "" for a in signal.DELIVER.argv}
    return call_args(signal.DELIVER, _signal_ctx(eid, wpid, sig, idem), values)[0]


async def send_signal(
    store: Store,
    eid: ExecutionId,
    wpid: str,
    token: str,
    name: str = "go",
    buffer: bool = False,
    sig: str | None = None,
    payload: bytes = b"",
    idem: str = "",
    delay: object = "",
    limit: object = "",
    ttl: object = "",
    maxlen: object = "",
    keys: list[str] | None = None,
) -> list:
    """ff_deliver_signal (or the buffer function) with everything else defaulted."""
    sig = sig or str(uuid.uuid4())
    values = {
        "execution_id": str(eid), "waitpoint_id": wpid, "signal_id": sig, "signal_name": name,
        "signal_category": "callback", "source_type": "webhook", "source_identity": "tester",
        "payload": payload, "payload_encoding": "", "correlation_id": "corr-1",
        "idempotency_key": idem, "target_scope": "", "created_at": "", "dedup_ttl_ms": ttl,
        "resume_delay_ms": delay, "max_signals_per_execution": limit, "signal_maxlen": maxlen,
        "waitpoint_token": token,
    }  # fmt: skip
    decl = signal.BUFFER if buffer else signal.DELIVER
    return await fcall(store, decl, _signal_ctx(eid, wpid, sig, idem), values, keys=keys)


async def resume(
    store: Store, eid: ExecutionId, trigger: str = "operator", delay: object = ""
) -> list:
    values = {"execution_id": str(eid), "trigger_type": trigger, "resume_delay_ms": delay}
    return await fcall(store, suspension_fns.RESUME, ctx_of(eid), values)


async def close_wp(store: Store, eid: ExecutionId, wpid: str, reason: str = "") -> list:
    values = {"execution_id": str(eid), "waitpoint_id": wpid, "reason": reason}
    return await fcall(
        store, suspension_fns.CLOSE_WAITPOINT, ctx_of(eid, waitpoint_id=wpid), values
    )


async def expire_suspension(store: Store, eid: ExecutionId) -> list:
    values = {"execution_id": str(eid)}
    return await fcall(store, suspension_fns.EXPIRE_SUSPENSION, ctx_of(eid), values)


async def resume_signals(store: Store, eid: ExecutionId, idx: int = 0) -> list[tuple[dict, bytes]]:
    values = {"execution_id": str(eid), "attempt_index": idx}
    reply = await fcall(store, suspension_fns.READ_RESUME_SIGNALS, ctx_of(eid), values)
    assert reply[:2] == [1, b"OK"], reply
    n, rest = int(reply[2]), reply[3:]
    out = []
    for i in range(n):
        flat = rest[2 * i]
        fields = {flat[j].decode(): flat[j + 1].decode() for j in range(0, len(flat), 2)}
        out.append((fields, rest[2 * i + 1]))
    return out


async def list_waitpoints(store: Store, eid: ExecutionId) -> list:
    values = {"execution_id": str(eid)}
    return await fcall(store, suspension_fns.LIST_WAITPOINTS, ctx_of(eid), values)


async def rotate(store: Store, ks: str, kid: str, secret: str, grace: object = 600_000) -> list:
    values = {"new_kid": kid, "new_secret_hex": secret, "grace_ms": grace}
    return await fcall(store, signal.ROTATE, KeyCtx(tag="-"), values, keys=[ks])


async def list_kids(store: Store, ks: str) -> list:
    return await fcall(store, signal.LIST_KIDS, KeyCtx(tag="-"), {}, keys=[ks])


async def leased(store: Store, **create_over: object) -> Lease:
    """A claimed execution on a partition whose keystore holds HMAC_SECRET as k1."""
    lease = await create_and_claim(store, **create_over)
    await install_secret(store, lease.eid)
    return lease


async def suspended(
    store: Store, cond: str | None = None, **over: object
) -> tuple[Lease, str, str]:
    """A leased execution suspended on a fresh waitpoint: (lease, waitpoint id, token)."""
    lease = await leased(store)
    wpid = str(uuid.uuid4())
    reply = await suspend(store, lease, cond, wpid=wpid, **over)  # type: ignore[arg-type]
    assert reply[:2] == [1, b"OK"], reply
    return lease, wpid, reply[5].decode()
