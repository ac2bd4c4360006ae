"""Replays of fenced terminal and pausing calls after a lost reply, decided inside the functions
(docs/lifecycle.md#replays), and the arguments the functions compose with TIME and the stored
policy (fail's retry_after_ms, suspend's timeout_in_ms)."""

from __future__ import annotations

import json

import pytest

from flowfabric.server.valkey.keys import PartitionKeys
from flowfabric.server.valkey.store import Store
from tests.lua.util import (
    Lease,
    cancel,
    claim,
    complete,
    core_of,
    create_and_claim,
    delay,
    fail,
    leased,
    move_to_children,
    now_ms,
    promote,
    snapshot,
    suspend,
)

REPLAYED = [1, b"ALREADY_SATISFIED", b"replayed"]


def tampered(lease: Lease, which: str) -> list[str]:
    """The lease's fence with one part replaced: not the fence that made the transition."""
    lid, epoch, aid = lease.fence
    if which == "lease_id":
        return ["another-lease", epoch, aid]
    if which == "epoch":
        return [lid, str(int(epoch) + 1), aid]
    return [lid, epoch, "another-attempt"]


FENCE_PARTS = pytest.mark.parametrize("which", ["lease_id", "epoch", "attempt_id"])


def retry_policy(**rp: object) -> str:
    return json.dumps({"retry_policy": rp})


# -- complete -------------------------------------------------------------------------------------


@FENCE_PARTS
async def test_complete_replay_needs_the_same_fence(store: Store, which: str) -> None:
    lease = await create_and_claim(store)
    assert await complete(store, lease.eid, lease.fence) == [1, b"OK", b"completed"]
    before = await snapshot(store, lease.eid)
    assert await complete(store, lease.eid, lease.fence) == [*REPLAYED, b"completed"]
    assert await complete(store, lease.eid, lease.fence) == [*REPLAYED, b"completed"]
    other = await complete(store, lease.eid, tampered(lease, which))
    assert other[:3] == [0, b"execution_not_active", b"success"]
    assert await snapshot(store, lease.eid) == before


async def test_complete_after_another_outcome_is_not_a_replay(store: Store) -> None:
    lease = await create_and_claim(store)
    await fail(store, lease.eid, lease.fence)
    again = await complete(store, lease.eid, lease.fence)
    assert again[:3] == [0, b"execution_not_active", b"failed"]


# -- fail -----------------------------------------------------------------------------------------


@FENCE_PARTS
async def test_retry_replay_returns_the_scheduled_retry(store: Store, which: str) -> None:
    lease = await create_and_claim(store, policy_json=retry_policy())
    first = await fail(store, lease.eid, lease.fence)
    assert first[:3] == [1, b"OK", b"retry_scheduled"]
    again = await fail(store, lease.eid, lease.fence)
    assert again == [*REPLAYED, b"retry_scheduled", first[3], first[4]]
    assert first[4] == b"1", "the next attempt is attempt 1"
    other = await fail(store, lease.eid, tampered(lease, which))
    assert other[:2] == [0, b"execution_not_active"]


async def test_retry_replay_ends_with_the_next_claim(store: Store) -> None:
    policy = retry_policy(backoff={"type": "fixed", "delay_ms": 0})
    lease = await create_and_claim(store, policy_json=policy)
    assert (await fail(store, lease.eid, lease.fence))[2] == b"retry_scheduled"
    await promote(store, lease.eid, await now_ms(store))
    promoted = await fail(store, lease.eid, lease.fence)
    assert promoted[:2] == [0, b"execution_not_active"], "no longer in its retry backoff"
    await claim(store, lease.eid)
    assert (await fail(store, lease.eid, lease.fence))[:2] == [0, b"stale_lease"]


async def test_terminal_fail_replay(store: Store) -> None:
    lease = await create_and_claim(store)
    assert await fail(store, lease.eid, lease.fence) == [1, b"OK", b"terminal_failed"]
    assert await fail(store, lease.eid, lease.fence) == [*REPLAYED, b"terminal_failed"]
    other = await fail(store, lease.eid, tampered(lease, "attempt_id"))
    assert other[:3] == [0, b"execution_not_active", b"failed"]


# -- cancel by the lease holder -------------------------------------------------------------------


@FENCE_PARTS
async def test_holder_cancel_replay(store: Store, which: str) -> None:
    lease = await create_and_claim(store)
    first = await cancel(store, lease.eid, source="lease_holder", fence=lease.fence)
    assert first == [1, b"OK", b"cancelled", b"active"]
    again = await cancel(store, lease.eid, source="lease_holder", fence=lease.fence)
    assert again == [*REPLAYED, b"cancelled"]
    other = await cancel(store, lease.eid, source="lease_holder", fence=tampered(lease, which))
    assert other[:3] == [0, b"execution_not_active", b"cancelled"]


async def test_holder_cancel_after_an_operator_cancel_is_not_a_replay(store: Store) -> None:
    lease = await create_and_claim(store)
    await cancel(store, lease.eid)
    again = await cancel(store, lease.eid, source="lease_holder", fence=lease.fence)
    assert again[:3] == [0, b"execution_not_active", b"cancelled"]


