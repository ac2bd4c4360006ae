"""The `flowfabric` client commands as real processes against a running server."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from tests.conftest import API_TOKEN, Api

# The commands' own behaviour (parsing, printing, exit codes) is the same on either topology, and
# the server paths they drive are tested on both in tests/api: these run on standalone only.
standalone = pytest.mark.parametrize("valkey_url", ["standalone"], indirect=True)
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


@standalone
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
    rows = dict(line.split(None, 1) for line in shown.stdout.splitlines() if " " in line)
    assert (rows["kind"], rows["priority"]) == ("report", "3"), shown.stdout
    described = json.loads((await cli(api, "--json", "get", eid)).stdout)
    assert (described["execution_kind"], described["priority"]) == ("report", 3)
    listed = await cli(api, "list")
    assert listed.returncode == 0 and eid in listed.stdout and "EXECUTION_ID" in listed.stdout
    cancelled = await cli(api, "cancel", eid)
    assert cancelled.returncode == 0, cancelled.stderr
    watched = await cli(api, "watch", eid)
    assert watched.returncode == 5 and "cancelled" in watched.stdout  # ended, not completed
    info = await cli(api, "admin", "info")
    assert info.returncode == 0 and "flow partitions" in info.stdout


@standalone
async def test_exit_codes(api: Api) -> None:
    missing = await cli(api, "get", "{fp:1}:00000000-0000-4000-8000-000000000000")
    assert missing.returncode == 3 and "execution_not_found" in missing.stderr
    bad = await cli(api, "get", "not-an-id")
    assert bad.returncode == 2 and "invalid_input" in bad.stderr
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


@standalone
async def test_watch_shows_progress_live(api: Api) -> None:
    from flowfabric.v1 import worker_pb2 as wpb
    from tests.api.test_lifecycle import claim_one, complete, create

    eid = await create(api)
    lease = (await claim_one(api)).lease
    base = [*CLI, "--target", api.address, "--token", API_TOKEN]
    proc = await asyncio.create_subprocess_exec(
        *base, "watch", eid, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None
    assert b"active" in await asyncio.wait_for(proc.stdout.readline(), 20)
    await api.worker.UpdateProgress(
        wpb.UpdateProgressRequest(lease=lease, progress_pct=40, progress_message="halfway"),
        metadata=api.metadata,
    )
    line = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode()
    assert line.rstrip().endswith("active  40%  halfway"), line
    await complete(api, lease)
    out, err = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 0, err
    assert out.decode().rstrip().endswith("completed  40%  halfway"), out


@standalone
async def test_tail_prints_frames_live(api: Api) -> None:
    from tests.api.test_lifecycle import claim_one, complete, create
    from tests.api.test_streams import append

    eid = await create(api)
    lease = (await claim_one(api)).lease
    await append(api, lease, b"hello", "log")
    await append(api, lease, b"\xff\x00", "bin")
    once = await cli(api, "tail", eid)
    assert once.returncode == 0, once.stderr
    lines = once.stdout.splitlines()
    assert [ln.split("  ", 1)[1] for ln in lines] == ["log  hello", "bin  0xff00"]
    base = [*CLI, "--target", api.address, "--token", API_TOKEN]
    proc = await asyncio.create_subprocess_exec(
        *base, "tail", eid, "-f", "--after", lines[0].split()[0],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    first = await asyncio.wait_for(proc.stdout.readline(), 20)
    assert b"bin  0xff00" in first
    await append(api, lease, b"live!", "log")
    live = await asyncio.wait_for(proc.stdout.readline(), 10)
    assert live.decode().rstrip().endswith("log  live!")
    await complete(api, lease)
    _, err = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 0 and b"closed: attempt_success" in err
