"""ff_create_quota_policy, ff_check_admission_and_record, ff_release_admission and
ff_reconcile_quota_policy called directly, both topologies (docs/budgets.md#quota-policies)."""

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
) -> list[str]:
    values = {
        "now": "", "window_seconds": window, "rate_limit": rate, "concurrency_cap": cap,
        "execution_id": eid, "jitter_ms": jitter, "quota_policy_id": k.quota_policy_id,
    }  # fmt: skip
    reply = await fcall(store, quota.CHECK, quota_ctx(k, eid), values)
    return [v.decode() if isinstance(v, bytes) else str(v) for v in reply]


async def release(store: Store, k: QuotaKeys, eid: str) -> list[str]:
    values = {"quota_policy_id": k.quota_policy_id, "execution_id": eid}
    reply = await fcall(store, quota.RELEASE, quota_ctx(k, eid), values)
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
    assert await store.call("SISMEMBER", k.admitted_set, e3) == 0
    await asyncio.sleep(1.1)
    assert (await admit(store, k, e3, window=1, rate=2))[2] == "admitted"


async def test_readmission_inside_the_window_is_already_admitted(store: Store) -> None:
    k = new_policy()
    e1 = eid()
    await admit(store, k, e1, cap=5)
    assert await admit(store, k, e1, cap=5) == ["1", "ALREADY_SATISFIED", "already_admitted"]
    assert await counter(store, k) == b"1"


async def test_concurrency_cap_and_release(store: Store) -> None:
    k = new_policy()
    e1, e2, e3 = eid(), eid(), eid()
    assert (await admit(store, k, e1, cap=2))[2] == "admitted"
    assert (await admit(store, k, e2, cap=2))[2] == "admitted"
    assert await admit(store, k, e3, cap=2) == ["1", "OK", "concurrency_exceeded"]
    assert await release(store, k, e1) == ["1", "OK", "released"]
    assert (await admit(store, k, e3, cap=2))[2] == "admitted"


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


# -- release ------------------------------------------------------------------------------------


async def test_release_frees_the_slot_once(store: Store) -> None:
    k = new_policy()
    e1 = eid()
    await admit(store, k, e1, cap=2)
    assert await counter(store, k) == b"1"
    await release(store, k, e1)
    assert await store.call("EXISTS", k.guard(e1)) == 0
    assert await store.call("SISMEMBER", k.admitted_set, e1) == 0
    assert await counter(store, k) == b"0"
    await admit(store, k, eid(), cap=2)
    await release(store, k, e1)  # released already: the other admission keeps its slot
    assert await counter(store, k) == b"1"


async def test_readmitting_after_release_keeps_one_window_entry(store: Store) -> None:
    k = new_policy()
    e1 = eid()
    await admit(store, k, e1, rate=5, cap=2)
    await release(store, k, e1)
    assert (await admit(store, k, e1, rate=5, cap=2))[2] == "admitted"
    assert await store.call("ZCARD", k.window) == 1


async def test_release_of_what_was_never_admitted_keeps_the_counter(store: Store) -> None:
    k = new_policy()
    await create(store, k)
    assert (await release(store, k, eid()))[2] == "released"
    assert await counter(store, k) == b"0"


# -- reconcile ----------------------------------------------------------------------------------


async def reconcile(store: Store, k: QuotaKeys) -> list[quota.QuotaReconciled]:
    fn, pages, cursor = QuotaFunctions(store), [], 0
    while True:
        page = await fn.reconcile_page(k, cursor)
        pages.append(page)
        cursor = page.cursor
        if cursor == 0:
            return pages


async def test_reconcile_repairs_a_corrupt_counter(store: Store) -> None:
    k = new_policy()
    await create(store, k, 60, 0, 2)
    await admit(store, k, eid(), cap=2)
    await admit(store, k, eid(), cap=2)
    await store.call("SET", k.concurrency, "5")
    pages = await reconcile(store, k)
    assert pages[-1].counter == 2
    assert await counter(store, k) == b"2"
    assert (await admit(store, k, eid(), cap=2))[2] == "concurrency_exceeded"


async def test_reconcile_prunes_expired_admissions_even_without_a_cap(store: Store) -> None:
    k = new_policy()
    await create(store, k, 1, 5, 0)
    e1, e2 = eid(), eid()
    await admit(store, k, e1, window=1, rate=5)
    await admit(store, k, e2, window=1, rate=5)
    await store.call("DEL", k.guard(e1))  # its window has passed
    pages = await reconcile(store, k)
    assert sum(p.pruned for p in pages) == 1
    assert {m.decode() for m in await store.call("SMEMBERS", k.admitted_set)} == {e2}


async def test_reconcile_trims_the_window(store: Store) -> None:
    k = new_policy()
    await create(store, k, 60, 5, 0)
    await store.call("ZADD", k.window, 1, "old")
    await reconcile(store, k)
    assert await store.call("ZSCORE", k.window, "old") is None


async def test_reconcile_drops_a_gone_policy_from_the_index(store: Store) -> None:
    k = new_policy()
    await store.call("SADD", k.policies, k.quota_policy_id)
    pages = await reconcile(store, k)
    assert pages[-1].removed
    assert await store.call("SISMEMBER", k.policies, k.quota_policy_id) == 0
