"""The fault suite's report: each scenario's one-line count summary is printed in the normal
pytest output (a terminal-summary section, with or without `-s`) and appended as a JSON line
to `tests/faults/.last-run.jsonl` (rewritten by each run; gitignored). Under pytest-xdist each
worker writes its own `.last-run.<worker>.jsonl` (and its summary lines are not shown)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.faults.harness import append_jsonl, summary_line

_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
RESULTS = Path(__file__).with_name(f".last-run.{_WORKER}.jsonl" if _WORKER else ".last-run.jsonl")
_lines: list[str] = []

Report = Callable[[str, dict[str, Any]], None]


@pytest.fixture(scope="session")
def fault_report() -> Report:
    """`fault_report(name, counts)`: record one scenario's counts."""
    RESULTS.unlink(missing_ok=True)

    def report(name: str, counts: dict[str, Any]) -> None:
        _lines.append(summary_line(name, counts))
        append_jsonl(RESULTS, name, counts)

    return report


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _lines:
        terminalreporter.section("fault suite counts")
        for line in _lines:
            terminalreporter.write_line(line)
