"""ff_add_waiter, ff_take_waiters and ff_remove_waiter called directly, both topologies
(docs/budgets.md#waking-blocked-work)."""

from __future__ import annotations

import uuid

import pytest

from flowfabric.server.valkey.errors import FlowFabricError
from flowfabric.server.valkey.functions import waiters
from flowfabric.server.valkey.functions.waiters import Bucket, WaiterFunctions
from flowfabric.server.valkey.keys import BudgetKeys, QuotaKeys
from flowfabric.server.valkey.store import Store
from tests.api.util import keyspace_dump
from tests.lua.util import fcall


def quota_bucket(key: str = "") -> Bucket:
    return Bucket.quota(QuotaKeys.of(3, str(uuid.uuid4())), key)


def budget_bucket() -> Bucket:
    return Bucket.budget(BudgetKeys.of(4, str(uuid.uuid4())))


async def members(store: Store, index: str) -> list[str]:
    return [m.decode() for m in await store.call("ZRANGE", index, 0, -1)]


def index_of(b: Bucket) -> str:
    return waiters._index(b.ctx)


async def test_add_take_in_block_order_and_keep_the_first_place(store: Store) -> None:
    fn, b = WaiterFunctions(store), quota_bucket()
    for eid, now in (("e1", 10), ("e2", 20), ("e3", 30)):
        reply = await fcall(store, waiters.ADD, b.ctx, b.values(execution_id=eid, now=now))
        assert reply == [1, b"OK", b"added"]
    again = await fcall(store, waiters.ADD, b.ctx, b.values(execution_id="e1", now=99))
    assert again == [1, b"ALREADY_SATISFIED", b"already_waiting"]
    assert await store.call("ZSCORE", index_of(b), "e1") == 10, "keeps its place in line"
    assert await fn.take(b, 2) == ("e1", "e2")
    assert await fn.take(b, 5) == ("e3",)
    assert await fn.take(b, 1) == (), "an empty index takes nothing"
    assert await store.call("EXISTS", index_of(b)) == 0


async def test_remove_is_won_once(store: Store) -> None:
    fn, b = WaiterFunctions(store), budget_bucket()
    assert await fn.add(b, "e1") is True
    assert await fn.add(b, "e1") is False
    assert await fn.remove(b, "e1") is True
    assert await fn.remove(b, "e1") is False, "a second remover gets not_waiting"
    assert await fn.take(b, 1) == ()


async def test_a_concurrency_key_has_its_own_bucket(store: Store) -> None:
    fn = WaiterFunctions(store)
    keys = QuotaKeys.of(3, str(uuid.uuid4()))
    whole, tenant = Bucket.quota(keys), Bucket.quota(keys, "tenant-a")
    await fn.add(whole, "e1")
    await fn.add(tenant, "e2")
    assert index_of(tenant) == keys.waiters("tenant-a") != index_of(whole) == keys.waiters()
    assert await members(store, keys.waiters("tenant-a")) == ["e2"]
    assert await fn.take(whole, 10) == ("e1",)


@pytest.mark.parametrize(
    ("decl", "field", "value", "detail"),
    [
        (waiters.ADD, "owner_kind", "flow", b"owner_kind must be quota or budget, got: flow"),
        (waiters.ADD, "owner_kind", "", b"owner_kind must not be empty"),
        (waiters.ADD, "execution_id", "", b"execution_id must not be empty"),
        (waiters.ADD, "now", "soon", b"now must be a number, got: soon"),
        (waiters.TAKE, "count", "0", b"count must be 1..1000, got: 0"),
        (waiters.TAKE, "count", "1001", b"count must be 1..1000, got: 1001"),
        (waiters.TAKE, "count", "x", b"count must be a number, got: x"),
        (waiters.REMOVE, "execution_id", "", b"execution_id must not be empty"),
    ],
)
async def test_bad_input_is_invalid_input_and_writes_nothing(
    store: Store, decl: waiters.Decl[object], field: str, value: str, detail: bytes
) -> None:
    b = quota_bucket()
    await WaiterFunctions(store).add(b, "e0")
    before = await keyspace_dump(store)
    base = {"execution_id": "e1", "now": "", "count": 1}
    names = {a.name for a in decl.argv}
    values = b.values(**{k: v for k, v in base.items() if k in names})
    values[field] = value
    reply = await fcall(store, decl, b.ctx, values)
    assert reply == [0, b"invalid_input", detail]
    assert await keyspace_dump(store) == before


async def test_a_budget_has_no_concurrency_key(store: Store) -> None:
    b = budget_bucket()
    values = {**b.values(execution_id="e1", now=""), "concurrency_key": "k"}
    reply = await fcall(store, waiters.ADD, b.ctx, values, keys=[index_of(b)])
    assert reply == [0, b"invalid_input", b"a budget has no concurrency_key"]
    assert await store.call("EXISTS", index_of(b)) == 0


async def test_keys_of_another_owner_are_a_malformed_call(store: Store) -> None:
    b, other = quota_bucket(), quota_bucket()
    with pytest.raises(FlowFabricError) as err:
        await fcall(store, waiters.ADD, b.ctx, b.values(execution_id="e1", now=""),
                    keys=[index_of(other)])  # fmt: skip
    assert "waiters index" in str(err.value)
    assert await store.call("EXISTS", index_of(b)) == 0
    assert await store.call("EXISTS", index_of(other)) == 0
