"""Flows through the SDK: the builder's local checks, then submit, read, wait and cancel against
the real server with a real `Worker` running the members (both topologies)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from flowfabric import (
    Client,
    ExecutionState,
    FailedPrecondition,
    FlowBuilder,
    FlowState,
    InvalidArgument,
    InvalidFlow,
    NonRetryableError,
    NotFound,
    SyncClient,
    TaskContext,
    Worker,
)
from tests.conftest import API_TOKEN, Api
from tests.sdk.conftest import eventually, running

LANE = "sdk-flows"
S = ExecutionState


def make_worker(
    api: Api, fail: set[str] | None = None, gate: asyncio.Event | None = None
) -> Worker:
    """Runs kind `step`: returns {"key": ..., "input": payload}; fails members whose key is in
    `fail` (non-retryable); `slow` waits for `gate`."""
    worker = Worker(api.address, token=API_TOKEN, lanes=[LANE], concurrency=8, claim_wait_ms=200)

    @worker.handler("step")
    async def step(ctx: TaskContext) -> dict[str, Any]:
        key = ctx.tags.get("flowfabric.member", "")
        if key in (fail or set()):
            raise NonRetryableError(f"{key} broke")
        return {"key": key, "input": ctx.payload.decode()}

    @worker.handler("slow")
    async def slow(ctx: TaskContext) -> None:
        assert gate is not None
        await gate.wait()

    return worker


# -- the builder, locally ---------------------------------------------------------------------


def test_builder_checks_handles_joins_and_kinds() -> None:
    f: FlowBuilder[None] = FlowBuilder()
    other: FlowBuilder[None] = FlowBuilder()
    a = f.add("fetch")
    stranger = other.add("fetch")
    assert a.key == "fetch" and f.add("fetch").key == "fetch-2"  # keys default to the kind
    cases: list[tuple[dict[str, Any], str]] = [
        ({"after": [stranger]}, "invalid_dependency"),  # another flow's handle
        ({"after": ["fetch"]}, "invalid_dependency"),  # not a handle
        ({"join": "any"}, "invalid_dependency"),  # any needs upstreams
        ({"after": [a], "join": ("quorum", 2)}, "invalid_dependency"),  # k > upstreams
        ({"after": [a], "join": ("quorum", 0)}, "invalid_dependency"),
        ({"after": [a], "join": "most"}, "invalid_dependency"),
        ({"after": [a, a]}, "invalid_dependency"),  # the same pair twice
        ({"after": [a], "edge_kind": "always"}, "invalid_dependency"),
        ({"data_from": a, "edge_kind": "completion"}, "invalid_dependency"),
        ({"key": "fetch"}, "invalid_input"),  # duplicate key
        ({"key": "x" * 65}, "invalid_input"),
    ]
    for kwargs, reason in cases:
        with pytest.raises(InvalidFlow) as err:
            f.add("parse", **kwargs)
        assert err.value.reason == reason, kwargs
    assert len(f) == 2  # nothing half-added
    d = f.add("parse", data_from=a)  # data_from joins `after`
    assert f.upstreams(d) == ["fetch"]
    with pytest.raises(InvalidFlow) as err:
        f.edge(d, d)
    assert err.value.reason == "self_referencing_edge"
    with pytest.raises(RuntimeError):
        f.submit()  # no client


def test_builder_names_a_cycle() -> None:
    f: FlowBuilder[None] = FlowBuilder()
    a = f.add("a")
    b = f.add("b", after=[a])
    c = f.add("c", after=[b])
    f.add("d", after=[c])
    f.edge(c, a)
    with pytest.raises(InvalidFlow) as err:
        f.validate()
    assert err.value.reason == "cycle_detected"
    assert str(err.value) == "the flow has a cycle: a -> b -> c -> a"


def test_builder_request_shape() -> None:
    f: FlowBuilder[None] = FlowBuilder("etl", namespace="ns", failure_policy="skip_dependents")
    a = f.add("fetch", {"url": "u"}, lane="io", priority=5, tags={"app.team": "x"})
    b = f.add("fetch", "text")
    f.add("merge", after=[a, b], join=("quorum", 1), edge_kind="completion")
    f.add("parse", after=[a], data_from=a)
    req = f.to_request()
    assert req.flow_id == f.flow_id and req.flow_kind == "etl" and req.namespace == "ns"
    m0 = req.members[0]
    assert (m0.key, m0.lane_id, m0.priority, m0.payload_encoding) == ("fetch", "io", 5, "json")
    assert json.loads(m0.input_payload) == {"url": "u"}
    assert dict(m0.tags) == {"flowfabric.member": "fetch", "app.team": "x"}
    assert req.members[2].join.kind == req.members[2].join.KIND_QUORUM
    assert req.members[2].join.quorum == 1
    edges = [(e.upstream_key, e.downstream_key, e.kind, e.data_passing_ref) for e in req.edges]
    assert edges == [("fetch", "merge", 2, ""), ("fetch-2", "merge", 2, ""),
                     ("fetch", "parse", 1, "fetch")]  # fmt: skip


def test_spec_in_any_order() -> None:
    spec = {
        "kind": "dag",
        "members": [
            {"key": "join", "kind": "merge", "after": ["a", "b"], "join": {"quorum": 2}},
            {"key": "a", "kind": "step", "payload": {"n": 1}},
            {"key": "b", "kind": "step", "data_from": "a"},
        ],
    }
    f: FlowBuilder[None] = FlowBuilder.from_spec(spec)
    assert [h.key for h in f.handles] == ["join", "a", "b"]
    assert f.upstreams(f.handles[0]) == ["a", "b"] and f.upstreams(f.handles[2]) == ["a"]
    for bad, reason in [
        ({"members": [{"kind": "x", "after": ["nope"]}]}, "invalid_dependency"),
        ({"members": [{"kind": "x", "colour": "red"}]}, "invalid_input"),
        ({"members": []}, "invalid_input"),
        ({"members": [{"key": "a", "kind": "x", "after": ["b"]},
                      {"key": "b", "kind": "x", "after": ["a"]}]}, "cycle_detected"),
    ]:  # fmt: skip
        with pytest.raises(InvalidFlow) as err:
            FlowBuilder.from_spec(bad)
        assert err.value.reason == reason, bad


# -- against the server -----------------------------------------------------------------------


async def test_fan_out_fan_in_completes(api: Api, client: Client) -> None:
    f = client.flow()
    root = f.add("step", "seed", lane=LANE)
    branches = [f.add("step", f"b{i}", lane=LANE, after=[root]) for i in range(4)]
    sink = f.add("step", lane=LANE, after=branches, data_from=branches[0])
    sub = await f.submit()
    assert not sub.duplicate and len(sub.members) == 6
    assert sub.states[root.key] is S.WAITING and sub.states[sink.key] is S.WAITING_CHILDREN
    assert sub.graph_revision == 6 + 8
    again = await client.submit_flow(f)  # the same flow id: answered, nothing written
    assert again.duplicate and again.members == sub.members

    async with running(make_worker(api)):
        info = await client.wait_flow(sub.flow_id, timeout=20)
    assert info.state is FlowState.COMPLETED and info.state.is_terminal
    assert info.counts == {"completed": 6} and info.done == 6 and not info.failures
    assert (info.node_count, info.edge_count, info.graph_revision) == (6, 8, 14)
    result = json.loads(await client.result(sub[sink]))
    assert result["key"] == "step-6"  # the sink ran with b0's result as its input
    assert json.loads(result["input"]) == {"key": "step-2", "input": "b0"}

    out = [e async for e in client.edges(sub[root])]
    assert sorted(e.downstream_execution_id for e in out) == sorted(sub[b] for b in branches)
    inbound = [e async for e in client.edges(sub[sink], direction="incoming", page_size=2)]
    assert len(inbound) == 4 and {e.dependency_kind for e in inbound} == {"success"}
    edge = await client.describe_edge(sub.flow_id, inbound[0].edge_id)
    assert edge.downstream_execution_id == sub[sink]


async def test_a_failed_branch_skips_its_dependents(api: Api, client: Client) -> None:
    f = client.flow()
    root = f.add("step", lane=LANE, key="root")
    ok = f.add("step", lane=LANE, key="ok", after=[root])
    bad = f.add("step", lane=LANE, key="bad", after=[root])
    both = f.add("step", lane=LANE, key="both", after=[ok, bad])
    either = f.add("step", lane=LANE, key="either", after=[ok, bad], join="any")
    anyway = f.add("step", lane=LANE, key="anyway", after=[bad], edge_kind="completion")
    sub = await f.submit()
    async with running(make_worker(api, fail={"bad"})):
        info = await client.wait_flow(sub.flow_id, timeout=20)
    assert info.state is FlowState.FAILED
    assert info.counts == {"completed": 4, "failed": 1, "skipped": 1}
    assert [(x.execution_id, x.state) for x in info.failures] == [(sub[bad], S.FAILED)]
    assert "bad broke" in info.failures[0].reason
    states = {h.key: await client.state(sub[h]) for h in (both, either, anyway)}
    assert states == {"both": S.SKIPPED, "either": S.COMPLETED, "anyway": S.COMPLETED}


async def test_cancel_a_running_flow(api: Api, client: Client) -> None:
    gate = asyncio.Event()
    f = client.flow()
    first = f.add("slow", lane=LANE)
    later = f.add("step", lane=LANE, after=[first])
    sub = await f.submit()
    async with running(make_worker(api, gate=gate)):
        await eventually(lambda: client.state(sub[first]), lambda s: s is S.ACTIVE)
        done = await client.cancel_flow(sub.flow_id, "stop", wait=True)
        assert done.outcome == "cancelled" and done.policy == "cancel_all"
        assert sorted(done.members) == sorted(sub.execution_ids)
        info = await client.wait_flow(sub.flow_id, timeout=5)
        gate.set()
    assert info.state is FlowState.CANCELLED
    assert await client.state(sub[first]) is S.CANCELLED
    assert await client.state(sub[later]) in (S.CANCELLED, S.SKIPPED)
    again = await client.cancel_flow(sub.flow_id)
    assert again.outcome == "cancelled"


async def test_server_errors_are_typed(client: Client) -> None:
    f = client.flow()
    f.add("step", lane=LANE, policy={"no_such_field": 1})
    with pytest.raises(InvalidArgument) as err:
        await f.submit()
    assert err.value.reason == "invalid_policy_json"
    with pytest.raises(NotFound) as missing:
        await client.describe_flow("00000000-0000-4000-8000-000000000000")
    assert missing.value.reason == "flow_not_found"
    g = client.flow()
    g.add("step", lane=LANE)
    sub = await g.submit()
    with pytest.raises(TimeoutError):
        await client.wait_flow(sub.flow_id, timeout=0.2)  # nobody runs it
    await client.cancel(sub.execution_ids[0])
    assert (await client.wait_flow(sub.flow_id, timeout=5)).state is FlowState.FAILED
    with pytest.raises(FailedPrecondition) as terminal:
        await client.cancel_flow(sub.flow_id)
    assert terminal.value.reason == "flow_already_terminal"


def _blocking_flow(address: str) -> None:
    with SyncClient(address, token=API_TOKEN) as client:
        f = client.flow("sync")
        a = f.add("step", lane=LANE)
        f.add("step", lane=LANE, after=[a])
        sub = f.submit()  # blocks: no await
        info = client.describe_flow(sub.flow_id)
        assert info.state is FlowState.OPEN and info.counts == {
            "waiting": 1,
            "waiting_children": 1,
        }
        assert [e.upstream_execution_id for e in client.edges(sub[a])] == [sub[a]]
        assert client.cancel_flow(sub.flow_id, wait=True).outcome == "cancelled"
        assert client.wait_flow(sub.flow_id, timeout=5).state is FlowState.CANCELLED


async def test_sync_client_flow(api: Api) -> None:
    await asyncio.to_thread(_blocking_flow, api.address)


# -- WatchFlow and ReplayFlow ------------------------------------------------------------------


async def test_watch_and_replay_a_failed_branch(api: Api, client: Client) -> None:
    f = client.flow()
    root = f.add("step", lane=LANE, key="root")
    bad = f.add("step", lane=LANE, key="bad", after=[root])
    sink = f.add("step", lane=LANE, key="sink", after=[bad])
    sub = await f.submit()
    members = await client.flow_members(sub.flow_id)
    assert members == {sub[root]: S.WAITING, sub[bad]: S.WAITING_CHILDREN,
                       sub[sink]: S.WAITING_CHILDREN}  # fmt: skip
    async with running(make_worker(api, fail={"bad"})):
        seen = [e async for e in client.watch_flow(sub.flow_id, timeout=20)]
    flows = [e.flow for e in seen if e.WhichOneof("event") == "flow"]
    assert flows[-1].flow.public_flow_state == "failed"
    last = {e.member.execution_id: e.member.public_state for e in seen if e.member.at}
    assert last[sub[sink]] == S.SKIPPED
    replay = await client.replay_flow(sub.flow_id, "fixed")
    assert sorted(replay.execution_ids) == sorted([sub[bad], sub[sink]])
    assert replay.reopened_edges == 1
    async with running(make_worker(api)):
        info = await client.wait_flow(sub.flow_id, timeout=20)
    assert info.state is FlowState.COMPLETED and info.counts == {"completed": 3}
    nothing = await client.replay_flow(sub.flow_id)
    assert nothing.execution_ids == () and nothing.state is FlowState.COMPLETED
