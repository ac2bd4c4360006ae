"""Every bounded ARGV refused first thing in the function, called directly through FCALL: a value
over its bound (valkey/bounds.py, the library's `Bounds` include) is `invalid_input` naming the
field, and the keyspace is exactly as before (docs/architecture.md#limits)."""

from __future__ import annotations

import json
from collections.abc import Awaitable

import pytest

from flowfabric.server.valkey import bounds
from flowfabric.server.valkey.functions import execution, maintenance
from flowfabric.server.valkey.ids import ExecutionId
from flowfabric.server.valkey.keys import ExecKeys, PartitionKeys
from flowfabric.server.valkey.store import Store
from tests.api.util import keyspace_dump
from tests.lua.util import (
    Lease,
    claim_raw,
    create,
    create_and_claim,
    create_pending,
    ctx_of,
    delay,
    fail,
    fcall,
    issue_grant,
    leased,
    new_eid,
    now_ms,
    renew,
    send_signal,
    suspend,
    suspended,
)

HUGE = 2**63
YEAR = bounds.HORIZON_MS.hi


async def refused(store: Store, call: Awaitable[list], field: str) -> bytes:
    """Run `call`; assert invalid_input naming `field` and an unchanged keyspace."""
    before = await keyspace_dump(store)
    reply = await call
    assert reply[:2] == [0, b"invalid_input"], reply
    assert field in reply[2].decode(), reply
    assert await keyspace_dump(store) == before, "a refused call writes nothing"
    return bytes(reply[2])


def tags_json(n: int) -> str:
    return json.dumps({f"app.t{i}": "v" for i in range(n)})


async def test_bounds_reach_the_library(store: Store) -> None:
    """The numbers the functions check are the table's: one over each refused, the bound kept."""
    eid = new_eid()
    await create(store, eid)
    await issue_grant(store, eid)
    over = await claim_raw(store, eid, ttl=bounds.LEASE_TTL_MS.hi + 1)
    assert over == [0, b"invalid_input", f"lease_ttl_ms must be 1..{bounds.LEASE_TTL_MS.hi}, "
                    f"got: {bounds.LEASE_TTL_MS.hi + 1}".encode()]  # fmt: skip
    at = await claim_raw(store, eid, ttl=bounds.LEASE_TTL_MS.hi)
    assert at[:2] == [1, b"OK"], at


@pytest.mark.parametrize("ttl", [HUGE, 10**15, 2**64 + 1])
async def test_claim_with_a_huge_lease_ttl_takes_no_lease(store: Store, ttl: int) -> None:
    eid = new_eid()
    await create(store, eid)
    await issue_grant(store, eid)
    await refused(store, claim_raw(store, eid, ttl=ttl, renew_before=0), "lease_ttl_ms")


async def test_renew_bounds(store: Store) -> None:
    lease = await create_and_lease(store)
    await refused(store, renew(store, lease, ttl=10**15), "lease_ttl_ms")


async def test_create_with_too_many_tags_writes_nothing(store: Store) -> None:
    """4000 tags once committed a core no index reached, then failed in `unpack`."""
    eid = new_eid()
    await refused(store, create(store, eid, tags_json=tags_json(4000)), "tags")
    assert await store.call("EXISTS", ExecKeys(eid).core) == 0
    ok = await create(store, eid, tags_json=tags_json(bounds.TAGS.hi))
    assert ok[1] == b"OK", ok
    assert await store.call("HLEN", ExecKeys(eid).tags) == bounds.TAGS.hi


async def test_tag_sizes(store: Store) -> None:
    eid = new_eid()
    long_key = json.dumps({"app." + "k" * bounds.TAG_KEY_BYTES.hi: "v"})
    await refused(store, create(store, eid, tags_json=long_key), "tag keys")
    long_value = json.dumps({"app.k": "v" * (bounds.TAG_VALUE_BYTES.hi + 1)})
    await refused(store, create(store, eid, tags_json=long_value), "tag values")


