"""Helpers for calling the Functions library directly in tests."""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import redis.asyncio as aioredis

from flowfabric.server.valkey.ids import ExecutionId
from flowfabric.server.valkey.keys import ExecKeys, PartitionKeys, WaitpointKeys, signal_key
from flowfabric.server.valkey.store import Store, server_time_ms

LANE = "default"


def new_eid(partition: int = 7) -> ExecutionId:
    return ExecutionId(partition, str(uuid.uuid4()))


def create_keys(eid: ExecutionId, idem: str | None = None, namespace: str = "ns") -> list[str]:
    k, p = ExecKeys(eid), PartitionKeys(eid.tag)
    return [
        k.core,
        k.payload,
        k.policy,
        k.tags,
        p.lane(LANE, "eligible"),
        p.lane(LANE, "delayed"),
        k.idempotency(namespace, idem) if idem else p.noop,
        p.execution_deadline,
        p.all_executions,
        p.lanes,
    ]


def create_args(eid: ExecutionId, **over: object) -> list[object]:
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
    }
    unknown = set(over) - set(base)
    assert not unknown, f"not create arguments: {unknown}"
    base.update(over)
    return list(base.values())


async def create(store: Store, eid: ExecutionId, idem: str | None = None, **over: object) -> list:
    return await store.fcall(  # type: ignore[no-any-return]
        "ff_create_execution", create_keys(eid, idem), create_args(eid, **over)
    )


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


async def _pre_read(store: Store, eid: ExecutionId) -> tuple[str, str, str, str]:
    """What the server pre-reads to build keys: attempt index, holder, waitpoint, lane."""
    c = await core_of(store, eid)
    return (
        c.get("current_attempt_index") or "0",
        c.get("current_worker_instance_id") or "none",
        c.get("current_waitpoint_id") or "",
        c.get("lane_id") or LANE,
    )


def grant_keys(eid: ExecutionId) -> list[str]:
    k, p = ExecKeys(eid), PartitionKeys(eid.tag)
    return [k.core, k.claim_grant, p.lane(LANE, "eligible")]


def grant_args(eid: ExecutionId, worker: str, instance: str, ttl: object, caps: str) -> list:
    return [str(eid), worker, instance, LANE, "caphash", str(ttl), "{}", "", caps]


async def issue_grant(
    store: Store,
    eid: ExecutionId,
    worker: str = WORKER,
    instance: str = INSTANCE,
    ttl: object = 10_000,
    caps: str = "",
) -> list:
    return await store.fcall(  # type: ignore[no-any-return]
        "ff_issue_claim_grant", grant_keys(eid), grant_args(eid, worker, instance, ttl, caps)
    )


def claim_keys(eid: ExecutionId, idx: int, instance: str) -> list[str]:
    k, p = ExecKeys(eid), PartitionKeys(eid.tag)
    return [
        k.core,
        k.claim_grant,
        p.lane(LANE, "eligible"),
        p.lease_expiry,
        p.worker_leases(instance),
        k.attempt(idx),
        k.attempt_usage(idx),
        k.attempt_policy(idx),
        k.attempts,
        k.lease_current,
        k.lease_history,
        p.lane(LANE, "active"),
        p.attempt_timeout,
        p.execution_deadline,
    ]


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
    idx = int((await core_of(store, eid)).get("total_attempt_count") or 0)
    if renew_before is None:
        renew_before = int(ttl) * 2 // 3 if str(ttl).isdigit() else 0
    args = [
        str(eid),
        worker,
        instance,
        LANE,
        "caphash",
        f"lease-{uuid.uuid4()}",
        str(ttl),
        str(renew_before),
        f"attempt-{uuid.uuid4()}",
        attempt_policy_json,
        attempt_timeout_ms,
        deadline,
    ]
    return await store.fcall(  # type: ignore[no-any-return]
        "ff_claim_execution", claim_keys(eid, idx, instance), args
    )


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


def renew_keys(eid: ExecutionId) -> list[str]:
    k, p = ExecKeys(eid), PartitionKeys(eid.tag)
    return [k.core, k.lease_current, k.lease_history, p.lease_expiry]


async def renew(
    store: Store,
    lease: Lease,
    ttl: int = 30_000,
    fence: list[str] | None = None,
    idx: object = None,
) -> list:
    lid, epoch, aid = fence if fence is not None else lease.fence
    index = lease.attempt_index if idx is None else idx
    args = [str(lease.eid), str(index), aid, lid, epoch, str(ttl), "5000"]
    return await store.fcall("ff_renew_lease", renew_keys(lease.eid), args)  # type: ignore[no-any-return]


