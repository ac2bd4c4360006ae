"""ff_create_quota_policy, ff_check_admission_and_record, ff_release_admission,
ff_refund_admission and ff_reconcile_quota_policy called directly, both topologies
(docs/budgets.md#quota-policies)."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from flowfabric.server.valkey.functions import quota
from flowfabric.server.valkey.functions.quota import QuotaFunctions, quota_ctx
from flowfabric.server.valkey.keys import QuotaKeys
from flowfabric.server.valkey.store import Store
from tests.api.util import keyspace_dump
from tests.lua.util import fcall, hash_of, new_eid


def new_policy(partition: int = 5) -> QuotaKeys:
    return QuotaKeys.of(partition, str(uuid.uuid4()))


async def create(
    store: Store,
    k: QuotaKeys,
    window: object = 60,
    rate: object = 10,
    cap: object = 2,
    jitter: object = "",
) -> list:
    values = {
        "quota_policy_id": k.quota_policy_id, "window_seconds": window,
        "max_requests_per_window": rate, "max_concurrent": cap, "jitter_ms": jitter, "now": "",
    }  # fmt: skip
    return await fcall(store, quota.CREATE, quota_ctx(k), values)


async def admit(
    store: Store,
    k: QuotaKeys,
    eid: str,
    window: object = 60,
    rate: object = 0,
    cap: object = 0,
    jitter: object = "",
    now: object = "",
) -> list[str]:
    values = {
        "now": now, "window_seconds": window, "rate_limit": rate, "concurrency_cap": cap,
        "execution_id": eid, "jitter_ms": jitter, "quota_policy_id": k.quota_policy_id,
        "concurrency_key": k.concurrency_key,
    }  # fmt: skip
    reply = await fcall(store, quota.CHECK, quota_ctx(k), values)
    return [v.decode() if isinstance(v, bytes) else str(v) for v in reply]


async def release(store: Store, k: QuotaKeys, eid: str) -> list[str]:
    values = {
        "quota_policy_id": k.quota_policy_id,
        "execution_id": eid,
        "concurrency_key": k.concurrency_key,
    }
    reply = await fcall(store, quota.RELEASE, quota_ctx(k), values)
    return [v.decode() if isinstance(v, bytes) else str(v) for v in reply]


def eid() -> str:
    return str(new_eid())


async def counter(store: Store, k: QuotaKeys) -> bytes | None:
    return await store.call("GET", k.concurrency)  # type: ignore[no-any-return]


# -- create -------------------------------------------------------------------------------------


async def test_create_stores_the_limits_and_a_zero_counter(store: Store) -> None:
    k = new_policy()
    reply = await create(store, k, 60, 10, 2)
    assert reply[:2] == [1, b"OK"]
    d = await hash_of(store, k.definition)
    assert d["requests_per_window_seconds"] == "60"
    assert d["max_requests_per_window"] == "10"
    assert d["active_concurrency_cap"] == "2"
    assert d["jitter_ms"] == "0" and d["created_at"]
    assert await counter(store, k) == b"0"
    assert await store.call("SISMEMBER", k.policies, k.quota_policy_id) == 1


async def test_create_again_is_already_satisfied_and_unchanged(store: Store) -> None:
    k = new_policy()
    await create(store, k)
    before = await keyspace_dump(store)
    assert (await create(store, k, 1, 1, 1))[1] == b"ALREADY_SATISFIED"
    assert await keyspace_dump(store) == before


async def test_create_takes_a_jitter(store: Store) -> None:
    k = new_policy()
    await create(store, k, jitter=250)
    assert (await hash_of(store, k.definition))["jitter_ms"] == "250"


@pytest.mark.parametrize(
    ("window", "rate", "cap", "detail"),
    [
        (0, 5, 0, "window_seconds must be positive"),
        (0, 0, 3, "window_seconds must be positive"),
        ("x", 1, 1, "window_seconds must be a number"),
        (60, -1, 1, "max_requests_per_window must"),
        (60, 1, 10_000_001, "max_concurrent must"),
    ],
)
async def test_create_refuses_bad_limits_and_writes_nothing(
    store: Store, window: object, rate: object, cap: object, detail: str
) -> None:
    k = new_policy()
    before = await keyspace_dump(store)
    reply = await create(store, k, window, rate, cap)
    assert reply[:2] == [0, b"invalid_input"] and detail in reply[2].decode(), reply
    assert await keyspace_dump(store) == before


async def test_a_policy_without_limits_needs_no_window(store: Store) -> None:
    k = new_policy()
    assert (await create(store, k, 0, 0, 0))[1] == b"OK"


# -- admission ----------------------------------------------------------------------------------


async def test_rate_limit_over_a_sliding_window(store: Store) -> None:
    k = new_policy()
    e1, e2, e3 = eid(), eid(), eid()
    assert (await admit(store, k, e1, window=1, rate=2))[2] == "admitted"
    assert (await admit(store, k, e2, window=1, rate=2))[2] == "admitted"
    denied = await admit(store, k, e3, window=1, rate=2)
    assert denied[2] == "rate_exceeded" and 0 < int(denied[3]) <= 1000
    assert await store.call("ZSCORE", k.admitted, e3) is None
    await asyncio.sleep(1.1)
    assert (await admit(store, k, e3, window=1, rate=2))[2] == "admitted"


async def test_admitted_names_its_window_entry_and_time(store: Store) -> None:
    k = new_policy()
    e1 = eid()
    got = await admit(store, k, e1, rate=5, now=1_000)
    assert got[:3] == ["1", "OK", "admitted"] and got[3].startswith(f"{e1}:") and got[4] == "1000"
    assert await store.call("ZSCORE", k.window, got[3]) == 1000
    assert await store.call("ZSCORE", k.admitted, e1) == 1000


async def test_readmission_while_holding_a_slot_is_already_admitted(store: Store) -> None:
    k = new_policy()
    e1 = eid()
    await admit(store, k, e1, rate=5, cap=5, now=1_000)
    assert await admit(store, k, e1, rate=5, cap=5, now=2_000) == [
        "1", "ALREADY_SATISFIED", "already_admitted",
    ]  # fmt: skip
    assert await counter(store, k) == b"1"
    assert await store.call("ZCARD", k.window) == 1, "no second window entry"
    assert await store.call("ZSCORE", k.admitted, e1) == 1000, "nothing changes"


async def test_concurrency_cap_and_release(store: Store) -> None:
    k = new_policy()
    e1, e2, e3 = eid(), eid(), eid()
    assert (await admit(store, k, e1, cap=2))[2] == "admitted"
    assert (await admit(store, k, e2, cap=2))[2] == "admitted"
    assert await admit(store, k, e3, cap=2) == ["1", "OK", "concurrency_exceeded"]
    assert await release(store, k, e1) == ["1", "OK", "released", "0"]
    assert (await admit(store, k, e3, cap=2))[2] == "admitted"


async def test_a_slot_outlives_the_window(store: Store) -> None:
    """The slot is the lease's, not the window's: an admission older than the window still
    holds its slot until it is released."""
    k = new_policy()
    e1, e2 = eid(), eid()
    await admit(store, k, e1, window=1, cap=1, now=1_000)
    assert (await admit(store, k, e2, window=1, cap=1, now=100_000))[2] == "concurrency_exceeded"
    await release(store, k, e1)
    assert (await admit(store, k, e2, window=1, cap=1, now=100_001))[2] == "admitted"


async def test_rate_wins_over_concurrency(store: Store) -> None:
    k = new_policy()
    await admit(store, k, eid(), rate=1, cap=1)
    assert (await admit(store, k, eid(), rate=1, cap=1))[2] == "rate_exceeded"


async def test_jitter_is_added_to_the_retry_delay(store: Store) -> None:
    k = new_policy()
    await admit(store, k, eid(), window=10, rate=1)
    seen = [int((await admit(store, k, eid(), window=10, rate=1, jitter=500))[3]) for _ in range(8)]
    assert all(0 < s <= 10_000 + 500 for s in seen)
    base = int((await admit(store, k, eid(), window=10, rate=1))[3])
    assert all(s >= base - 100 for s in seen)


@pytest.mark.parametrize("field", ["window", "rate", "cap"])
async def test_admission_refuses_non_numbers(store: Store, field: str) -> None:
    k = new_policy()
    before = await keyspace_dump(store)
    reply = await admit(store, k, eid(), **{field: "abc"})  # type: ignore[arg-type]
    assert reply[:2] == ["0", "invalid_input"] and "must be a number, got: abc" in reply[2]
    assert await keyspace_dump(store) == before


async def test_the_rate_bound_holds_in_every_sliding_window(store: Store) -> None:
    """Many admissions over a pinned clock: no window of the stated length holds more than
    the limit (docs/budgets.md#accuracy)."""
    k = new_policy()
    limit, window_ms = 5, 1_000
    admitted: list[int] = []
    for t in range(0, 6_000, 37):  # a check every 37 ms, each a new execution
        got = await admit(store, k, eid(), window=1, rate=limit, now=t)
        if got[2] == "admitted":
            admitted.append(t)
    assert len(admitted) >= 5 * limit
    for i, start in enumerate(admitted):
        inside = [t for t in admitted[i:] if t < start + window_ms]
        assert len(inside) <= limit, (start, inside)


# -- release and refund -------------------------------------------------------------------------


async def test_release_frees_the_slot_once(store: Store) -> None:
    k = new_policy()
    e1 = eid()
    await admit(store, k, e1, cap=2)
    assert await counter(store, k) == b"1"
    assert await release(store, k, e1) == ["1", "OK", "released", "0"]
    assert await store.call("ZSCORE", k.admitted, e1) is None
    assert await counter(store, k) == b"0"
    await admit(store, k, eid(), cap=2)
    assert await release(store, k, e1) == ["1", "OK", "not_held", "0"]
    assert await counter(store, k) == b"1", "the other admission keeps its slot"


async def test_release_keeps_the_window_entry(store: Store) -> None:
    k = new_policy()
    e1 = eid()
    await admit(store, k, e1, rate=5, cap=2)
    await release(store, k, e1)
    assert (await admit(store, k, e1, rate=5, cap=2))[2] == "admitted"
    assert await store.call("ZCARD", k.window) == 2, "one entry per admission"


async def test_release_of_what_was_never_admitted_changes_nothing(store: Store) -> None:
    k = new_policy()
    await create(store, k)
    before = await keyspace_dump(store)
    assert (await release(store, k, eid()))[2] == "not_held"
    assert await keyspace_dump(store) == before


async def refund(store: Store, k: QuotaKeys, e: str, member: str, at: object) -> list[str]:
    values = {
        "quota_policy_id": k.quota_policy_id, "execution_id": e,
        "concurrency_key": k.concurrency_key, "window_member": member, "admitted_at": at,
    }  # fmt: skip
    reply = await fcall(store, quota.REFUND, quota_ctx(k), values)
    return [v.decode() if isinstance(v, bytes) else str(v) for v in reply]


async def test_refund_gives_back_the_window_entry_and_the_slot(store: Store) -> None:
    k = new_policy()
    e1 = eid()
    got = await admit(store, k, e1, rate=1, cap=1)
    assert (await admit(store, k, eid(), rate=1, cap=1))[2] == "rate_exceeded"
    assert await refund(store, k, e1, got[3], got[4]) == ["1", "OK", "refunded", "0"]
    assert await store.call("ZCARD", k.window) == 0 and await counter(store, k) == b"0"
    assert (await admit(store, k, eid(), rate=1, cap=1))[2] == "admitted"


async def test_refund_leaves_a_later_admission_its_slot(store: Store) -> None:
    k = new_policy()
    e1 = eid()
    first = await admit(store, k, e1, rate=5, cap=2, now=1_000)
    await release(store, k, e1)
    await admit(store, k, e1, rate=5, cap=2, now=2_000)
    assert (await refund(store, k, e1, first[3], first[4]))[2] == "not_held"
    assert await store.call("ZSCORE", k.admitted, e1) == 2000
    assert await store.call("ZCARD", k.window) == 1


# -- per-key buckets ----------------------------------------------------------------------------


async def test_each_key_has_its_own_window_counter_and_slots(store: Store) -> None:
    k = new_policy()
    a, b = k.bucket("customer-a"), k.bucket("customer-b")
    e = [eid() for _ in range(5)]
    assert (await admit(store, a, e[0], cap=2))[2] == "admitted"
    assert (await admit(store, a, e[1], cap=2))[2] == "admitted"
    assert (await admit(store, a, e[2], cap=2))[2] == "concurrency_exceeded"
    assert (await admit(store, b, e[3], cap=2))[2] == "admitted"
    assert (await admit(store, k, e[4], cap=2))[2] == "admitted", "the policy-wide bucket"
    assert await counter(store, a) == b"2" and await counter(store, b) == b"1"
    assert {m.decode() for m in await store.call("SMEMBERS", k.keys_index)} == {
        "customer-a", "customer-b",
    }  # fmt: skip
    assert a.admitted == f"{k.definition}:k:customer-a:admitted"
    assert a.window == f"{k.definition}:k:customer-a:window"
    assert await release(store, a, e[0]) == ["1", "OK", "released", "0"]
    assert (await admit(store, a, e[2], cap=2))[2] == "admitted"


async def test_a_thousand_keys_each_admit_up_to_their_cap(store: Store) -> None:
    k = new_policy()
    for i in range(1000):
        bucket = k.bucket(f"key-{i}")
        got = [(await admit(store, bucket, eid(), cap=2))[2] for _ in range(3)]
        assert got == ["admitted", "admitted", "concurrency_exceeded"], (i, got)
    assert await store.call("SCARD", k.keys_index) == 1000


@pytest.mark.parametrize(
    ("key", "detail"),
    [("a b", "whitespace or control"), ("a\x01", "whitespace or control"),
     ("x" * 257, "at most 256 bytes")],
)  # fmt: skip
async def test_a_bad_key_is_refused_and_nothing_written(
    store: Store, key: str, detail: str
) -> None:
    k = new_policy()
    await create(store, k)
    before = await keyspace_dump(store)
    reply = await admit(store, k.bucket(key), eid(), cap=2)
    assert reply[:2] == ["0", "invalid_input"] and detail in reply[2], reply
    assert await keyspace_dump(store) == before


# -- reconcile ----------------------------------------------------------------------------------


async def reconcile(
    store: Store, k: QuotaKeys, stale: list[tuple[str, int]] | None = None, now: int | None = None
) -> quota.QuotaReconciled:
    return await QuotaFunctions(store).reconcile_bucket(k, stale or [], now)


async def test_reconcile_repairs_a_corrupt_counter(store: Store) -> None:
    k = new_policy()
    await create(store, k, 60, 0, 2)
    await admit(store, k, eid(), cap=2)
    await admit(store, k, eid(), cap=2)
    await store.call("SET", k.concurrency, "5")
    r = await reconcile(store, k)
    assert r.drifted and r.live == 2
    assert await counter(store, k) == b"2"
    assert (await admit(store, k, eid(), cap=2))[2] == "concurrency_exceeded"


async def test_reconcile_removes_the_stale_members_it_is_given(store: Store) -> None:
    k = new_policy()
    await create(store, k, 60, 0, 2)
    e1, e2 = eid(), eid()
    await admit(store, k, e1, cap=2, now=1_000)
    await admit(store, k, e2, cap=2, now=1_000)
    r = await reconcile(store, k, [(e1, 1_000)])
    assert (r.removed, r.live) == (1, 1)
    assert await store.call("ZSCORE", k.admitted, e1) is None and await counter(store, k) == b"1"


async def test_reconcile_keeps_a_member_readmitted_since_it_was_read(store: Store) -> None:
    k = new_policy()
    await create(store, k, 60, 0, 2)
    e1 = eid()
    await admit(store, k, e1, cap=2, now=1_000)
    await release(store, k, e1)
    await admit(store, k, e1, cap=2, now=5_000)  # after the reconciler read it at 1000
    assert (await reconcile(store, k, [(e1, 1_000)])).removed == 0
    assert await store.call("ZSCORE", k.admitted, e1) == 5000


async def test_reconcile_trims_the_window(store: Store) -> None:
    k = new_policy()
    await create(store, k, 60, 5, 0)
    await store.call("ZADD", k.window, 1, "old")
    await reconcile(store, k)
    assert await store.call("ZSCORE", k.window, "old") is None


async def test_reconcile_drops_an_empty_key_from_the_index(store: Store) -> None:
    k = new_policy()
    await create(store, k, 1, 5, 2)
    a = k.bucket("tenant-1")
    e1 = eid()
    await admit(store, a, e1, window=1, rate=5, cap=2, now=1_000)
    await reconcile(store, a, now=3_000)
    assert await store.call("SISMEMBER", k.keys_index, "tenant-1") == 1, "still holds a slot"
    await reconcile(store, a, [(e1, 1_000)], now=3_000)
    assert await store.call("SISMEMBER", k.keys_index, "tenant-1") == 0
    assert await store.call("EXISTS", a.window, a.admitted, a.concurrency) == 0


async def test_reconcile_drops_a_gone_policy_from_the_index(store: Store) -> None:
    k = new_policy()
    await store.call("SADD", k.policies, k.quota_policy_id)
    assert (await reconcile(store, k)).removed_policy
    assert await store.call("SISMEMBER", k.policies, k.quota_policy_id) == 0


async def test_the_rate_bound_holds_with_releases_refunds_and_readmissions(store: Store) -> None:
    """A few executions admitted again and again (released in between), some admissions
    refunded: the admissions that stand never exceed the limit in any window of its length."""
    k = new_policy()
    limit, window_ms = 3, 1_000
    pool = [eid() for _ in range(4)]
    held: dict[str, list[str]] = {}
    standing: list[int] = []
    for n, t in enumerate(range(0, 5_000, 23)):
        e = pool[n % len(pool)]
        if e in held:
            if n % 5 == 0:  # its claim failed: refund the admission
                got = held.pop(e)
                assert (await refund(store, k, e, got[3], got[4]))[2] == "refunded"
                standing.remove(int(got[4]))
            else:
                await release(store, k, e)
                del held[e]
            continue
        got = await admit(store, k, e, window=1, rate=limit, cap=2, now=t)
        if got[2] == "admitted":
            held[e] = got
            standing.append(t)
    standing.sort()
    assert len(standing) >= 10
    for i, start in enumerate(standing):
        assert len([t for t in standing[i:] if t < start + window_ms]) <= limit, start


async def test_release_and_refund_count_the_buckets_waiters(store: Store) -> None:
    k = new_policy()
    await create(store, k, rate=0, cap=2)
    e1, e2 = eid(), eid()
    got = await admit(store, k, e1, cap=2)
    assert got[2] == "admitted"
    assert (await admit(store, k, e2, cap=2))[2] == "admitted"
    await store.call("ZADD", k.waiters(), 1, "waiting-1", 2, "waiting-2")
    assert await release(store, k, e2) == ["1", "OK", "released", "2"]
    assert await refund(store, k, e1, got[3], got[4]) == ["1", "OK", "refunded", "2"]
    assert await store.call("ZCARD", k.waiters()) == 2, "only counted"
