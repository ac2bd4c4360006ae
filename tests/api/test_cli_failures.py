"""Failures you can read from the shell (docs/lifecycle.md#why-did-it-fail): `flowfabric get`
and `flowfabric result` show a failed handler's reason and traceback, `result` answers a
completed execution's bytes and exits 5 or 3 otherwise; `list --state failed` lists the failed
ones only (ListExecutions `public_states`, docs/lifecycle.md#reads)."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from flowfabric.v1 import execution_pb2 as pb
from flowfabric.v1 import types_pb2 as t
from flowfabric.v1 import worker_pb2 as wpb
from tests.api.test_cli_client import cli
from tests.api.test_lifecycle import LANE, claim_one, complete, create
from tests.api.util import expect_error
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
    shown, res, res_json, ok, ok_json, pending, only_failed, only_done = await asyncio.gather(
        cli(api, "get", failed),
        cli(api, "result", failed),
        cli(api, "--json", "result", failed),
        cli(api, "result", done),
        cli(api, "--json", "result", done),
        cli(api, "result", waiting),
        cli(api, "list", "--lane", LANE, "--state", "failed"),
        cli(api, "list", "--lane", LANE, "--state", "completed"),
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
    assert only_failed.returncode == 0, only_failed.stderr
    assert failed in only_failed.stdout and done not in only_failed.stdout, only_failed.stdout
    assert waiting not in only_failed.stdout
    assert done in only_done.stdout and failed not in only_done.stdout, only_done.stdout


@standalone
async def test_public_state_filter_pages_and_bad_states(api: Api) -> None:
    failed, done, _ = await _failed_and_completed(api)

    async def page(token: str = "", **kw: object) -> pb.ListExecutionsResponse:
        request = pb.ListExecutionsRequest(
            lane=LANE, state=pb.EXECUTION_INDEX_TERMINAL, page_token=token, **kw
        )
        return await api.execution.ListExecutions(request, metadata=api.metadata)  # type: ignore[no-any-return]

    everything = await page()
    assert [r.execution_id for r in everything.executions] == [failed, done]
    # One index entry per page: the first (the failed one) is filtered out, the page is empty
    # but says there is more; the next page holds the completed one.
    first = await page(limit=1, public_states=[t.PUBLIC_STATE_COMPLETED])
    assert (list(first.executions), first.total_returned) == ([], 0) and first.next_page_token
    second = await page(first.next_page_token, limit=1, public_states=[t.PUBLIC_STATE_COMPLETED])
    assert [r.execution_id for r in second.executions] == [done]
    both = await page(public_states=[t.PUBLIC_STATE_FAILED, t.PUBLIC_STATE_COMPLETED])
    assert [r.execution_id for r in both.executions] == [failed, done]
    for bad in ([t.PUBLIC_STATE_UNSPECIFIED], [99], [t.PUBLIC_STATE_FAILED] * 65):
        info = await expect_error(page(public_states=bad), grpc.StatusCode.INVALID_ARGUMENT,
                                  "invalid_input")  # fmt: skip
        assert info.metadata["field"] == "public_states", info