async def complete(
    store: Store,
    eid: ExecutionId,
    fence: list[str],
    payload: bytes = b"",
    source: str = "lease_holder",
    encoding: str = "",
) -> list:
    idx, holder, _, _ = await _pre_read(store, eid)
    k, p = ExecKeys(eid), PartitionKeys(eid.tag)
    keys = [
        k.core,
        k.attempt(int(idx)),
        p.lease_expiry,
        p.worker_leases(holder),
        p.lane(LANE, "terminal"),
        k.lease_current,
        k.lease_history,
        p.lane(LANE, "active"),
        k.stream_meta(int(idx)),
        k.result,
        p.attempt_timeout,
        p.execution_deadline,
    ]
    args = [str(eid), *fence, payload, source, encoding]
    return await store.fcall("ff_complete_execution", keys, args)  # type: ignore[no-any-return]


async def fail(
    store: Store,
    eid: ExecutionId,
    fence: list[str],
    reason: str = "boom",
    category: str = "error",
    retry_policy_json: str = "",
    source: str = "lease_holder",
) -> list:
    idx, holder, _, _ = await _pre_read(store, eid)
    k, p = ExecKeys(eid), PartitionKeys(eid.tag)
    keys = [
        k.core,
        k.attempt(int(idx)),
        p.lease_expiry,
        p.worker_leases(holder),
        p.lane(LANE, "terminal"),
        p.lane(LANE, "delayed"),
        k.lease_current,
        k.lease_history,
        p.lane(LANE, "active"),
        k.stream_meta(int(idx)),
        p.attempt_timeout,
        p.execution_deadline,
    ]
    args = [str(eid), *fence, reason, category, retry_policy_json, source]
    return await store.fcall("ff_fail_execution", keys, args)  # type: ignore[no-any-return]


async def _pause_keys(store: Store, eid: ExecutionId, target: str) -> list[str]:
    idx, holder, _, _ = await _pre_read(store, eid)
    k, p = ExecKeys(eid), PartitionKeys(eid.tag)
    return [
        k.core,
        k.attempt(int(idx)),
        k.lease_current,
        k.lease_history,
        p.lease_expiry,
        p.worker_leases(holder),
        p.lane(LANE, "active"),
        p.lane(LANE, target),
        p.attempt_timeout,
    ]


async def delay(
    store: Store, eid: ExecutionId, fence: list[str], until: object, source: str = "lease_holder"
) -> list:
    keys = await _pause_keys(store, eid, "delayed")
    args = [str(eid), *fence, str(until), source]
    return await store.fcall("ff_delay_execution", keys, args)  # type: ignore[no-any-return]


async def move_to_children(
    store: Store, eid: ExecutionId, fence: list[str], source: str = "lease_holder"
) -> list:
    keys = await _pause_keys(store, eid, "blocked:dependencies")
    args = [str(eid), *fence, source]
    return await store.fcall("ff_move_to_waiting_children", keys, args)  # type: ignore[no-any-return]


async def cancel(
    store: Store,
    eid: ExecutionId,
    reason: str = "stop",
    source: str = "operator_override",
    fence: list[str] | None = None,
) -> list:
    idx, holder, wp, _ = await _pre_read(store, eid)
    k, p = ExecKeys(eid), PartitionKeys(eid.tag)
    wp_key = f"ff:wp:{eid.tag}:{wp}" if wp else p.noop
    keys = [
        k.core,
        k.attempt(int(idx)),
        k.stream_meta(int(idx)),
        k.lease_current,
        k.lease_history,
        p.lease_expiry,
        p.worker_leases(holder),
        exec_key(eid, "suspension:current"),
        wp_key,
        f"{wp_key}:condition" if wp else p.noop,
        p.suspension_timeout,
        p.lane(LANE, "terminal"),
        p.attempt_timeout,
        p.execution_deadline,
        *(
            p.lane(LANE, w)
            for w in (
                "eligible",
                "delayed",
                "blocked:dependencies",
                "blocked:budget",
                "blocked:quota",
                "blocked:route",
                "blocked:operator",
            )
        ),
    ]
    args = [str(eid), reason, source, *(fence or ["", "", ""])]
    return await store.fcall("ff_cancel_execution", keys, args)  # type: ignore[no-any-return]


