"""The index reconciler and the retention trimmer (docs/architecture.md#scanners), run one cycle at
a time."""

from __future__ import annotations

import uuid

from flowfabric.server.config import Config
from flowfabric.server.engine.lifecycle import IndexReconciler, RetentionTrimmer, lifecycle_scanners
from flowfabric.server.valkey.functions import Claimer, Fence, Functions, NewExecution
from flowfabric.server.valkey.ids import ExecutionId
from flowfabric.server.valkey.keys import ExecKeys, PartitionKeys
from flowfabric.server.valkey.store import Store
from flowfabric.server.valkey.workers import WorkerRegistry

LANE = "default"
PARTITIONS = 8


async def make(fn: Functions, partition: int = 3) -> ExecutionId:
    eid = ExecutionId(partition, str(uuid.uuid4()))
    await fn.execution.create_execution(NewExecution(eid, "ns", LANE, "k", b"in", 0, "t"))
    return eid


async def test_reconciler_repairs_lost_and_stray_index_entries(store: Store) -> None:
    fn = Functions(store)
    lost, stray, fine = await make(fn), await make(fn), await make(fn)
    p = PartitionKeys(lost.tag)
    await store.call("ZREM", p.lane(LANE, "eligible"), str(lost))  # lost its index entry
    await store.call("ZADD", p.lane(LANE, "terminal"), 1, str(stray))  # in two sets
    reconciler = IndexReconciler(store, fn, PARTITIONS, 1000)
    assert await reconciler.run_cycle() == 2
    assert await store.call("ZSCORE", p.lane(LANE, "eligible"), str(lost)) is not None
    assert await store.call("ZSCORE", p.lane(LANE, "terminal"), str(stray)) is None
    assert await store.call("ZSCORE", p.lane(LANE, "eligible"), str(fine)) is not None
    assert await reconciler.run_cycle() == 0  # nothing left to repair


async def test_retention_trimmer_deletes_old_terminal_executions(store: Store) -> None:
    fn = Functions(store)
    old, live = await make(fn), await make(fn)
    who = Claimer("w", "wi", LANE)
    await fn.scheduling.issue_claim_grant(old, who, 5000)
    r = await fn.scheduling.claim_execution(old, who, str(uuid.uuid4()), 30_000, str(uuid.uuid4()))
    await fn.execution.complete_execution(
        old, Fence(r.lease_id, r.lease_epoch, r.attempt_id), b"out", "", "lease_holder"
    )
    p = PartitionKeys(old.tag)
    # age the terminal entry past the 24 h cutoff
    await store.call("ZADD", p.lane(LANE, "terminal"), 1, str(old))
    config = Config(flow_partitions=PARTITIONS, lanes=(LANE,))
    scanners = lifecycle_scanners(config, store, fn, WorkerRegistry(store))
    trimmer = next(s for s in scanners.scanners if s.name == "retention_trimmer")
    assert await scanners.run_cycle(trimmer) == 1
    k = ExecKeys(old)
    for key in (k.core, k.payload, k.result, k.attempt(0), k.lease_history, k.attempts):
        assert await store.call("EXISTS", key) == 0, key
    assert await store.call("SISMEMBER", p.all_executions, str(old)) == 0
    assert await store.call("ZSCORE", p.lane(LANE, "terminal"), str(old)) is None
    assert await store.call("EXISTS", ExecKeys(live).core) == 1  # others untouched
    # a replayed execution left in the index is only unindexed, never deleted
    await store.call("ZADD", p.lane(LANE, "terminal"), 1, str(live))
    await RetentionTrimmer(store, PARTITIONS).purge(live, LANE)
    assert await store.call("EXISTS", ExecKeys(live).core) == 1
    assert await store.call("ZSCORE", p.lane(LANE, "terminal"), str(live)) is None


async def test_retention_leaves_nothing_of_a_suspended_and_signalled_execution(
    store: Store,
) -> None:
    """Waitpoints, their conditions and signal histories, the signals and their payloads go
    with the execution: no key naming it, its waitpoint or its signal survives the purge."""
    from tests.lua.util import LANE as UTIL_LANE
    from tests.lua.util import cancel, send_signal, suspended

    lease, wpid, token = await suspended(store)
    eid = lease.eid
    sig = str(uuid.uuid4())
    reply = await send_signal(store, eid, wpid, token, sig=sig, payload=b"{}")
    assert reply[:2] == [1, b"OK"], reply
    assert (await cancel(store, eid))[:2] == [1, b"OK"]
    names = (eid.uuid, wpid, sig)

    async def naming() -> list[str]:
        if store.cluster:
            keys = [
                k
                for node in store.client.get_primaries()
                for k in await store.client.execute_command("KEYS", "*", target_nodes=node)
            ]
        else:
            keys = await store.call("KEYS", "*")
        found = [k.decode() if isinstance(k, bytes) else str(k) for k in keys]
        return [k for k in found if any(n in k for n in names)]

    assert any(wpid in k for k in await naming()) and any(sig in k for k in await naming())
    await RetentionTrimmer(store, PARTITIONS).purge(eid, UTIL_LANE)
    assert await naming() == []