# -- delay / waiting children ---------------------------------------------------------------------


@FENCE_PARTS
async def test_delay_replay(store: Store, which: str) -> None:
    lease = await create_and_claim(store)
    until = await now_ms(store) + 60_000
    assert await delay(store, lease.eid, lease.fence, until) == [1, b"OK", str(until).encode()]
    again = await delay(store, lease.eid, lease.fence, until)
    assert again == [*REPLAYED, str(until).encode()]
    other = await delay(store, lease.eid, tampered(lease, which), until)
    assert other[:2] == [0, b"execution_not_active"]


async def test_delay_replay_ends_with_the_promotion(store: Store) -> None:
    lease = await create_and_claim(store)
    until = await now_ms(store)
    await delay(store, lease.eid, lease.fence, until)
    await promote(store, lease.eid, await now_ms(store))
    assert (await core_of(store, lease.eid))["public_state"] == "waiting"
    again = await delay(store, lease.eid, lease.fence, until)
    assert again[:2] == [0, b"execution_not_active"]


@FENCE_PARTS
async def test_waiting_children_replay(store: Store, which: str) -> None:
    lease = await create_and_claim(store)
    assert await move_to_children(store, lease.eid, lease.fence) == [1, b"OK"]
    assert await move_to_children(store, lease.eid, lease.fence) == REPLAYED
    other = await move_to_children(store, lease.eid, tampered(lease, which))
    assert other[:2] == [0, b"execution_not_active"]


# -- retry_after_ms -------------------------------------------------------------------------------


async def test_retry_after_ms_is_a_fixed_backoff(store: Store) -> None:
    lease = await create_and_claim(store)  # no stored policy: 3 retries
    before = await now_ms(store)
    reply = await fail(store, lease.eid, lease.fence, retry_after_ms=5000)
    assert reply[:3] == [1, b"OK", b"retry_scheduled"]
    after = await now_ms(store)
    assert before + 5000 <= int(reply[3]) <= after + 5000


async def test_retry_after_ms_budget_without_a_policy_is_three(store: Store) -> None:
    lease = await create_and_claim(store)
    for _ in range(3):
        reply = await fail(store, lease.eid, lease.fence, retry_after_ms=0)
        assert reply[2] == b"retry_scheduled", reply
        await promote(store, lease.eid, await now_ms(store))
        lease = await claim(store, lease.eid)
    reply = await fail(store, lease.eid, lease.fence, retry_after_ms=0)
    assert reply == [1, b"OK", b"terminal_failed"]


async def test_retry_after_ms_keeps_the_stored_budget(store: Store) -> None:
    policy = retry_policy(max_retries=1, backoff={"type": "fixed", "delay_ms": 60_000})
    lease = await create_and_claim(store, policy_json=policy)
    reply = await fail(store, lease.eid, lease.fence, retry_after_ms=0)
    assert reply[2] == b"retry_scheduled"
    assert int(reply[3]) <= await now_ms(store), "retry_after_ms replaces the stored backoff"
    await promote(store, lease.eid, await now_ms(store))
    lease = await claim(store, lease.eid)
    assert await fail(store, lease.eid, lease.fence, retry_after_ms=0) == [
        1,
        b"OK",
        b"terminal_failed",
    ]


async def test_retry_after_ms_rejections(store: Store) -> None:
    lease = await create_and_claim(store)
    before = await snapshot(store, lease.eid)
    both = await fail(store, lease.eid, lease.fence, retry_policy_json="{}", retry_after_ms=10)
    assert both[:2] == [0, b"invalid_input"]
    bad = await fail(store, lease.eid, lease.fence, retry_after_ms="soon")
    assert bad[:2] == [0, b"invalid_input"]
    assert await snapshot(store, lease.eid) == before


# -- timeout_in_ms --------------------------------------------------------------------------------


async def test_suspend_timeout_in_ms_is_composed_with_time(store: Store) -> None:
    lease = await leased(store)
    before = await now_ms(store)
    reply = await suspend(store, lease, timeout_in_ms=60_000, behavior="auto_resume")
    assert reply[:2] == [1, b"OK"]
    after = await now_ms(store)
    p = PartitionKeys(lease.eid.tag)
    score = int(await store.call("ZSCORE", p.suspension_timeout, str(lease.eid)))
    assert before + 60_000 <= score <= after + 60_000


async def test_suspend_timeout_in_ms_rejections(store: Store) -> None:
    lease = await leased(store)
    before = await snapshot(store, lease.eid)
    at = await now_ms(store) + 1000
    both = await suspend(store, lease, timeout_at=at, timeout_in_ms=1000)
    assert both[:2] == [0, b"invalid_input"]
    bad = await suspend(store, lease, timeout_in_ms="-5")
    assert bad[:2] == [0, b"invalid_input"]
    assert await snapshot(store, lease.eid) == before
