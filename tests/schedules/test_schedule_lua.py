"""ff_create_schedule, ff_claim_schedule_slot, ff_ack_schedule_fire and ff_set_schedule_state
called directly, both topologies (docs/schedules.md#exactly-once)."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from flowfabric.server.valkey.errors import FlowFabricError
from flowfabric.server.valkey.functions.schedule import ScheduleFunctions
from flowfabric.server.valkey.ids import schedule_partition
from flowfabric.server.valkey.keys import ScheduleKeys
from flowfabric.server.valkey.store import Store
from tests.api.util import keyspace_dump

T0 = 1_800_000_000_000
STEP = 60_000


def new_schedule() -> ScheduleKeys:
    sid = str(uuid.uuid4())
    return ScheduleKeys.of(schedule_partition(sid), sid)


async def test_two_claims_of_one_due_slot_fire_once(store: Store) -> None:
    fn, k = ScheduleFunctions(store), new_schedule()
    assert (await fn.create(k, '{"a":1}', T0, now=T0 - 1)).outcome == "created"
    assert (await fn.create(k, '{"a":1}', T0, now=T0 - 1)).outcome == "exists"
    with pytest.raises(FlowFabricError) as err:
        await fn.create(k, '{"a":2}', T0)
    assert err.value.code == "schedule_exists"
    assert (await fn.claim(k, T0, T0 + STEP, now=T0 - 1)).outcome == "not_due"
    replies = await asyncio.gather(*(fn.claim(k, T0, T0 + STEP, now=T0) for _ in range(5)))
    fired = [r for r in replies if r.outcome == "fire"]
    assert len(fired) == 1 and fired[0].detail == f"sched:{k.schedule_id}:{T0}"
    assert {r.outcome for r in replies} == {"fire", "pending"}
    # the next slot waits for the pending one's ack
    assert (await fn.claim(k, T0 + STEP, T0 + 2 * STEP, now=T0 + STEP)).outcome == "pending"
    assert (await fn.ack(k, T0, "{fp:1}:x")).outcome == "acked"
    assert (await fn.ack(k, T0, "{fp:1}:x")).outcome == "not_pending"
    assert (await fn.claim(k, T0, T0 + STEP, now=T0)).outcome == "already"
    assert (await fn.claim(k, T0 + STEP, T0 + 2 * STEP, skip=True, now=T0 + STEP)).outcome == (
        "skipped"
    )
    row = await store.call("HGETALL", k.definition)
    got = {x.decode(): y.decode() for x, y in row.items()}
    assert got["cursor"] == str(T0 + 2 * STEP) and got["fire_count"] == "1"
    assert got["skip_count"] == "1" and got["last_execution_id"] == "{fp:1}:x"
    assert await store.call("ZSCORE", k.due, k.schedule_id) == T0 + 2 * STEP


async def test_pause_resume_delete(store: Store) -> None:
    fn, k = ScheduleFunctions(store), new_schedule()
    await fn.create(k, "{}", T0)
    assert (await fn.set_state(k, "pause")).outcome == "pause"
    assert (await fn.set_state(k, "pause")).outcome == "paused"
    assert (await fn.claim(k, T0, T0 + STEP, now=T0)).outcome == "paused"
    assert await store.call("ZSCORE", k.due, k.schedule_id) is None
    assert (await fn.set_state(k, "resume", next_fire_at=T0 + 5 * STEP)).outcome == "resume"
    assert (await fn.claim(k, T0, T0 + STEP, now=T0)).outcome == "already"
    assert (await fn.set_state(k, "delete")).outcome == "delete"
    with pytest.raises(FlowFabricError) as err:
        await fn.claim(k, T0, T0 + STEP, now=T0)
    assert err.value.code == "schedule_not_found"
    assert not await keyspace_dump(store)


@pytest.mark.parametrize(
    ("slot", "nxt", "skip", "op"),
    [(T0, T0, False, None), (T0, T0 - 1, False, None), (None, None, False, "nap")],
)
async def test_bad_input_changes_nothing(
    store: Store, slot: int | None, nxt: int | None, skip: bool, op: str | None
) -> None:
    fn, k = ScheduleFunctions(store), new_schedule()
    await fn.create(k, "{}", T0)
    before = await keyspace_dump(store)
    with pytest.raises(FlowFabricError) as err:
        if op:
            await fn.set_state(k, op)
        else:
            assert slot is not None and nxt is not None
            await fn.claim(k, slot, nxt, skip=skip, now=T0)
    assert err.value.code == "invalid_input"
    assert await keyspace_dump(store) == before
