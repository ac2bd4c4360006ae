"""Failures you can read from the shell (docs/lifecycle.md#why-did-it-fail): `flowfabric get`
and `flowfabric result` show a failed handler's reason and traceback, `result` answers a
completed execution's bytes and exits 5 or 3 otherwise."""

from __future__ import annotations

import asyncio
import json

import pytest

from flowfabric.v1 import worker_pb2 as wpb
from tests.api.test_cli_client import cli
from tests.api.test_lifecycle import claim_one, complete, create
from tests.conftest import Api

# The commands' output and exit codes are the same on either topology: standalone only.
standalone = pytest.mark.parametrize("valkey_url", ["standalone"], indirect=True)

TRACEBACK = 'Traceback (most recent call last):\n  File "app.py", line 3\nValueError: bad row 7'


async def _failed_and_completed(api: Api) -> tuple[str, str, str]:
    """A failed execution (with a traceback), a completed one and a waiting one in lane L."""
    failed = await create(api)
    task = await claim_one(api)
    assert task.lease.execution_id == failed
    request = wpb.FailExecutionRequest(
        lease=task.lease,
        failure_reason="bad input row",
        failure_category="validation",
        failure_details=TRACEBACK,
    )
    await api.worker.FailExecution(request, metadata=api.metadata)
    done = await create(api)
    await complete(api, (await claim_one(api)).lease, b"all good")
    waiting = await create(api)
    return failed, done, waiting


@standalone
async def test_get_and_result_show_the_failure(api: Api) -> None:
    failed, done, waiting = await _failed_and_completed(api)
    shown, res, res_json, ok, ok_json, pending = await asyncio.gather(
        cli(api, "get", failed),
        cli(api, "result", failed),
        cli(api, "--json", "result", failed),
        cli(api, "result", done),
        cli(api, "--json", "result", done),
        cli(api, "result", waiting),
    )
    assert shown.returncode == 0, shown.stderr
    assert "bad input row [validation] attempt 0" in shown.stdout, shown.stdout
    assert "ValueError: bad row 7" in shown.stdout and "UTC" in shown.stdout, shown.stdout
    assert res.returncode == 5, res.stderr
    pairs = (line.split(None, 1) for line in res.stdout.splitlines() if line[:1].isalpha())
    rows = {p[0]: p[-1] for p in pairs}
    assert rows["outcome"] == "failed" and rows["worker"] == "w-1", res.stdout
    assert "bad input row [validation]" in rows["failure"], res.stdout
    assert "Traceback (most recent call last)" in res.stdout, res.stdout
    assert res_json.returncode == 5, res_json.stderr
    body = json.loads(res_json.stdout)
    assert body["outcome"] == "failed" and body["last_failure"]["details"] == TRACEBACK
    assert body["last_failure"]["reason"] == "bad input row"
    assert (ok.returncode, ok.stdout) == (0, "all good\n"), ok.stderr
    assert json.loads(ok_json.stdout)["result"] == "all good"
    assert pending.returncode == 3 and "has not finished yet" in pending.stderr, pending
    assert len(pending.stderr.strip().splitlines()) == 1, pending.stderr
