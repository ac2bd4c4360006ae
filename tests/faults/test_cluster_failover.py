"""(e) Valkey Cluster failover: 3 primaries and 3 replicas, the primary holding the load killed
-9 mid-load, its replica promoted; the server carries on (the library is on the promoted
node, connections re-routed) and, with replicated durability, loses no acknowledged
transition."""

from __future__ import annotations

import pytest

from tests.faults.conftest import Report
from tests.faults.scenarios import (
    ClusterFailover,
    Result,
    cluster_failover,
    durable_violations,
)


@pytest.fixture(scope="module")
async def failover(tmp_path_factory: pytest.TempPathFactory, fault_report: Report) -> Result:
    result = await cluster_failover(tmp_path_factory.mktemp("failover"), ClusterFailover())
    fault_report(result.name, result.counts)
    return result


@pytest.mark.timeout(180)
async def test_the_server_carries_on_through_a_primary_failover(failover: Result) -> None:
    assert not failover.violations, failover.violations


@pytest.mark.timeout(180)
async def test_replicated_durability_loses_no_acknowledged_transition(failover: Result) -> None:
    assert failover.counts["durable"], failover.counts
    assert not durable_violations(failover), failover.counts
