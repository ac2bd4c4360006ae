"""ff_create_budget, ff_report_usage_and_check, ff_reset_budget and ff_reconcile_budget called
directly, both topologies (docs/budgets.md)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence

import pytest

from flowfabric.server.valkey.errors import FlowFabricError
from flowfabric.server.valkey.functions import budget
from flowfabric.server.valkey.functions.budget import BudgetFunctions, budget_ctx
from flowfabric.server.valkey.keys import BudgetKeys
from flowfabric.server.valkey.store import Store
from tests.api.util import keyspace_dump
from tests.lua.util import fcall, hash_of, now_ms


def new_budget(partition: int = 3) -> BudgetKeys:
    return BudgetKeys.of(partition, str(uuid.uuid4()))


async def create(
    store: Store,
    k: BudgetKeys,
    dims: Sequence[str] = ("total_tokens",),
    hard: Sequence[object] = (100,),
    soft: Sequence[object] = (80,),
    *,
    interval: object = 0,
    now: object = "",
    n: object = None,
    mode: str = "strict",
    reserve: Sequence[object] | None = None,
    on_hard_limit: str = "fail",
) -> list:
    reserve = [0] * len(dims) if reserve is None else reserve
    values = {
        "budget_id": k.budget_id, "scope_type": "flow", "scope_id": "f1",
        "enforcement_mode": mode, "on_hard_limit": on_hard_limit, "on_soft_limit": "warn",
        "reset_interval_ms": interval, "now": now, "dim_count": len(dims) if n is None else n,
        "dimensions_and_limits": [*dims, *hard, *soft, *reserve],
    }  # fmt: skip
    return await fcall(store, budget.CREATE, budget_ctx(k), values)


async def report(
    store: Store,
    k: BudgetKeys,
    dims: Sequence[str],
    deltas: Sequence[object],
    dedup: str = "",
    n: object = None,
    eid: str = "",
) -> list:
    values = {
        "budget_id": k.budget_id, "now": "", "dedup_id": dedup, "execution_id": eid,
        "dim_count": len(dims) if n is None else n, "dimensions_and_deltas": [*dims, *deltas],
    }  # fmt: skip
    return await fcall(store, budget.REPORT, budget_ctx(k, dedup), values)


async def reset(store: Store, k: BudgetKeys, only_if_due: str = "") -> list:
    values = {"budget_id": k.budget_id, "now": "", "only_if_due": only_if_due}
    return await fcall(store, budget.RESET, budget_ctx(k), values)


def status(reply: list) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in reply]


# -- create -------------------------------------------------------------------------------------


async def test_create_writes_limits_and_the_policy_index_but_no_usage(store: Store) -> None:
    k = new_budget()
    assert status(await create(store, k)) == ["1", "OK", "created"]
    assert await hash_of(store, k.limits) == {"hard:total_tokens": "100", "soft:total_tokens": "80"}
    assert await store.call("EXISTS", k.usage) == 0
    assert await store.call("SISMEMBER", k.policies, k.budget_id) == 1
    assert await store.call("ZSCORE", k.resets, k.budget_id) is None
    d = await hash_of(store, k.definition)
    assert d["breach_count"] == "0" and d["soft_breach_count"] == "0"
    assert d["created_at"] == d["last_updated_at"]
    assert d["enforcement_mode"] == "strict" and d["scope_type"] == "flow"
    assert "next_reset_at" not in d


async def test_create_with_interval_schedules_the_first_reset(store: Store) -> None:
    k = new_budget()
    await create(store, k, interval=3_600_000, now=1_000_000)
    d = await hash_of(store, k.definition)
    assert d["next_reset_at"] == "4600000"
    assert float(await store.call("ZSCORE", k.resets, k.budget_id)) == 4_600_000


async def test_create_again_is_already_satisfied_and_changes_nothing(store: Store) -> None:
    k = new_budget()
    await create(store, k)
    before = await keyspace_dump(store)
    assert status(await create(store, k, hard=(5,), soft=(1,), interval=1000)) == [
        "1", "ALREADY_SATISFIED", "exists",
    ]  # fmt: skip
    assert await keyspace_dump(store) == before


async def test_create_again_heals_a_lost_policy_index_entry(store: Store) -> None:
    k = new_budget()
    await create(store, k)
    await store.call("SREM", k.policies, k.budget_id)
    await create(store, k)
    assert await store.call("SISMEMBER", k.policies, k.budget_id) == 1


@pytest.mark.parametrize(
    ("dims", "hard", "soft", "n", "detail"),
    [
        (
            [f"d{i}" for i in range(65)], [1] * 65, [0] * 65, None,
            "too_many_dimensions: limit=64, got=65",
        ),
        (["a", "b"], [1], [0, 0], 2, "dimension_limit_array_mismatch"),
        (["a"], [1], [0], "x", "dim_count must be a number, got: x"),
        (["a", "a"], [1, 1], [0, 0], None, "duplicate_dimension: a"),
        (["breached_at"], [1], [0], None, "reserved dimension name"),
        ([""], [1], [0], None, "dimension names must be"),
        (["a"], [-1], [0], None, "amounts must be"),
        (["a"], ["ten"], [0], None, "amounts must be"),
    ],
)  # fmt: skip
async def test_create_refuses_bad_dimensions_and_writes_nothing(
    store: Store, dims: list[str], hard: list[object], soft: list[object], n: object, detail: str
) -> None:
    k = new_budget()
    before = await keyspace_dump(store)
    reply = status(await create(store, k, dims, hard, soft, n=n))
    assert reply[:2] == ["0", "invalid_input"] and detail in reply[2], reply
    assert await keyspace_dump(store) == before


async def test_create_accepts_64_dimensions(store: Store) -> None:
    k = new_budget()
    dims = [f"custom:d{i}" for i in range(64)]
    assert status(await create(store, k, dims, [10] * 64, [0] * 64))[1] == "OK"
    assert len(await hash_of(store, k.limits)) == 128


async def test_keys_of_another_budget_are_a_malformed_call(store: Store) -> None:
    k, other = new_budget(), new_budget()
    values = {
        "budget_id": k.budget_id, "scope_type": "", "scope_id": "", "enforcement_mode": "",
        "on_hard_limit": "", "on_soft_limit": "", "reset_interval_ms": 0, "now": "",
        "dim_count": 0, "dimensions_and_limits": [],
    }  # fmt: skip
    with pytest.raises(FlowFabricError):
        await fcall(store, budget.CREATE, budget_ctx(other), values)
    assert await store.call("EXISTS", k.definition, other.definition) == 0


# -- report -------------------------------------------------------------------------------------


async def test_report_ok_soft_then_hard_breach(store: Store) -> None:
    k = new_budget()
    await create(store, k)
    assert status(await report(store, k, ["total_tokens"], [60])) == ["1", "OK", "ok"]
    assert status(await report(store, k, ["total_tokens"], [25])) == [
        "1", "OK", "soft_breach", "total_tokens", "85", "80",
    ]  # fmt: skip
    assert status(await report(store, k, ["total_tokens"], [50])) == [
        "1", "OK", "hard_breach", "total_tokens", "85", "100", "fail",
    ]  # fmt: skip
    assert await hash_of(store, k.usage) == {"total_tokens": "85"}
    d = await hash_of(store, k.definition)
    assert d["breach_count"] == "1" and d["soft_breach_count"] == "1"
    assert d["last_breach_dim"] == "total_tokens" and d["last_breach_at"]


async def test_a_hard_breach_on_one_dimension_applies_none(store: Store) -> None:
    k = new_budget()
    await create(store, k, ["tokens", "cost"], [1000, 50], [0, 0])
    reply = status(await report(store, k, ["tokens", "cost"], [100, 60]))
    assert reply == ["1", "OK", "hard_breach", "cost", "0", "50", "fail"]
    assert await hash_of(store, k.usage) == {}


async def test_dedup_id_is_wrapped_in_the_partition_tag_and_applies_once(store: Store) -> None:
    k = new_budget(partition=0)
    await create(store, k)
    assert status(await report(store, k, ["total_tokens"], [10], "retry-42"))[2] == "ok"
    assert status(await report(store, k, ["total_tokens"], [10], "retry-42")) == [
        "1", "ALREADY_SATISFIED", "already_applied",
    ]  # fmt: skip
    assert await store.call("GET", "ff:usagededup:{b:0}:retry-42") == b"1"
    assert 0 < int(await store.call("PTTL", "ff:usagededup:{b:0}:retry-42")) <= 86_400_000
    assert await store.call("EXISTS", "retry-42") == 0
    assert await hash_of(store, k.usage) == {"total_tokens": "10"}


async def test_a_hard_breach_sets_no_dedup_marker(store: Store) -> None:
    k = new_budget()
    await create(store, k)
    assert status(await report(store, k, ["total_tokens"], [101], "r1"))[2] == "hard_breach"
    assert await store.call("EXISTS", k.dedup("r1")) == 0
    assert status(await report(store, k, ["total_tokens"], [50], "r1"))[2] == "ok"


async def test_usage_may_reach_the_hard_limit_but_never_pass_it(store: Store) -> None:
    k = new_budget()
    await create(store, k, hard=(100,), soft=(0,))
    assert status(await report(store, k, ["total_tokens"], [100]))[2] == "ok"
    assert status(await report(store, k, ["total_tokens"], [1])) == [
        "1", "OK", "hard_breach", "total_tokens", "100", "100", "fail",
    ]  # fmt: skip


async def test_a_dimension_without_limits_is_counted(store: Store) -> None:
    k = new_budget()
    await create(store, k)
    assert status(await report(store, k, ["custom:x"], [5]))[2] == "ok"
    assert await hash_of(store, k.usage) == {"custom:x": "5"}


async def test_zero_dimensions_is_a_valid_report(store: Store) -> None:
    k = new_budget()
    await create(store, k)
    assert status(await report(store, k, [], []))[2] == "ok"


@pytest.mark.parametrize(
    ("dims", "deltas", "n", "detail"),
    [
        ([f"d{i}" for i in range(65)], [1] * 65, None, "too_many_dimensions"),
        (["a", "b"], [1], 2, "dimension_delta_array_mismatch"),
        (["a"], [1], "abc", "dim_count must be a number"),
        (["a", "a"], [1, 1], None, "duplicate_dimension: a"),
        (["a"], [-5], None, "amounts must be"),
    ],
)
async def test_report_refuses_bad_input_and_writes_nothing(
    store: Store, dims: list[str], deltas: list[object], n: object, detail: str
) -> None:
    k = new_budget()
    await create(store, k)
    before = await keyspace_dump(store)
    reply = status(await report(store, k, dims, deltas, "d1", n=n))
    assert reply[:2] == ["0", "invalid_input"] and detail in reply[2], reply
    assert await keyspace_dump(store) == before


async def test_report_on_an_unknown_budget_creates_nothing(store: Store) -> None:
    k = new_budget()
    before = await keyspace_dump(store)
    assert status(await report(store, k, ["a"], [1], "d1"))[:2] == ["0", "budget_not_found"]
    assert await keyspace_dump(store) == before


# -- reset --------------------------------------------------------------------------------------


async def test_reset_zeroes_usage_and_reschedules(store: Store) -> None:
    k = new_budget()
    await create(store, k, hard=(1000,), soft=(0,), interval=3_600_000)
    await report(store, k, ["total_tokens"], [500])
    await report(store, k, ["total_tokens"], [600])  # a hard breach, to clear
    await store.call("HSET", k.usage, "breached_at", "1")
    before = await now_ms(store)
    reply = status(await reset(store, k))
    assert reply[:3] == ["1", "OK", "reset"]
    assert await hash_of(store, k.usage) == {"total_tokens": "0"}
    d = await hash_of(store, k.definition)
    assert d["reset_count"] == "1" and d["last_breach_at"] == "" and d["last_breach_dim"] == ""
    assert d["breach_count"] == "1"
    score = float(await store.call("ZSCORE", k.resets, k.budget_id))
    assert before + 3_600_000 <= score <= before + 3_600_000 + 5_000
    assert int(reply[3]) == score == int(d["next_reset_at"])


async def test_reset_without_interval_is_not_recurring(store: Store) -> None:
    k = new_budget()
    await create(store, k)
    await report(store, k, ["total_tokens"], [30])
    assert status(await reset(store, k)) == ["1", "OK", "reset", "0"]
    assert await store.call("ZSCORE", k.resets, k.budget_id) is None
    assert await hash_of(store, k.usage) == {"total_tokens": "0"}


async def test_reset_twice_bumps_the_count_again(store: Store) -> None:
    k = new_budget()
    await create(store, k)
    await reset(store, k)
    await reset(store, k)
    assert (await hash_of(store, k.definition))["reset_count"] == "2"


async def test_reset_of_an_unknown_budget_creates_nothing_and_unschedules(store: Store) -> None:
    k = new_budget()
    await store.call("ZADD", k.resets, 1, k.budget_id)
    reply = status(await reset(store, k))
    assert reply[:2] == ["0", "budget_not_found"]
    assert await store.call("EXISTS", k.resets, k.definition, k.usage) == 0


async def test_scanner_reset_only_when_due(store: Store) -> None:
    k = new_budget()
    await create(store, k, interval=3_600_000)
    reply = status(await reset(store, k, only_if_due="1"))
    assert reply[:3] == ["1", "ALREADY_SATISFIED", "not_due"]
    assert "reset_count" in await hash_of(store, k.definition)
    assert (await hash_of(store, k.definition))["reset_count"] == "0"


# -- reconcile ----------------------------------------------------------------------------------


async def test_reconcile_marks_and_clears_breaches_of_non_resetting_budgets(store: Store) -> None:
    fn = BudgetFunctions(store)
    k = new_budget()
    await create(store, k, hard=(10,), soft=(0,))
    assert (await fn.reconcile_budget(k)).outcome == "unchanged"
    await store.call("HSET", k.usage, "total_tokens", "11")  # drift past the limit
    assert (await fn.reconcile_budget(k)).outcome == "marked"
    assert "breached_at" in await hash_of(store, k.usage)
    assert (await fn.reconcile_budget(k)).outcome == "unchanged"
    await store.call("HSET", k.usage, "total_tokens", "10")  # at the limit is not past it
    assert (await fn.reconcile_budget(k)).outcome == "cleared"
    assert "breached_at" not in await hash_of(store, k.usage)


async def test_reconcile_skips_resetting_budgets_and_drops_gone_ones(store: Store) -> None:
    fn = BudgetFunctions(store)
    k = new_budget()
    await create(store, k, interval=60_000)
    assert (await fn.reconcile_budget(k)).outcome == "skipped"
    gone = new_budget()
    await store.call("SADD", gone.policies, gone.budget_id)
    assert (await fn.reconcile_budget(gone)).outcome == "removed"
    assert await store.call("SISMEMBER", gone.policies, gone.budget_id) == 0


async def test_reconcile_keeps_a_budget_whose_definition_is_unreadable(store: Store) -> None:
    fn = BudgetFunctions(store)
    k = new_budget()
    await store.call("SADD", k.policies, k.budget_id)
    await store.call("SET", k.definition, "not a hash")
    with pytest.raises(FlowFabricError):
        await fn.reconcile_budget(k)
    assert await store.call("SISMEMBER", k.policies, k.budget_id) == 1


# -- reservations (docs/budgets.md#reservations) ------------------------------------------------


async def reserve(store: Store, k: BudgetKeys, eid: str, token: str = "") -> list[str]:
    values = {"budget_id": k.budget_id, "execution_id": eid, "now": "", "claim_token": token}
    return status(await fcall(store, budget.RESERVE, budget_ctx(k), values))


async def release(
    store: Store, k: BudgetKeys, eid: str, token: str = "", match: str = ""
) -> list[str]:
    values = {"budget_id": k.budget_id, "execution_id": eid, "claim_token": token, "match": match}
    return status(await fcall(store, budget.RELEASE, budget_ctx(k), values))


async def test_create_stores_a_reserve_estimate_and_refuses_one_past_the_hard_limit(
    store: Store,
) -> None:
    k = new_budget()
    assert status(await create(store, k, reserve=[10]))[1] == "OK"
    assert (await hash_of(store, k.limits))["reserve:total_tokens"] == "10"
    for bad in ([101], [-1]):
        other, before = new_budget(), await keyspace_dump(store)
        reply = status(await create(store, other, reserve=bad))
        assert reply[:2] == ["0", "invalid_input"], reply
        assert await keyspace_dump(store) == before
    other, before = new_budget(), await keyspace_dump(store)
    reply = status(await create(store, other, hard=[0], soft=[0], reserve=[5]))
    assert reply[:2] == ["0", "invalid_input"] and "needs a hard limit" in reply[2]
    assert await keyspace_dump(store) == before


async def test_reservations_admit_up_to_the_hard_limit_and_are_idempotent(store: Store) -> None:
    k = new_budget()
    await create(store, k, hard=[30], soft=[0], reserve=[10])
    for eid in ("e1", "e2", "e3"):
        assert await reserve(store, k, eid) == ["1", "OK", "admitted"]
    assert await reserve(store, k, "e1") == ["1", "ALREADY_SATISFIED", "already_reserved"]
    assert await hash_of(store, k.reserved) == {"total_tokens": "30"}
    before = await keyspace_dump(store)
    reply = await reserve(store, k, "e4")
    assert reply[2] == "exhausted"
    assert reply[3] == f"budget {k.budget_id}: total_tokens 0/30, 30 reserved, needs 10"
    assert await keyspace_dump(store) == before, "a refusal writes nothing"
    assert int(await store.call("ZCARD", k.inflight)) == 3


async def test_a_report_settles_its_own_reservation_and_counts_the_others(store: Store) -> None:
    k = new_budget()
    await create(store, k, hard=[30], soft=[0], reserve=[10])
    for eid in ("e1", "e2", "e3"):
        await reserve(store, k, eid)
    # e1 reports 4 of its 10: the hold shrinks to 6, reserved to 26, usage 4
    assert status(await report(store, k, ["total_tokens"], [4], eid="e1"))[2] == "ok"
    assert await hash_of(store, k.reserved) == {"total_tokens": "26"}
    assert json.loads((await hash_of(store, k.holds))["e1"])["h"] == {"total_tokens": 6}
    # an outsider must fit beside every reservation: 4 + 26 = 30, no room
    assert status(await report(store, k, ["total_tokens"], [1]))[2] == "hard_breach"
    # e1 may go past its estimate as far as the others' reservations allow: 4 + 6 + 20 = 30
    assert status(await report(store, k, ["total_tokens"], [6], eid="e1"))[2] == "ok"
    assert status(await report(store, k, ["total_tokens"], [1], eid="e1"))[2] == "hard_breach"
    assert await hash_of(store, k.usage) == {"total_tokens": "10"}
    assert await hash_of(store, k.reserved) == {"total_tokens": "20"}


async def test_a_deduplicated_report_settles_once(store: Store) -> None:
    k = new_budget()
    await create(store, k, hard=[30], soft=[0], reserve=[10])
    await reserve(store, k, "e1")
    for _ in range(2):
        await report(store, k, ["total_tokens"], [3], "b-e1-1", eid="e1")
    assert await hash_of(store, k.usage) == {"total_tokens": "3"}
    assert await hash_of(store, k.reserved) == {"total_tokens": "7"}


async def test_release_returns_what_is_still_held_once(store: Store) -> None:
    k = new_budget()
    await create(store, k, hard=[20], soft=[0], reserve=[10])
    await reserve(store, k, "e1")
    await reserve(store, k, "e2")
    assert (await reserve(store, k, "e3"))[2] == "exhausted"
    await report(store, k, ["total_tokens"], [4], eid="e1")
    assert await release(store, k, "e1") == ["1", "OK", "released", "6"]
    assert await release(store, k, "e1") == ["1", "ALREADY_SATISFIED", "not_held"]
    assert await hash_of(store, k.reserved) == {"total_tokens": "10"}
    # usage 4 + reserved 10 + 10 > 20: still no room for a third
    assert (await reserve(store, k, "e3"))[2] == "exhausted"
    await release(store, k, "e2")
    assert (await reserve(store, k, "e3"))[2] == "admitted"


async def test_a_budget_without_estimates_tracks_in_flight_work_only(store: Store) -> None:
    k = new_budget()
    await create(store, k)
    assert (await reserve(store, k, "e1"))[2] == "admitted"
    assert await store.call("EXISTS", k.reserved) == 0
    assert float(await store.call("ZSCORE", k.inflight, "e1")) > 0
    await report(store, k, ["total_tokens"], [100])
    assert (await reserve(store, k, "e2"))[3] == f"budget {k.budget_id}: total_tokens 100/100"


async def test_advisory_and_missing_budgets_are_not_enforced(store: Store) -> None:
    k = new_budget()
    await create(store, k, mode="advisory")
    before = await keyspace_dump(store)
    assert (await reserve(store, k, "e1"))[2] == "not_enforced"
    assert (await reserve(store, new_budget(), "e1"))[2] == "not_enforced"
    assert await keyspace_dump(store) == before


async def test_a_hard_breach_locks_a_blocking_budget_until_reset(store: Store) -> None:
    k = new_budget()
    await create(store, k, on_hard_limit="cancel_running")
    reply = await report(store, k, ["total_tokens"], [101])
    assert status(reply)[2:] == ["hard_breach", "total_tokens", "0", "100", "cancel_running"]
    got = await reserve(store, k, "e1")
    assert got[2] == "exhausted" and "hard limit breached (cancel_running)" in got[3]
    await reset(store, k)
    assert (await reserve(store, k, "e1"))[2] == "admitted"


async def test_a_corrupt_usage_fails_the_reservation(store: Store) -> None:
    k = new_budget()
    await create(store, k)
    await store.call("HSET", k.usage, "total_tokens", "lots")
    assert (await reserve(store, k, "e1"))[:2] == ["0", "corrupt_record"]
    assert await store.call("EXISTS", k.inflight) == 0


async def test_one_admission_per_lease_and_releases_name_theirs(store: Store) -> None:
    k = new_budget()
    await create(store, k, hard=[20], soft=[0], reserve=[10])
    assert (await reserve(store, k, "e1", "1"))[2] == "admitted"
    assert await reserve(store, k, "e1", "1") == ["1", "ALREADY_SATISFIED", "already_reserved"]
    # lease 1 ended but its release has not arrived: lease 2 waits for it
    assert (await reserve(store, k, "e1", "2"))[2] == "already_reserved"
    assert await release(store, k, "e1", "2") == ["1", "ALREADY_SATISFIED", "not_held"]
    assert await hash_of(store, k.reserved) == {"total_tokens": "10"}, "lease 1's hold stays"
    assert await release(store, k, "e1", "1") == ["1", "OK", "released", "10"]
    assert (await reserve(store, k, "e1", "2"))[2] == "admitted"


async def test_a_lease_end_releases_its_own_or_an_earlier_admission_only(store: Store) -> None:
    k = new_budget()
    await create(store, k, hard=[20], soft=[0], reserve=[10])
    await reserve(store, k, "e1", "3")  # made for lease 3
    assert (await release(store, k, "e1", "2", "up_to"))[2] == "not_held", "lease 2 ended"
    assert await release(store, k, "e1", "4", "up_to") == ["1", "OK", "released", "10"]
    await reserve(store, k, "e2", "1")
    assert await release(store, k, "e2") == ["1", "OK", "released", "10"], "the reconciler's"
