"""Every example runs in one command against its own embedded server and exits 0."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("quickstart.py", 'result: {"greeting":"hello, world"}'),
        ("betterproto2_client.py", 'result: {"greeting": "hello, dataclasses"}'),
        ("retries_and_cancel.py", "as expected"),
        ("pipeline.py", "summary: incident-42.md: The cache expired early."),
        ("approval.py --auto-approve --tamper", "tampered token refused: PERMISSION_DENIED"),
        ("approval.py --reject", "draft     failed"),
        ("dag.py", "total: 385 from 10 branches"),
        ("llm_budget.py", "globex: 2 completed, 1 failed (budget_exceeded), usage 280/280"),
        ("llm_budget.py", "initech: 2 completed, 1 waiting for the budget, usage 240/300, no"),
        ("llm_budget.py", "umbrella: 0 completed, 3 waiting for the budget, usage 200/200"),
    ],
)
def test_example_runs(script: str, expected: str) -> None:
    name, *args = script.split()
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=110,
        cwd=EXAMPLES,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert expected in done.stdout, done.stdout
    if name in ("approval.py", "llm_budget.py"):
        assert "as expected" in done.stdout, done.stdout
