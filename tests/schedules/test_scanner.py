"""The schedule scanner driven by an explicit clock: one execution per slot, catch-up and
overlap policies, a lost create retried (docs/schedules.md), both topologies."""

from __future__ import annotations

import asyncio

import pytest

from flowfabric.server.engine.schedules import ScheduleEngine, ScheduleSpec, Template, keys_of
from flowfabric.server.valkey.errors import FlowFabricError
from flowfabric.server.valkey.functions import Fence, Functions
from flowfabric.server.valkey.ids import parse_execution_id
from flowfabric.server.valkey.keys import ExecKeys
from flowfabric.server.valkey.store import Store
from tests.api.util import keyspace_dump

P = 256
T0 = 1_800_000_000_000  # a whole minute
MIN = 60_000


def engine(store: Store) -> ScheduleEngine:
    return ScheduleEngine(store, Functions(store), P)


def spec(**kw: object) -> ScheduleSpec:
    base: dict[str, object] = {"template": Template("report"), "cron": "* * * * *"}
    return ScheduleSpec(**{**base, **kw})  # type: ignore[arg-type]


async def _cancel(store: Store, eid: str) -> None:
    await Functions(store).execution.cancel_execution(
        parse_execution_id(eid, P), "test", "operator_override", Fence()
    )


async def test_each_slot_fires_once_across_replicas(store: Store) -> None:
    a, b = engine(store), engine(store)
    sid = await a.create(spec(overlap="allow"), T0 - 1)
    assert await a.upcoming(sid, 3) == [T0, T0 + MIN, T0 + 2 * MIN]
    assert await a.tick(T0 - 1) == []
    fired = [f for r in await asyncio.gather(a.tick(T0), b.tick(T0)) for f in r]
    # the loser may find the winner's claim pending and settle it too: the same execution
    assert sorted(f.outcome for f in fired) in (["created"], ["created", "duplicate"])
    assert {(f.slot_ms, f.execution_id) for f in fired} == {(T0, fired[0].execution_id)}
    assert await a.tick(T0 + 30_000) == [] and await b.tick(T0) == []
    second = await b.tick(T0 + MIN)
    assert [(f.slot_ms, f.outcome) for f in second] == [(T0 + MIN, "created")]
    assert second[0].execution_id != fired[0].execution_id
    row = await a.read(sid)
    assert row is not None and row["fire_count"] == "2"


async def test_lost_create_is_retried_not_lost_or_doubled(store: Store) -> None:
    eng = engine(store)
    sid = await eng.create(spec(overlap="allow"), T0 - 1)
    # a replica claims the slot and dies before creating the execution
    r = await eng.fn.schedule.claim(keys_of(sid), T0, T0 + MIN, now=T0)
    assert r.outcome == "fire"
    fired = await engine(store).tick(T0 + 1)
    assert [(f.slot_ms, f.outcome) for f in fired] == [(T0, "created")]
    # ... or dies after the create, before the ack: the retry finds the same execution
    await eng.fn.schedule.claim(keys_of(sid), T0 + MIN, T0 + 2 * MIN, now=T0 + MIN)
    eid, _ = await eng._create(spec().template, f"sched:{sid}:{T0 + MIN}")
    again = await engine(store).tick(T0 + MIN + 1)
    assert [(f.outcome, f.execution_id) for f in again] == [("duplicate", eid)]


async def test_overlap_skip_and_cancel_previous(store: Store) -> None:
    eng = engine(store)
    skip = await eng.create(spec(overlap="skip"), T0 - 1)
    cancel = await eng.create(spec(overlap="cancel_previous"), T0 - 1)
    first = {f.schedule_id: f for f in await eng.tick(T0)}
    assert first[skip].outcome == first[cancel].outcome == "created"
    nxt = {f.schedule_id: f for f in await eng.tick(T0 + MIN)}
    assert nxt[skip].outcome == "skipped"  # the first run is still eligible
    assert nxt[cancel].outcome == "created"
    core = ExecKeys(parse_execution_id(first[cancel].execution_id, P)).core
    state = await store.call("HGET", core, "public_state")
    assert state == b"cancelled"
    await _cancel(store, first[skip].execution_id)
    third = {f.schedule_id: f for f in await eng.tick(T0 + 2 * MIN)}
    assert third[skip].outcome == "created"


@pytest.mark.parametrize(
    ("policy", "want"),
    [
        ("none", [(T0, "skipped"), (T0 + 10 * MIN, "skipped")]),
        ("last", [(T0, "skipped"), (T0 + 10 * MIN, "created")]),
        ("all", [(T0, "skipped"), (T0 + 5 * MIN, "created"), (T0 + 10 * MIN, "created")]),
    ],
)
async def test_catch_up_after_downtime(
    store: Store, policy: str, want: list[tuple[int, str]]
) -> None:
    """Every 5 minutes, down from T0 to T0+12: slots T0, +5 and +10 missed (+10 by 2 minutes)."""
    eng = engine(store)
    s = spec(cron="*/5 * * * *", overlap="allow", catch_up=policy, catch_up_window_ms=7 * MIN)
    sid = await eng.create(s, T0 - 1)
    fired = await eng.tick(T0 + 12 * MIN)
    assert [(f.slot_ms, f.outcome) for f in fired] == want
    row = await eng.read(sid)
    assert row is not None and int(row["cursor"]) == T0 + 15 * MIN


async def test_pause_resume_trigger_and_bad_specs(store: Store) -> None:
    eng = engine(store)
    sid = await eng.create(spec(cron="*/5 * * * *", time_zone="Europe/Berlin"), T0 - 1)
    assert await eng.create(spec(cron="*/5 * * * *", time_zone="Europe/Berlin"), T0, sid) == sid
    with pytest.raises(FlowFabricError) as err:
        await eng.create(spec(cron="*/10 * * * *"), T0, sid)
    assert err.value.code == "schedule_exists"
    assert await eng.pause(sid) == "pause"
    assert await eng.tick(T0 + 10 * MIN) == []
    assert await eng.resume(sid, T0 + 12 * MIN) == "resume"
    assert await eng.upcoming(sid, 1) == [T0 + 15 * MIN]
    t1 = await eng.trigger(sid, "r1")
    t2 = await eng.trigger(sid, "r1")
    assert (t1.outcome, t2.outcome) == ("created", "duplicate")
    assert t1.execution_id == t2.execution_id
    before = await keyspace_dump(store)
    for bad, code in [
        (spec(cron="61 * * * *"), "invalid_cron"),
        (spec(time_zone="Nowhere/Land"), "invalid_time_zone"),
        (spec(cron="", interval_ms=500), "invalid_schedule"),
        (spec(overlap="maybe"), "invalid_schedule"),
        (spec(template=Template("k", policy_json="[1]")), "invalid_policy_json"),
    ]:
        with pytest.raises(FlowFabricError) as err:
            await eng.create(bad, T0)
        assert err.value.code == code
    assert await keyspace_dump(store) == before
    assert await eng.delete(sid) == "delete"


async def test_a_template_the_engine_refuses_settles_the_slot(store: Store) -> None:
    """An unknown policy field passes the schedule's JSON check but not ff_create_execution:
    the slot is settled as rejected, the next one is tried, nothing loops."""
    eng = engine(store)
    sid = await eng.create(spec(template=Template("k", policy_json='{"bogus": 1}')), T0 - 1)
    assert [f.outcome for f in await eng.tick(T0)] == ["rejected"]
    row = await eng.read(sid)
    assert row is not None and row["last_execution_id"] == "rejected:invalid_policy_json"
    assert "pending_slot" not in row and int(row["cursor"]) == T0 + MIN
