"""(a) A worker killed -9 under a steady inflow: every execution completes exactly once, and
its leases are reclaimed within lease TTL + the expiry interval + one claim, backlog or not."""

from __future__ import annotations

import pytest

from tests.faults.conftest import Report
from tests.faults.scenarios import Result, WorkerKill, reclaim_violations, worker_kill


@pytest.fixture(scope="module")
async def killed(tmp_path_factory: pytest.TempPathFactory, fault_report: Report) -> Result:
    result = await worker_kill(tmp_path_factory.mktemp("worker-kill"), WorkerKill())
    fault_report(result.name, result.counts)
    return result


@pytest.mark.timeout(180)
async def test_every_execution_completes_exactly_once(killed: Result) -> None:
    assert not killed.violations, killed.violations


@pytest.mark.timeout(180)
async def test_reclaim_within_ttl_plus_expiry_interval_plus_a_claim(killed: Result) -> None:
    assert not reclaim_violations(killed), killed.counts
