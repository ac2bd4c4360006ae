"""The incremental flow functions: create, add members, stage and apply edges, promote,
evaluate, cancel, tags (docs/flows.md#building-a-flow)."""

from __future__ import annotations

import uuid

import pytest

from flowfabric.server.valkey.errors import FlowFabricError
from flowfabric.server.valkey.functions import Functions
from flowfabric.server.valkey.functions.core import Outcome
from flowfabric.server.valkey.functions.flow import AlreadyMember, Applied, FlowFunctions
from flowfabric.server.valkey.ids import ExecutionId
from flowfabric.server.valkey.keys import ExecKeys, FlowKeys, PartitionKeys
from flowfabric.server.valkey.store import Store
from tests.api.util import keyspace_size
from tests.lua.flowutil import new_flow, run
from tests.lua.util import LANE, claim, core_of, create, hash_of


class Flow:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.fn: FlowFunctions = Functions(store).flow
        self.fid, self.p, self.tag = new_flow()
        self.keys = FlowKeys(self.tag, self.fid)

    async def create(self) -> None:
        await self.fn.create_flow(self.tag, self.fid, "dag", "ns")

    async def member(self, blocked: bool = False) -> ExecutionId:
        eid = ExecutionId(self.p, str(uuid.uuid4()))
        reply = await create(self.store, eid, blocked_by_dependencies="1" if blocked else "0")
        assert reply[1] == b"OK", reply
        await self.fn.add_execution_to_flow(self.fid, eid)
        return eid

    async def revision(self) -> int:
        return int(await self.store.call("HGET", self.keys.core, "graph_revision"))

    async def edge(self, up: ExecutionId, down: ExecutionId, kind: str = "", **join: object) -> str:
        edge = str(uuid.uuid4())
        await self.fn.stage_dependency_edge(
            self.fid, edge, up, down, kind, "", await self.revision()
        )
        await self.fn.apply_dependency_to_child(self.fid, edge, down, **join)  # type: ignore[arg-type]
        return edge


async def public(store: Store, eid: ExecutionId) -> str:
    return (await core_of(store, eid))["public_state"]


async def test_create_flow_is_idempotent_and_validated(store: Store) -> None:
    f = Flow(store)
    await f.create()
    core = await hash_of(store, f.keys.core)
    assert (core["public_flow_state"], core["graph_revision"], core["failure_policy"]) == (
        "open", "0", "skip_dependents",
    )  # fmt: skip
    await f.fn.create_flow(f.tag, f.fid, "other", "ns2")
    assert (await hash_of(store, f.keys.core))["flow_kind"] == "dag"
    with pytest.raises(FlowFabricError) as err:
        await f.fn.create_flow(f.tag, str(uuid.uuid4()), "", "ns")
    assert err.value.code == "invalid_input"
    with pytest.raises(FlowFabricError) as err:
        await f.fn.create_flow(f.tag, str(uuid.uuid4()), "dag", "ns", "stop_everything")
    assert err.value.code == "invalid_input"
    for policy in ("fail_fast", "continue", "skip_dependents"):
        fid = str(uuid.uuid4())
        await f.fn.create_flow(f.tag, fid, "dag", "ns", policy)
        assert (await hash_of(store, FlowKeys(f.tag, fid).core))["failure_policy"] == policy


async def test_add_member_counts_and_guards(store: Store) -> None:
    f = Flow(store)
    eid = ExecutionId(f.p, str(uuid.uuid4()))
    with pytest.raises(FlowFabricError) as err:
        await f.fn.add_execution_to_flow(f.fid, eid)
    assert err.value.code == "flow_not_found"
    await f.create()
    with pytest.raises(FlowFabricError) as err:
        await f.fn.add_execution_to_flow(f.fid, eid)
    assert err.value.code == "execution_not_found"
    assert await store.call("EXISTS", ExecKeys(eid).core) == 0
    a = await f.member()
    again = await f.fn.add_execution_to_flow(f.fid, a)
    assert isinstance(again, AlreadyMember) and again.node_count == 1
    core = await hash_of(store, f.keys.core)
    assert (core["node_count"], core["graph_revision"], core["members_waiting"]) == ("1", "1", "1")
    other = Flow(store)
    other.p, other.tag = f.p, f.tag
    other.keys = FlowKeys(f.tag, other.fid)
    await other.create()
    with pytest.raises(FlowFabricError) as err:
        await other.fn.add_execution_to_flow(other.fid, a)
    assert (err.value.code, err.value.details) == ("execution_already_in_flow", [f.fid])


