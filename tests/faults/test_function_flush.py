"""(d) `FUNCTION FLUSH` under load: the server reloads the library and carries on; clients see
at most retryable errors and nothing is lost."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.conftest import Report
from tests.faults.scenarios import FunctionFlush, function_flush


@pytest.mark.timeout(180)
async def test_function_flush_under_load_is_reloaded(tmp_path: Path, fault_report: Report) -> None:
    result = await function_flush(tmp_path, FunctionFlush())
    fault_report(result.name, result.counts)
    assert not result.violations, result.violations
