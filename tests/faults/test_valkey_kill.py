"""(c) The embedded valkey-server killed -9: the server restarts it (health NOT_SERVING, then
SERVING) and clients retrying lose nothing acknowledged."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.conftest import Report
from tests.faults.scenarios import ValkeyKill, valkey_kill


@pytest.mark.timeout(180)
async def test_embedded_valkey_kill_9_is_restarted_and_loses_nothing(
    tmp_path: Path, fault_report: Report
) -> None:
    result = await valkey_kill(tmp_path, ValkeyKill())
    fault_report(result.name, result.counts)
    assert not result.violations, result.violations
