"""(f) Two server processes on one store, every scanner fast, a worker on each and one more
killed mid-run: no execution is transitioned twice (a lease epoch issued, expired, reclaimed or
released twice, a second terminal release) and each ends as its kind says. Three servers race
the same scanners one process more: `scripts/faults.py multi-server-3` (out of CI time)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.conftest import Report
from tests.faults.scenarios import MultiServer, multi_server


@pytest.mark.parametrize("servers", [2])
@pytest.mark.timeout(180)
async def test_scanners_of_several_servers_never_double_transition(
    tmp_path: Path, fault_report: Report, servers: int
) -> None:
    result = await multi_server(tmp_path, MultiServer(servers=servers))
    fault_report(result.name, result.counts)
    assert not result.violations, result.violations