async def test_set_tags_holds_the_execution_to_the_tag_bound(store: Store) -> None:
    eid = new_eid()
    await create(store, eid, tags_json=tags_json(bounds.TAGS.hi - 1))
    ctx = ctx_of(eid)
    one_more = {"pairs": ["app.new1", "v"]}
    assert (await fcall(store, execution.SET_TAGS, ctx, one_more))[:2] == [1, b"OK"]
    # rewriting existing tags is fine at the bound; a new one is not
    again = {"pairs": ["app.t0", "w", "app.new1", "w"]}
    assert (await fcall(store, execution.SET_TAGS, ctx, again))[:2] == [1, b"OK"]
    await refused(
        store, fcall(store, execution.SET_TAGS, ctx, {"pairs": ["app.new2", "v"]}), "an execution"
    )


async def test_create_times_past_the_horizon(store: Store) -> None:
    now = await now_ms(store)
    eid = new_eid()
    far = str(now + YEAR + 60_000)
    await refused(store, create(store, eid, delay_until=far), "delay_until")
    await refused(store, create(store, eid, execution_deadline_at=far), "execution_deadline_at")
    await refused(store, create(store, eid, delay_until=str(HUGE)), "delay_until")
    await refused(store, create(store, eid, dedup_ttl_ms=str(HUGE)), "dedup_ttl_ms")
    near = await create(store, eid, delay_until=str(now + 60_000))
    assert near[3] == b"delayed"


async def test_delay_past_the_horizon_keeps_the_lease(store: Store) -> None:
    lease = await create_and_lease(store)
    now = await now_ms(store)
    await refused(store, delay(store, lease.eid, lease.fence, now + YEAR + 60_000), "delay_until")
    await refused(store, delay(store, lease.eid, lease.fence, HUGE), "delay_until")
    assert (await delay(store, lease.eid, lease.fence, now + 60_000))[:2] == [1, b"OK"]


async def test_fail_retry_after_bound(store: Store) -> None:
    lease = await create_and_lease(store)
    await refused(store, fail(store, lease.eid, lease.fence, retry_after_ms=HUGE), "retry_after_ms")


async def test_waitpoint_and_suspension_timeouts(store: Store) -> None:
    """A near-2^64 timeout was accepted and broke every later waitpoint read."""
    lease = await leased(store)
    await refused(store, create_pending(store, lease, expires_in_ms=2**64 - 1), "expires_in_ms")
    await refused(store, suspend(store, lease, timeout_in_ms=2**64 - 1), "timeout_in_ms")
    await refused(store, suspend(store, lease, timeout_at=2**64 - 1), "timeout_at")
    now = await now_ms(store)
    await refused(store, suspend(store, lease, timeout_at=now + YEAR + 60_000), "timeout_at")
    ok = await suspend(store, lease, timeout_in_ms=YEAR)
    assert ok[:2] == [1, b"OK"], ok


async def test_resume_policy_is_checked(store: Store) -> None:
    lease = await leased(store)
    before = await keyspace_dump(store)
    bad = await suspend(store, lease, policy=json.dumps({"resume_delay_ms": -1}))
    assert bad == [
        0, b"invalid_policy_json",
        f"resume_policy.resume_delay_ms must be an integer 0..{YEAR}, got: -1".encode(),
    ]  # fmt: skip
    unknown = await suspend(store, lease, policy=json.dumps({"resume_after": 5}))
    assert unknown == [0, b"invalid_policy_json", b"resume_policy.resume_after is not a known "
                       b"policy field"]  # fmt: skip
    assert await keyspace_dump(store) == before


async def test_attempt_policy_keys_are_bounded(store: Store) -> None:
    eid = new_eid()
    await create(store, eid)
    await issue_grant(store, eid)
    wide = json.dumps({f"k{i}": i for i in range(bounds.LIST_ITEMS.hi + 1)})
    await refused(store, claim_raw(store, eid, attempt_policy_json=wide), "attempt_policy_json")


async def create_and_lease(store: Store) -> Lease:
    return await create_and_claim(store)


