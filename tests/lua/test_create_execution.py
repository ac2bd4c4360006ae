"""ff_create_execution and ff_set_execution_tags called directly (docs/lifecycle.md#create,
docs/lifecycle.md#tags)."""

from __future__ import annotations

import json

import pytest

from flowfabric.server.valkey.functions import execution
from flowfabric.server.valkey.ids import ExecutionId
from flowfabric.server.valkey.keys import ExecKeys, PartitionKeys
from flowfabric.server.valkey.store import Store
from tests.lua.util import LANE, create, ctx_of, fcall, new_eid, now_ms


async def test_created_waiting_with_priority_score(store: Store) -> None:
    eid = new_eid()
    reply = await create(store, eid, priority="5", input_payload=bytes(range(256)))
    assert reply == [1, b"OK", str(eid).encode(), b"waiting"]
    k, p = ExecKeys(eid), PartitionKeys(eid.tag)
    core = await store.call("HGETALL", k.core)
    fields = {a.decode(): b.decode() for a, b in core.items()}
    assert fields["current_lease_epoch"] == "0"
    assert fields["total_attempt_count"] == "0"
    assert fields["public_state"] == "waiting"
    score = await store.call("ZSCORE", p.lane(LANE, "eligible"), str(eid))
    assert int(float(score)) == int(fields["created_at"]) - 5 * 10**12
    assert await store.call("SISMEMBER", p.all_executions, str(eid)) == 1
    assert await store.call("GET", k.payload) == bytes(range(256))
    assert await store.call("SMEMBERS", p.lanes) == {LANE.encode()}


async def test_future_delay_is_delayed_past_delay_is_waiting(store: Store) -> None:
    now = await now_ms(store)
    later, earlier = new_eid(), new_eid()
    assert (await create(store, later, delay_until=str(now + 60_000)))[3] == b"delayed"
    assert (await create(store, earlier, delay_until=str(now - 1_000)))[3] == b"waiting"
    p = PartitionKeys(later.tag)
    assert await store.call("ZSCORE", p.lane(LANE, "delayed"), str(later)) is not None
    assert await store.call("ZSCORE", p.lane(LANE, "eligible"), str(later)) is None
    assert await store.call("ZSCORE", p.lane(LANE, "delayed"), str(earlier)) is None
    assert await store.call("ZSCORE", p.lane(LANE, "eligible"), str(earlier)) is not None


async def test_idempotency_key_dedups_with_policy_window(store: Store) -> None:
    first, second = new_eid(), new_eid()
    policy = json.dumps({"dedup_window_ms": 5000})
    assert (await create(store, first, idem="abc", policy_json=policy))[1] == b"OK"
    reply = await create(store, second, idem="abc", policy_json=policy)
    assert reply == [1, b"DUPLICATE", str(first).encode()]
    assert await store.call("EXISTS", ExecKeys(second).core) == 0
    ttl = await store.call("PTTL", ExecKeys(first).idempotency("ns", "abc"))
    assert 0 < ttl <= 5000


async def test_same_id_twice_is_duplicate(store: Store) -> None:
    eid = new_eid()
    await create(store, eid)
    assert await create(store, eid) == [1, b"DUPLICATE", str(eid).encode()]


@pytest.mark.parametrize(
    ("caps", "expected"),
    [
        (["gpu", "cuda"], [1, b"OK"]),
        (["gpu", ""], [0, b"invalid_capabilities", b"required:empty_token"]),
        (["a,b"], [0, b"invalid_capabilities", b"required:comma_in_token"]),
        (["a b"], [0, b"invalid_capabilities", b"required:control_or_whitespace"]),
        ([1], [0, b"invalid_capabilities", b"required:non_string_token"]),
        ("gpu", [0, b"invalid_capabilities", b"required:not_array"]),
    ],
)
async def test_required_capabilities(store: Store, caps: object, expected: list) -> None:
    eid = new_eid()
    policy = json.dumps({"routing_requirements": {"required_capabilities": caps}})
    reply = await create(store, eid, policy_json=policy)
    assert reply[: len(expected)] == expected
    stored = await store.call("HGET", ExecKeys(eid).core, "required_capabilities")
    if expected[0] == 1:
        assert stored == b"cuda,gpu"
    else:
        assert stored is None, "a rejected create writes nothing"