async def test_stage_and_apply_gate_the_child_and_completion_releases_it(store: Store) -> None:
    f = Flow(store)
    await f.create()
    a, b = await f.member(), await f.member(blocked=True)
    assert await public(store, b) == "waiting_children"
    edge = str(uuid.uuid4())
    staged = await f.fn.stage_dependency_edge(f.fid, edge, a, b, "", "", 2)
    assert staged.new_graph_revision == 3
    edge_hash = await hash_of(store, f.keys.edge(edge))
    assert (edge_hash["dependency_kind"], edge_hash["edge_state"]) == ("success", "pending")
    applied = await f.fn.apply_dependency_to_child(f.fid, edge, b)
    assert applied == Applied(1)
    assert await f.fn.apply_dependency_to_child(f.fid, edge, b) == Outcome("already_applied")
    assert await f.fn.evaluate_flow_eligibility(b) == "blocked_by_dependencies"
    await run(store, a)
    assert await public(store, b) == "waiting"
    assert await f.fn.evaluate_flow_eligibility(b) == "eligible"


async def test_apply_regates_an_eligible_child_out_of_its_lane_set(store: Store) -> None:
    f = Flow(store)
    await f.create()
    a, b = await f.member(), await f.member()
    lanes = PartitionKeys(f.tag)
    await f.edge(a, b)
    c = await core_of(store, b)
    assert (c["eligibility_state"], c["blocking_reason"]) == (
        "blocked_by_dependencies", "waiting_for_children",
    )  # fmt: skip
    assert await store.call("ZSCORE", lanes.lane(LANE, "eligible"), str(b)) is None
    assert await store.call("ZSCORE", lanes.lane(LANE, "blocked:dependencies"), str(b)) is not None


async def test_apply_after_the_upstream_ended_resolves_at_once(store: Store) -> None:
    f = Flow(store)
    await f.create()
    a, b, c = await f.member(), await f.member(blocked=True), await f.member(blocked=True)
    await run(store, a)
    await f.edge(a, b)
    assert await public(store, b) == "waiting"
    d = await f.member()
    await run(store, d, "failed")
    await f.edge(d, c)
    assert await public(store, c) == "skipped"


async def test_apply_refuses_a_started_child_and_a_bad_join(store: Store) -> None:
    f = Flow(store)
    await f.create()
    a, b = await f.member(), await f.member()
    await claim(store, b)
    edge = str(uuid.uuid4())
    await f.fn.stage_dependency_edge(f.fid, edge, a, b, "", "", 2)
    with pytest.raises(FlowFabricError) as err:
        await f.fn.apply_dependency_to_child(f.fid, edge, b)
    assert err.value.code == "invalid_dependency"
    c = await f.member(blocked=True)
    edge2 = str(uuid.uuid4())
    await f.fn.stage_dependency_edge(f.fid, edge2, a, c, "", "", 4)
    before = await keyspace_size(store)
    for join, k in (("quorum", 0), ("bogus", 0), ("any", 2)):
        with pytest.raises(FlowFabricError) as err:
            await f.fn.apply_dependency_to_child(f.fid, edge2, c, join, k)
        assert err.value.code == "invalid_dependency", (join, k)
    with pytest.raises(FlowFabricError) as err:
        await f.fn.apply_dependency_to_child(f.fid, str(uuid.uuid4()), c)
    assert err.value.code == "invalid_dependency"
    assert await keyspace_size(store) == before


