"""The `flowfabric` client commands as real processes against a running server."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

from tests.conftest import API_TOKEN, Api

CLI = [sys.executable, "-c", "from flowfabric.cli import run; run()"]


async def cli(
    api: Api, *args: str, token: str | None = API_TOKEN
) -> subprocess.CompletedProcess[str]:
    base = [*CLI, "--target", api.address]
    if token:
        base += ["--token", token]
    return await asyncio.to_thread(
        subprocess.run, [*base, *args], capture_output=True, text=True, timeout=60
    )


async def test_submit_get_list_cancel_watch(api: Api) -> None:
    done = await cli(
        api,
        "--json",
        "submit",
        "report",
        "--payload",
        "hi",
        "--priority",
        "3",
        "--tag",
        "app.owner=me",
        "--idempotency-key",
        "cli-1",
    )
    assert done.returncode == 0, done.stderr
    eid = json.loads(done.stdout)["created"]["execution_id"]
    again = await cli(api, "submit", "report", "--idempotency-key", "cli-1")
    assert again.returncode == 0 and "duplicate" in again.stdout and eid in again.stdout
    shown = await cli(api, "get", eid)
    assert shown.returncode == 0 and "waiting" in shown.stdout and "app.owner" in shown.stdout
    listed = await cli(api, "list")
    assert listed.returncode == 0 and eid in listed.stdout and "EXECUTION_ID" in listed.stdout
    cancelled = await cli(api, "cancel", eid)
    assert cancelled.returncode == 0, cancelled.stderr
    watched = await cli(api, "watch", eid)
    assert watched.returncode == 5 and "cancelled" in watched.stdout  # ended, not completed
    info = await cli(api, "admin", "info")
    assert info.returncode == 0 and "flow partitions" in info.stdout


async def test_exit_codes(api: Api) -> None:
    missing = await cli(api, "get", "{fp:1}:00000000-0000-4000-8000-000000000000")
    assert missing.returncode == 3 and "execution_not_found" in missing.stderr
    bad = await cli(api, "get", "not-an-id")
    assert bad.returncode == 1 and "invalid_input" in bad.stderr
    denied = await cli(api, "list", token=None)
    assert denied.returncode == 1 and "unauthenticated" in denied.stderr
    usage = await cli(api, "submit")
    assert usage.returncode == 2
    unreachable = await asyncio.to_thread(
        subprocess.run,
        [*CLI, "--target", "127.0.0.1:1", "--timeout", "2", "list"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert unreachable.returncode == 4