def test_the_bound_names_are_unique() -> None:
    names = [b.name for b in bounds.BOUNDS]
    assert len(names) == len(set(names))
    assert all(b.lo <= b.hi for b in bounds.BOUNDS)


@pytest.mark.parametrize(
    ("field", "arg"),
    [("dedup_ttl_ms", "ttl"), ("resume_delay_ms", "delay"),
     ("max_signals_per_execution", "limit"), ("signal_maxlen", "maxlen")],
)  # fmt: skip
async def test_signal_bounds(store: Store, field: str, arg: str) -> None:
    lease, wpid, token = await suspended(store)
    await refused(store, send_signal(store, lease.eid, wpid, token, **{arg: HUGE}), field)


async def test_grant_ttl_bound(store: Store) -> None:
    eid = new_eid()
    await create(store, eid)
    await refused(store, issue_grant(store, eid, ttl=bounds.GRANT_TTL_MS.hi + 1), "grant_ttl_ms")


# -- ff_repair_execution: the guards of the repair sweep (docs/architecture.md#repair-sweep) ----


async def repair(store: Store, eid: ExecutionId, min_age_ms: int = 0) -> list:
    values = {"execution_id": str(eid), "min_age_ms": min_age_ms}
    return await fcall(store, maintenance.REPAIR, ctx_of(eid), values)


async def test_repair_never_removes_an_indexed_or_claimed_execution(store: Store) -> None:
    """Only a core no index reaches and no claim touched is an orphan."""
    waiting = new_eid()
    await create(store, waiting)
    await store.call("SREM", PartitionKeys(waiting.tag).all_executions, str(waiting))
    assert await repair(store, waiting) == [1, b"OK", b"ok"], "still in its lane set"
    lease = await create_and_claim(store)
    p = PartitionKeys(lease.eid.tag)
    await store.call("SREM", p.all_executions, str(lease.eid))
    await store.call("ZREM", p.lane("default", "active"), str(lease.eid))
    assert (await repair(store, lease.eid))[2] != b"orphan_removed", "claimed once"
    assert await store.call("EXISTS", ExecKeys(lease.eid).core) == 1


async def test_repair_removes_an_orphan_once(store: Store) -> None:
    eid = new_eid()
    await create(store, eid)
    p = PartitionKeys(eid.tag)
    await store.call("SREM", p.all_executions, str(eid))
    await store.call("ZREM", p.lane("default", "eligible"), str(eid))
    assert await repair(store, eid, min_age_ms=YEAR) == [1, b"OK", b"young_orphan"]
    assert await repair(store, eid) == [1, b"OK", b"orphan_removed"]
    assert await store.call("EXISTS", ExecKeys(eid).core, ExecKeys(eid).payload) == 0
    assert await repair(store, eid) == [1, b"OK", b"not_found"]


async def test_repair_clamps_a_stored_deadline_and_delay(store: Store) -> None:
    eid = new_eid()
    now = await now_ms(store)
    await create(
        store, eid, delay_until=str(now + 60_000), execution_deadline_at=str(now + 120_000)
    )
    k, p = ExecKeys(eid), PartitionKeys(eid.tag)
    far = str(10**18)
    await store.call("HSET", k.core, "delay_until", far, "execution_deadline_at", far)
    await store.call("ZADD", p.lane("default", "delayed"), far, str(eid))
    await store.call("ZADD", p.execution_deadline, far, str(eid))
    reply = await repair(store, eid)
    assert reply[:3] == [1, b"OK", b"clamped"]
    assert set(reply[3].decode().split(",")) == {
        "execution_deadline_at", "execution_deadline", "delay_until", "delayed",
    }  # fmt: skip
    horizon = await now_ms(store) + YEAR
    assert float(await store.call("ZSCORE", p.execution_deadline, str(eid))) <= horizon
    assert int(await store.call("HGET", k.core, "delay_until")) <= horizon
    assert await repair(store, eid) == [1, b"OK", b"ok"]