@pytest.mark.parametrize(
    ("policy", "detail"),
    [
        ("not json", b"malformed"),
        ('{"routing_requirements": 3}', b"routing_requirements must be a JSON object, got: 3"),
        ("[1, 2]", b"policy must be a JSON object, got: a JSON array"),
        (
            '{"retry_policy": {"max_retries": "two"}}',
            b"retry_policy.max_retries must be an integer 0..1000, got: two",
        ),
        (
            '{"retry_policy": {"max_retries": -1}}',
            b"retry_policy.max_retries must be an integer 0..1000, got: -1",
        ),
        (
            '{"retry_policy": {"max_retries": 1.5}}',
            b"retry_policy.max_retries must be an integer 0..1000, got: 1.5",
        ),
        ('{"max_retries": 2}', b"max_retries is not a known policy field"),
        (
            '{"retry_policy": {"backoff": {"type": "fixed", "delay": 5}}}',
            b"retry_policy.backoff.delay is not a known policy field",
        ),
        (
            '{"timeout_policy": {"attempt_timeout_ms": 1e20}}',
            b"timeout_policy.attempt_timeout_ms must be an integer 0..31536000000, got: "
            b"100000000000000000000",
        ),
        (
            '{"suspension_policy": {"timeout_behavior": "explode"}}',
            b"suspension_policy.timeout_behavior must be one of fail, cancel, expire, "
            b"auto_resume, escalate, got: explode",
        ),
        (
            '{"budget_ids": ["a,b"]}',
            b"budget_ids[0] must be a string of at most 256 bytes (non-empty, no commas)",
        ),
        (
            '{"dedup_window_ms": true}',
            b"dedup_window_ms must be an integer 0..2592000000, got: true",
        ),
    ],
)
async def test_bad_policy_json_writes_nothing(store: Store, policy: str, detail: bytes) -> None:
    eid = new_eid()
    assert await create(store, eid, policy_json=policy) == [0, b"invalid_policy_json", detail]
    assert await store.call("EXISTS", ExecKeys(eid).core) == 0


async def test_priority_is_clamped(store: Store) -> None:
    hi, lo = new_eid(), new_eid()
    await create(store, hi, priority="20000")
    await create(store, lo, priority="-3")
    assert await store.call("HGET", ExecKeys(hi).core, "priority") == b"9000"
    assert await store.call("HGET", ExecKeys(lo).core, "priority") == b"0"


async def test_non_numeric_priority_is_invalid_input(store: Store) -> None:
    eid = new_eid()
    reply = await create(store, eid, priority="high")
    assert reply == [0, b"invalid_input", b"priority must be a number, got: high"]
    assert await store.call("EXISTS", ExecKeys(eid).core) == 0


async def test_create_tags_follow_the_key_rule(store: Store) -> None:
    eid = new_eid()
    bad = await create(store, eid, tags_json=json.dumps({"NoDot": "x"}))
    assert bad == [0, b"invalid_tag_key", b"NoDot"]
    assert await store.call("EXISTS", ExecKeys(eid).core) == 0
    assert (await create(store, eid, tags_json=json.dumps({"app.owner": "me"})))[1] == b"OK"
    assert await store.call("HGET", ExecKeys(eid).tags, "app.owner") == b"me"


async def test_deadline_from_policy(store: Store) -> None:
    eid = new_eid()
    before = await now_ms(store)
    policy = json.dumps({"timeout_policy": {"execution_deadline_ms": 10_000}})
    await create(store, eid, policy_json=policy)
    score = await store.call("ZSCORE", PartitionKeys(eid.tag).execution_deadline, str(eid))
    assert before + 10_000 <= int(float(score)) <= before + 11_000


async def set_tags(store: Store, eid: ExecutionId, pairs: list[str]) -> list:
    return await fcall(store, execution.SET_TAGS, ctx_of(eid), {"pairs": pairs})


@pytest.mark.parametrize("key", ["cairn.task_id", "app.sub.field"])
async def test_set_tags_accepts(store: Store, key: str) -> None:
    eid = new_eid()
    await create(store, eid)
    k = ExecKeys(eid)
    assert await set_tags(store, eid, [key, "v"]) == [
        1,
        b"OK",
        b"1",
    ]
    assert await store.call("HGET", k.tags, key) == b"v"


@pytest.mark.parametrize("key", ["cairn.", "cairn..x", "Cairn.x", "no_dot", "1a.b"])
async def test_set_tags_rejects_and_writes_nothing(store: Store, key: str) -> None:
    eid = new_eid()
    await create(store, eid)
    k = ExecKeys(eid)
    reply = await set_tags(store, eid, ["ok.key", "1", key, "v"])
    assert reply == [0, b"invalid_tag_key", key.encode()]
    assert await store.call("EXISTS", k.tags) == 0


async def test_set_tags_missing_execution_and_odd_args(store: Store) -> None:
    eid = new_eid()
    assert await set_tags(store, eid, ["a.b", "1"]) == [
        0,
        b"execution_not_found",
    ]
    reply = await set_tags(store, eid, ["a.b"])
    assert reply[:2] == [0, b"invalid_input"]
