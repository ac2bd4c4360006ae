"""The SDK's schedule calls and the `flowfabric schedules` commands against a real server
(docs/schedules.md)."""

from __future__ import annotations

import json

import pytest

from flowfabric import Client, InvalidArgument, NotFound
from tests.conftest import API_TOKEN, Api
from tests.test_cli import _cli


async def test_sdk_round_trip(api: Api) -> None:
    async with Client(api.address, token=API_TOKEN) as client:
        sid, created = await client.create_schedule(
            "report", cron="0 9 * * MON-FRI", time_zone="Europe/Berlin", lane="sdk-sched"
        )
        assert created
        assert await client.create_schedule(
            "report", cron="0 9 * * MON-FRI", time_zone="Europe/Berlin", lane="sdk-sched",
            schedule_id=sid,
        ) == (sid, False)  # fmt: skip
        s = await client.schedule(sid, next_count=3)
        assert (s.state, s.overlap, s.catch_up, len(s.next_fire_times)) == (
            "active", "skip", "none", 3,
        )  # fmt: skip
        assert [x.schedule_id async for x in client.schedules()] == [sid]
        eid, dup = await client.trigger_schedule(sid, request_id="once")
        assert (await client.trigger_schedule(sid, request_id="once")) == (eid, True)
        assert not dup
        await client.pause_schedule(sid)
        assert (await client.schedule(sid)).state == "paused"
        assert await client.resume_schedule(sid) == s.next_fire_at
        with pytest.raises(InvalidArgument) as bad:
            await client.create_schedule("report", cron="0 25 * * *")
        assert bad.value.reason == "invalid_cron" and bad.value.metadata["field"] == "cron.hour"
        await client.delete_schedule(sid)
        with pytest.raises(NotFound):
            await client.schedule(sid)


async def test_cli_commands(api: Api) -> None:
    made = await _cli(api, "--json", "schedules", "create", "nightly", "--every-ms", "60000")
    assert made.returncode == 0, made.stderr
    sid = json.loads(made.stdout)["schedule_id"]
    shown = await _cli(api, "schedules", "show", sid, "--next", "2")
    assert shown.returncode == 0 and "every 60000 ms" in shown.stdout, shown.stderr
    bad = await _cli(api, "schedules", "create", "x", "--cron", "* * *")
    assert bad.returncode == 2 and "invalid_cron" in bad.stderr