async def test_stage_errors_write_nothing(store: Store) -> None:
    f = Flow(store)
    await f.create()
    a, b, c = await f.member(), await f.member(), await f.member()
    outsider = ExecutionId(f.p, str(uuid.uuid4()))
    await create(store, outsider)
    await f.edge(a, b)
    await f.edge(b, c)
    rev = await f.revision()
    cases = [
        ((a, a, "", "", rev), "self_referencing_edge"),
        ((c, a, "", "", rev), "cycle_detected"),
        ((a, c, "", "", rev - 1), "stale_graph_revision"),
        ((a, outsider, "", "", rev), "execution_not_in_flow"),
        ((a, c, "sometimes", "", rev), "invalid_dependency"),
        ((a, c, "completion", "ref", rev), "invalid_dependency"),
    ]
    before = await keyspace_size(store)
    for (up, down, kind, ref, r), code in cases:
        with pytest.raises(FlowFabricError) as err:
            await f.fn.stage_dependency_edge(f.fid, str(uuid.uuid4()), up, down, kind, ref, r)
        assert err.value.code == code
    edge = str(uuid.uuid4())
    await f.fn.stage_dependency_edge(f.fid, edge, a, c, "", "", rev)
    with pytest.raises(FlowFabricError) as err:
        await f.fn.stage_dependency_edge(f.fid, edge, a, c, "", "", rev + 1)
    assert err.value.code == "dependency_already_exists"
    # only the staged edge's hash is new: out:a and in:c already exist
    assert await keyspace_size(store) == before + 1


async def test_promote_releases_a_blocked_member_with_no_edges(store: Store) -> None:
    f = Flow(store)
    await f.create()
    a, b = await f.member(blocked=True), await f.member(blocked=True)
    await f.edge(a, b)
    with pytest.raises(FlowFabricError) as err:
        await f.fn.promote_blocked_to_eligible(b)
    assert (err.value.code, err.value.details) == ("deps_not_satisfied", ["1", "1"])
    await f.fn.promote_blocked_to_eligible(a)
    assert await public(store, a) == "waiting"
    with pytest.raises(FlowFabricError) as err:
        await f.fn.promote_blocked_to_eligible(a)
    assert err.value.code == "not_blocked_by_deps"
    await run(store, a)
    assert await public(store, b) == "waiting"


async def test_cancel_flow_marks_it_and_refuses_changes(store: Store) -> None:
    f = Flow(store)
    await f.create()
    a = await f.member()
    cancelled = await f.fn.cancel_flow(f.tag, f.fid, "stop", "cancel_all", 30_000)
    assert (cancelled.cancellation_policy, cancelled.members) == ("cancel_all", (str(a),))
    with pytest.raises(FlowFabricError) as err:
        await f.fn.cancel_flow(f.tag, f.fid, "again", "other", 30_000)
    assert (err.value.code, err.value.details) == (
        "flow_already_terminal",
        ["cancelled", "cancel_all"],
    )
    b = ExecutionId(f.p, str(uuid.uuid4()))
    await create(store, b)
    with pytest.raises(FlowFabricError) as err:
        await f.fn.add_execution_to_flow(f.fid, b)
    assert err.value.code == "flow_already_terminal"
    await run(store, a)  # members' transitions keep the sticky cancelled state
    assert (await hash_of(store, f.keys.core))["public_flow_state"] == "cancelled"


async def test_set_flow_tags(store: Store) -> None:
    f = Flow(store)
    with pytest.raises(FlowFabricError) as err:
        await f.fn.set_flow_tags(f.tag, f.fid, {"app.k": "v"})
    assert err.value.code == "flow_not_found"
    await f.create()
    assert (await f.fn.set_flow_tags(f.tag, f.fid, {"app.k": "v", "app.x": "y"})).count == 2
    with pytest.raises(FlowFabricError) as err:
        await f.fn.set_flow_tags(f.tag, f.fid, {"Bad.k": "v"})
    assert (err.value.code, err.value.details) == ("invalid_tag_key", ["Bad.k"])
    assert await hash_of(store, f.keys.tags) == {"app.k": "v", "app.x": "y"}


async def test_resolve_dependency_checks_the_upstream_outcome(store: Store) -> None:
    f = Flow(store)
    await f.create()
    a, b = await f.member(), await f.member(blocked=True)
    edge = await f.edge(a, b)
    with pytest.raises(FlowFabricError) as err:
        await f.fn.resolve_dependency(b, edge, "success")
    assert err.value.code == "invalid_input"  # a has not completed
    with pytest.raises(FlowFabricError) as err:
        await f.fn.resolve_dependency(b, str(uuid.uuid4()), "success")
    assert err.value.code == "invalid_dependency"
    await run(store, a)
    assert await f.fn.resolve_dependency(b, edge, "success") == Outcome("already_resolved")
