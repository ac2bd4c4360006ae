"""(b) `flowfabric serve` killed -9 with clients and workers retrying: every acknowledged
create ends terminal exactly once, and exactly one valkey-server works on the data dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.conftest import Report
from tests.faults.scenarios import ServerKill, server_kill


@pytest.mark.timeout(180)
async def test_server_kill_9_loses_nothing_acknowledged(
    tmp_path: Path, fault_report: Report
) -> None:
    result = await server_kill(tmp_path, ServerKill())
    fault_report(result.name, result.counts)
    assert not result.violations, result.violations