async def expire(store: Store, eid: ExecutionId, reason: str = "attempt_timeout") -> list:
    idx, holder, _, _ = await _pre_read(store, eid)
    k, p = ExecKeys(eid), PartitionKeys(eid.tag)
    keys = [
        k.core,
        k.attempt(int(idx)),
        k.stream_meta(int(idx)),
        k.lease_current,
        k.lease_history,
        p.lease_expiry,
        p.worker_leases(holder),
        p.lane(LANE, "active"),
        p.lane(LANE, "terminal"),
        p.attempt_timeout,
        p.execution_deadline,
        p.lane(LANE, "suspended"),
        p.suspension_timeout,
        exec_key(eid, "suspension:current"),
    ]
    return await store.fcall("ff_expire_execution", keys, [str(eid), reason])  # type: ignore[no-any-return]


async def promote(store: Store, eid: ExecutionId, now: int) -> list:
    k, p = ExecKeys(eid), PartitionKeys(eid.tag)
    keys = [k.core, p.lane(LANE, "delayed"), p.lane(LANE, "eligible")]
    return await store.fcall("ff_promote_delayed", keys, [str(eid), str(now)])  # type: ignore[no-any-return]


async def replay(store: Store, eid: ExecutionId, edges: tuple[str, ...] = ()) -> list:
    k, p = ExecKeys(eid), PartitionKeys(eid.tag)
    keys = [k.core, p.lane(LANE, "terminal"), p.lane(LANE, "eligible"), k.lease_history]
    if edges:
        keys += [
            p.lane(LANE, "blocked:dependencies"),
            exec_key(eid, "deps:meta"),
            exec_key(eid, "deps:unresolved"),
            *(exec_key(eid, f"dep:{e}") for e in edges),
        ]
    return await store.fcall("ff_replay_execution", keys, [str(eid), "0", *edges])  # type: ignore[no-any-return]


def mark_keys(eid: ExecutionId) -> list[str]:
    k, p = ExecKeys(eid), PartitionKeys(eid.tag)
    return [k.core, k.lease_current, p.lease_expiry, k.lease_history]


async def mark_expired(store: Store, eid: ExecutionId) -> list:
    return await store.fcall("ff_mark_lease_expired_if_due", mark_keys(eid), [str(eid)])  # type: ignore[no-any-return]


async def revoke(store: Store, eid: ExecutionId, expected: str = "", reason: str = "") -> list:
    _, holder, _, _ = await _pre_read(store, eid)
    k, p = ExecKeys(eid), PartitionKeys(eid.tag)
    keys = [k.core, k.lease_current, k.lease_history, p.lease_expiry, p.worker_leases(holder)]
    return await store.fcall("ff_revoke_lease", keys, [str(eid), expected, reason])  # type: ignore[no-any-return]


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


async def check_invariants(store: Store, eid: ExecutionId) -> dict[str, str]:
    """Spec 00 §6.2 invariants and §6.4 index membership; returns the core."""
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
    in_expiry = await store.call("ZSCORE", p.lease_expiry, str(eid)) is not None
    assert in_expiry == (phase == "active")
    if own == "leased":
        holder = p.worker_leases(c["current_worker_instance_id"])
        assert await store.call("SISMEMBER", holder, str(eid)) == 1
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
    """A stream meta as the first append would create it (streams are another area's)."""
    await store.call(
        "HSET", ExecKeys(eid).stream_meta(idx), "stream_id", f"{eid}:{idx}", "closed_at", ""
    )
    await store.call("HSET", ExecKeys(eid).stream_meta(idx), "closed_reason", "")


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


# -- suspension, waitpoints and signals (spec 20) -------------------------------------------------

HMAC_SECRET = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"


def keystore(eid: ExecutionId) -> str:
    return PartitionKeys(eid.tag).hmac_keystore


async def install_secret(
    store: Store, eid: ExecutionId, secret: str = HMAC_SECRET, kid: str = "k1"
) -> list:
    return await store.fcall(  # type: ignore[no-any-return]
        "ff_install_waitpoint_hmac_secret", [keystore(eid)], [kid, secret]
    )


