"""The worker registry (docs/lifecycle.md#the-worker-registry): alive keys, advertised capabilities,
the workers index.

Global keys (no hash tag), written with plain commands: they are not execution state. The unblock
scanner reads them to decide whether some live worker can run a route-blocked execution.

Every key of an instance carries the alive TTL (renewed by each heartbeat), so a worker that
crashes leaves nothing behind once the TTL passes; its index entry is pruned by the next
heartbeat of any worker (a bounded sample) or by the next capability read.
"""

from __future__ import annotations

from flowfabric.server.valkey.codec import text
from flowfabric.server.valkey.errors import FlowFabricError
from flowfabric.server.valkey.keys import WORKERS_INDEX, WorkerKeys
from flowfabric.server.valkey.store import Store

__all__ = ["WORKERS_INDEX", "WorkerRegistry", "alive_ttl_ms"]


def _keys(instance: str) -> tuple[str, str, str]:
    k = WorkerKeys(instance)
    return k.info, k.caps, k.alive


PRUNE_SAMPLE = 8  # stale index entries a heartbeat may drop


def alive_ttl_ms(lease_ttl_ms: int) -> int:
    return max(2 * lease_ttl_ms, 1000)


class WorkerRegistry:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def register(
        self, worker_id: str, instance: str, caps_csv: str, lanes: list[str], lease_ttl_ms: int
    ) -> int:
        """Take the alive key (a second live process with this instance id is refused)."""
        info, caps, alive = _keys(instance)
        ttl = alive_ttl_ms(lease_ttl_ms)
        taken = await self.store.call("SET", alive, worker_id, "NX", "PX", ttl)
        if not taken:
            raise FlowFabricError(
                "duplicate_worker_instance",
                message=f"worker instance {instance} is already registered and alive",
            )
        now = await self.store.time_ms()
        await self.store.call(
            "HSET", info, "worker_id", worker_id, "lanes", ",".join(lanes),
            "registered_at", now, "last_heartbeat_at", now,
        )  # fmt: skip
        await self.store.call("PEXPIRE", info, ttl)
        await self.store.call("SET", caps, caps_csv, "PX", ttl)
        await self.store.call("SADD", WORKERS_INDEX, instance)
        return now + ttl

    async def heartbeat(
        self, worker_id: str, instance: str, caps_csv: str, lease_ttl_ms: int
    ) -> int:
        info, caps, alive = _keys(instance)
        ttl = alive_ttl_ms(lease_ttl_ms)
        now = await self.store.time_ms()
        await self.store.call("SET", alive, worker_id, "PX", ttl)
        await self.store.call("SET", caps, caps_csv, "PX", ttl)
        await self.store.call("HSET", info, "worker_id", worker_id, "last_heartbeat_at", now)
        await self.store.call("PEXPIRE", info, ttl)
        await self.store.call("SADD", WORKERS_INDEX, instance)
        await self.prune()
        return now + ttl

    async def prune(self, sample: int = PRUNE_SAMPLE) -> int:
        """Drop up to `sample` index entries whose alive key has expired; returns how many."""
        members = await self.store.call("SRANDMEMBER", WORKERS_INDEX, sample)
        dropped = 0
        for member in members or ():
            instance = text(member)
            info, caps, alive = _keys(instance)
            if not await self.store.call("EXISTS", alive):
                await self.store.call("SREM", WORKERS_INDEX, instance)
                await self.store.call("DEL", info)
                await self.store.call("DEL", caps)
                dropped += 1
        return dropped

    async def deregister(self, instance: str) -> bool:
        info, caps, alive = _keys(instance)
        existed = bool(await self.store.call("DEL", alive))
        await self.store.call("DEL", caps)
        await self.store.call("DEL", info)
        await self.store.call("SREM", WORKERS_INDEX, instance)
        return existed

    async def live_capability_sets(self) -> list[frozenset[str]]:
        """Each live worker's capability set; stale index entries are dropped."""
        instances = [text(m) for m in await self.store.call("SMEMBERS", WORKERS_INDEX)]
        out = []
        for instance in instances:
            _, caps, alive = _keys(instance)
            if not await self.store.call("EXISTS", alive):
                await self.store.call("SREM", WORKERS_INDEX, instance)
                continue
            csv = text(await self.store.call("GET", caps))
            out.append(frozenset(t for t in csv.split(",") if t))
        return out
