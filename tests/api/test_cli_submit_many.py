"""`flowfabric submit-many FILE`: one job per JSON line, sent in batches; a bad line exits 2
naming it before anything is sent."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

from tests.api.test_cli_client import CLI, standalone
from tests.api.util import keyspace_dump
from tests.conftest import API_TOKEN, Api


async def run(api: Api, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    cmd = [*CLI, "--target", api.address, "--token", API_TOKEN, *args]
    return await asyncio.to_thread(
        subprocess.run, cmd, input=stdin, capture_output=True, text=True, timeout=60
    )


@standalone
async def test_submit_many_from_stdin_prints_one_line_per_job(api: Api) -> None:
    lines = [
        {"kind": "email", "payload": {"to": "a"}, "idempotency_key": "j1"},
        {"kind": "email", "idempotency_key": "j1"},
        {"kind": "email", "tags": {"Bad Key": "v"}},
        {"kind": "report", "lane": "other", "priority": 2},
    ]
    text = (
        "\n".join(json.dumps(x) for x in lines[:2])
        + "\n\n"
        + "\n".join(json.dumps(x) for x in lines[2:])
    )
    done = await run(api, "submit-many", "-", stdin=text)
    assert done.returncode == 1, done.stderr  # one job failed
    out = done.stdout.splitlines()
    assert out[0].startswith("1 created ") and out[1] == "2 duplicate " + out[0].split()[2]
    assert out[2].startswith("4 error invalid_tag_key")
    assert out[3].startswith("5 created ")
    assert out[4] == "2 created, 1 duplicate, 1 failed"


@standalone
async def test_a_bad_line_exits_2_naming_it_and_sends_nothing(api: Api, tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"kind": "a"}\n{"kind": "b", "colour": "red"}\n')
    before = await keyspace_dump(api.store)
    done = await run(api, "submit-many", str(jobs))
    assert done.returncode == 2
    assert "line 2" in done.stderr and "colour" in done.stderr and "Traceback" not in done.stderr
    jobs.write_text('{"kind": "a"}\n{"kind": "b"\n')
    done = await run(api, "submit-many", str(jobs))
    assert done.returncode == 2 and "line 2: not JSON" in done.stderr
    assert await keyspace_dump(api.store) == before