def hmac_token(secret_hex: str, wpid: str, wpkey: str, created_at: object, kid: str = "k1") -> str:
    """Spec 20 §4.2, computed with Python's hmac module."""
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
    k, p = ExecKeys(eid), PartitionKeys(eid.tag)
    keys = [
        k.core,
        wp_key(eid, wpid),
        p.pending_waitpoint_expiry,
        ks or keystore(eid),
        k.waitpoints,
    ]
    args = [
        str(eid),
        *(fence if fence is not None else lease.fence),
        str(lease.attempt_index if idx is None else idx),
        wpid,
        f"wpk:{wpid}" if wpkey is None else wpkey,
        str(expires_in_ms),
    ]
    return await store.fcall("ff_create_pending_waitpoint", keys, args)  # type: ignore[no-any-return]


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
) -> list:
    eid = lease.eid
    wpid = wpid or str(uuid.uuid4())
    k, p = ExecKeys(eid), PartitionKeys(eid.tag)
    keys = [
        k.core,
        k.suspension_current,
        wp_key(eid, wpid),
        ks or keystore(eid),
        k.lease_current,
        k.lease_history,
        p.lease_expiry,
        p.attempt_timeout,
        p.suspension_timeout,
        p.pending_waitpoint_expiry,
        k.waitpoints,
        k.signals,
    ]
    args = [
        str(eid),
        *(fence if fence is not None else lease.fence),
        str(lease.attempt_index if idx is None else idx),
        sid or str(uuid.uuid4()),
        wpid,
        f"wpk:{wpid}",
        reason,
        "worker",
        condition("go") if cond is None else cond,
        policy,
        "cont-ptr",
        str(timeout_at),
        "1" if use_pending else "0",
        behavior,
    ]
    return await store.fcall("ff_suspend_execution", keys, args)  # type: ignore[no-any-return]


def signal_keys(eid: ExecutionId, wpid: str, sig: str, idem: str = "") -> list[str]:
    k, p = ExecKeys(eid), PartitionKeys(eid.tag)
    return [
        k.core,
        wp_key(eid, wpid),
        keystore(eid),
        k.signals,
        signal_key(eid.tag, sig),
        WaitpointKeys(eid.tag, wpid).dedup(idem) if idem else p.noop,
        k.suspension_current,
        p.suspension_timeout,
    ]


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
    args = [
        str(eid),
        wpid,
        sig,
        name,
        "callback",
        "webhook",
        "tester",
        payload,
        "",
        "corr-1",
        idem,
        "",
        "",
        str(ttl),
        str(delay),
        str(limit),
        str(maxlen),
        token,
    ]
    fn = "ff_buffer_signal_for_pending_waitpoint" if buffer else "ff_deliver_signal"
    return await store.fcall(fn, keys or signal_keys(eid, wpid, sig, idem), args)  # type: ignore[no-any-return]


async def resume(
    store: Store, eid: ExecutionId, trigger: str = "operator", delay: object = ""
) -> list:
    k, p = ExecKeys(eid), PartitionKeys(eid.tag)
    keys = [k.core, k.suspension_current, p.suspension_timeout]
    return await store.fcall("ff_resume_execution", keys, [str(eid), trigger, str(delay)])  # type: ignore[no-any-return]


async def close_wp(store: Store, eid: ExecutionId, wpid: str, reason: str = "") -> list:
    keys = [ExecKeys(eid).core, wp_key(eid, wpid), PartitionKeys(eid.tag).pending_waitpoint_expiry]
    return await store.fcall("ff_close_waitpoint", keys, [str(eid), wpid, reason])  # type: ignore[no-any-return]


async def expire_suspension(store: Store, eid: ExecutionId) -> list:
    k, p = ExecKeys(eid), PartitionKeys(eid.tag)
    keys = [
        k.core,
        k.suspension_current,
        p.suspension_timeout,
        p.attempt_timeout,
        p.execution_deadline,
    ]
    return await store.fcall("ff_expire_suspension", keys, [str(eid)])  # type: ignore[no-any-return]


async def resume_signals(store: Store, eid: ExecutionId, idx: int = 0) -> list[tuple[dict, bytes]]:
    k = ExecKeys(eid)
    reply = await store.fcall(
        "ff_read_resume_signals", [k.core, k.suspension_current], [str(eid), str(idx)]
    )
    assert reply[:2] == [1, b"OK"], reply
    n, rest = int(reply[2]), reply[3:]
    out = []
    for i in range(n):
        flat = rest[2 * i]
        fields = {flat[j].decode(): flat[j + 1].decode() for j in range(0, len(flat), 2)}
        out.append((fields, rest[2 * i + 1]))
    return out


async def list_waitpoints(store: Store, eid: ExecutionId) -> list:
    k = ExecKeys(eid)
    return await store.fcall("ff_list_waitpoints", [k.core, k.waitpoints], [str(eid)])  # type: ignore[no-any-return]


async def rotate(store: Store, ks: str, kid: str, secret: str, grace: object = 600_000) -> list:
    return await store.fcall("ff_rotate_waitpoint_hmac_secret", [ks], [kid, secret, str(grace)])  # type: ignore[no-any-return]


async def list_kids(store: Store, ks: str) -> list:
    return await store.fcall("ff_list_waitpoint_hmac_kids", [ks], [])  # type: ignore[no-any-return]


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
