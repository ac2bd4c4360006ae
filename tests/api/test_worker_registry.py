"""The worker registry leaves nothing behind a crashed worker once its TTL passes."""

from __future__ import annotations

import asyncio

from flowfabric.server.valkey.keys import WORKERS_INDEX, WorkerKeys
from flowfabric.server.valkey.store import Store
from flowfabric.server.valkey.workers import WorkerRegistry, alive_ttl_ms


async def _exists(store: Store, *keys: str) -> list[bool]:
    return [bool(await store.call("EXISTS", k)) for k in keys]


async def test_every_registry_key_expires_and_the_index_is_pruned(store: Store) -> None:
    registry = WorkerRegistry(store)
    lease_ttl = 100  # alive TTL is max(2 x lease, 1 s)
    crashed, live = WorkerKeys("crashed-1"), WorkerKeys("live-1")
    await registry.register("w", "crashed-1", "gpu", ["default"], lease_ttl)
    await registry.register("w", "live-1", "", ["default"], lease_ttl)
    assert await _exists(store, crashed.info, crashed.caps, crashed.alive) == [True] * 3
    for key in (crashed.info, crashed.caps, crashed.alive):
        ttl = int(await store.call("PTTL", key))
        assert 0 < ttl <= alive_ttl_ms(lease_ttl), key

    # "crashed-1" stops heartbeating; "live-1" keeps going past the alive TTL.
    for _ in range(6):
        await asyncio.sleep(0.25)
        await registry.heartbeat("w", "live-1", "", lease_ttl)

    assert await _exists(store, crashed.info, crashed.caps, crashed.alive) == [False] * 3
    members = {m.decode() for m in await store.call("SMEMBERS", WORKERS_INDEX)}
    assert members == {"live-1"}, "the crashed worker's index entry was pruned by a heartbeat"
    assert await _exists(store, live.info, live.caps, live.alive) == [True] * 3
    assert await registry.live_capability_sets() == [frozenset()]
