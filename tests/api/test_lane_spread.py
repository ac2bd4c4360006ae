"""Lanes across a cluster (docs/lifecycle.md#lanes-across-a-cluster): a lane's solo executions
spread over one partition per primary by default (one partition on standalone), one worker
claims all of them, priority order holds within a partition, the claims rotate over the
partitions, and an idempotent create retry reaches the partition of its first try.

Both topologies, on a server of the module's own with the default FF_LANE_SPREAD (auto).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator

import grpc
import pytest

from flowfabric.server.app import FlowFabricServer
from flowfabric.server.config import AUTO_SPREAD, Config, ConfigError
from flowfabric.server.engine.lane_partitions import LanePartitions, lane_partition_set
from flowfabric.server.valkey.ids import parse_execution_id, solo_partition
from flowfabric.server.valkey.keys import PartitionKeys
from flowfabric.server.valkey.store import Store
from flowfabric.v1 import execution_pb2 as pb
from tests.api.test_lifecycle import claim_next, create, eventually
from tests.conftest import API_TOKEN, HMAC_SECRET, Api

HOT = "hot"
PARTITIONS = 256  # the session server's count: ff:config:partitions stays as it is


@pytest.fixture(scope="module")
async def _spread_server(valkey_url: str, _session_store: Store) -> AsyncIterator[Api]:
    config = Config(
        valkey_url=valkey_url,
        listen_addr="127.0.0.1:0",
        api_token=API_TOKEN,
        waitpoint_hmac_secret=HMAC_SECRET,
        shutdown_grace_s=1.0,
        boot_retry_s=5.0,
    )
    server = FlowFabricServer(config, run_scanners=False)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    yield Api(channel, _session_store, server)
    await channel.close()
    await server.stop()


@pytest.fixture
async def spread_api(_spread_server: Api, store: Store) -> Api:
    """The module's server (its rotations carry over between tests: no test depends on where
    they start) on an empty keyspace."""
    return _spread_server


def primary_of(store: Store, partition: int) -> str:
    if not store.cluster:
        return "standalone"
    return str(store.cluster_client.get_node_from_key(f"{{fp:{partition}}}").name)


def partition_of(eid: str) -> int:
    return parse_execution_id(eid, PARTITIONS).partition


async def test_a_hot_lane_lands_on_every_primary_and_one_worker_claims_it_all(
    spread_api: Api,
) -> None:
    api = spread_api
    ids = [await create(api, lane_id=HOT) for _ in range(6)]
    # a batch takes one turn: its items of the lane share a partition (one call)
    batch = await api.execution.CreateExecutions(
        pb.CreateExecutionsRequest(
            items=[pb.CreateExecutionRequest(lane_id=HOT, execution_kind="demo")] * 3
        ),
        metadata=api.metadata,
    )
    batch_ids = [r.created.execution_id for r in batch.results]
    assert len({partition_of(e) for e in batch_ids}) == 1
    parts = {partition_of(e) for e in ids}
    primaries = {primary_of(api.store, p) for p in parts}
    if api.store.cluster:
        assert len(parts) == len(primaries) == len(await api.store.primaries()) == 3
    else:
        assert parts == {solo_partition(HOT, PARTITIONS)}
    assert solo_partition(HOT, PARTITIONS) in parts  # the home partition is one of them
    claimed = await claim_next(api, lanes=(HOT,), max_tasks=20)
    assert {task.lease.execution_id for task in claimed.batch.tasks} == {*ids, *batch_ids}
    assert (await claim_next(api, lanes=(HOT,))).WhichOneof("outcome") == "no_work"


async def test_priority_holds_within_a_partition_and_claims_rotate_over_them(
    spread_api: Api,
) -> None:
    api = spread_api
    width = 3 if api.store.cluster else 1
    priorities = [1, 5, 3, 9, 2, 7, 4, 8, 6]
    made = {await create(api, lane_id=HOT, priority=p): p for p in priorities}
    order = []
    for _ in priorities:
        task = (await claim_next(api, lanes=(HOT,))).task
        order.append((partition_of(task.lease.execution_id), made[task.lease.execution_id]))
    by_partition: dict[int, list[int]] = defaultdict(list)
    for part, prio in order:
        by_partition[part].append(prio)
    assert len(by_partition) == width
    for prios in by_partition.values():  # highest first within each partition
        assert prios == sorted(prios, reverse=True), order
    # each call starts one partition further: every S consecutive claims cover every partition
    for start in range(0, len(order) - width + 1, width):
        assert len({part for part, _ in order[start : start + width]}) == width, order


async def test_an_idempotent_retry_reaches_the_partition_of_its_first_try(
    spread_api: Api,
) -> None:
    api = spread_api
    keys = [f"order-{n}" for n in range(6)]
    first = {k: await create(api, lane_id=HOT, idempotency_key=k) for k in keys}
    for k in keys:
        again = await api.execution.CreateExecution(
            pb.CreateExecutionRequest(lane_id=HOT, execution_kind="demo", idempotency_key=k),
            metadata=api.metadata,
        )
        assert again.duplicate.execution_id == first[k]
    batch = await api.execution.CreateExecutions(
        pb.CreateExecutionsRequest(
            items=[
                pb.CreateExecutionRequest(lane_id=HOT, execution_kind="demo", idempotency_key=k)
                for k in keys
            ]
        ),
        metadata=api.metadata,
    )
    assert [r.duplicate.execution_id for r in batch.results] == [first[k] for k in keys]
    if api.store.cluster:  # the keys themselves spread
        assert len({partition_of(e) for e in first.values()}) > 1


async def test_a_waiting_claim_listens_to_every_partition_of_the_set(spread_api: Api) -> None:
    api = spread_api
    server = api.server
    assert server.scheduler is not None and server.hub is not None
    hub = server.hub
    channels = [PartitionKeys.of(p).exec_events for p in server.scheduler.lane_parts.of(HOT)]
    assert len(channels) == (3 if api.store.cluster else 1)
    waiter = asyncio.ensure_future(claim_next(api, lanes=(HOT,), wait_ms=10_000))

    async def listening() -> bool:
        return all(hub._listeners.get(c) for c in channels)

    await eventually(listening, "the waiting claim listens to every partition of the lane")
    eid = await create(api, lane_id=HOT)
    assert (await waiter).task.lease.execution_id == eid


def test_partition_sets_take_one_partition_per_primary_first() -> None:
    owners = [f"n{(p // 4) % 3}" for p in range(24)]  # runs of 4 partitions per node
    home = solo_partition(HOT, 24)
    three = lane_partition_set(HOT, 24, 3, owners)
    assert three[0] == home and len({owners[p] for p in three}) == 3
    five = lane_partition_set(HOT, 24, 5, owners)
    shares = sorted(sum(owners[p] == n for p in five) for n in ("n0", "n1", "n2"))
    assert five[:3] == three and shares == [1, 2, 2]
    assert lane_partition_set(HOT, 24, 3, None) == (home, (home + 1) % 24, (home + 2) % 24)
    assert lane_partition_set(HOT, 24, 1, owners) == (home,)
    assert len(lane_partition_set(HOT, 4, 9, None)) == 4  # never more than the partitions
    # a lane's own width wins over the default; auto without a cluster is 1
    lanes = LanePartitions(24, None, {"": 2, "cold": 1, "warm": AUTO_SPREAD})
    assert (len(lanes.of(HOT)), len(lanes.of("cold")), len(lanes.of("warm"))) == (2, 1, 1)
    nxt = (home + 1) % 24
    assert [lanes.rotated(HOT)[0] for _ in range(4)] == [home, nxt, home, nxt]


def test_lane_spread_setting() -> None:
    assert Config.from_env({}).lane_spread == {}  # auto
    parsed = Config.from_env({"FF_LANE_SPREAD": "2, hot=auto,cold=1"}).lane_spread
    assert parsed == {"": 2, "hot": AUTO_SPREAD, "cold": 1}
    for bad in ("0", "hot=x", "=3", "auto,auto", "hot=1,hot=2"):
        with pytest.raises(ConfigError, match="FF_LANE_SPREAD"):
            Config.from_env({"FF_LANE_SPREAD": bad})
