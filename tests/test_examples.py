"""Every example runs in one command against its own embedded server and exits 0."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


LLM_BUDGET = (
    "globex: 2 completed, 1 failed (budget_exceeded), usage 280/280",
    "initech: 2 completed, 1 waiting for the budget, usage 240/300, no",
    "umbrella: 0 completed, 3 waiting for the budget, usage 200/200",
)


@pytest.mark.parametrize(
    ("script", "expected", "stdin"),
    [
        ("quickstart.py", ('result: {"greeting":"hello, world"}',), None),
        ("tasks_app.py", ("greet: hello, world!",), None),
        ("betterproto2_client.py", ('result: {"greeting": "hello, dataclasses"}',), None),
        ("retries_and_cancel.py", ("as expected",), None),
        ("pipeline.py", ("summary: incident-42.md: The cache expired early.",), None),
        (
            "approval.py --auto-approve --tamper",
            ("tampered token refused: PERMISSION_DENIED",),
            None,
        ),
        ("approval.py --reject", ("draft     failed",), None),
        # no terminal and nothing piped: the example approves instead of dying on EOF
        ("approval.py", ("no terminal and no piped answer: approving", "draft     completed"), ""),
        ("dag.py", ("total: 385 from 10 branches",), None),
        ("llm_budget.py", LLM_BUDGET, None),
    ],
)
def test_example_runs(script: str, expected: tuple[str, ...], stdin: str | None) -> None:
    name, *args = script.split()
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=110,
        cwd=EXAMPLES,
        input=stdin,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for line in expected:
        assert line in done.stdout, done.stdout
    if name in ("approval.py", "llm_budget.py"):
        assert "as expected" in done.stdout, done.stdout
