"""Flow bounds, joins with expected edges, and the scanners' functions, called directly
(docs/flows.md#limits, docs/flows.md#joins-and-edge-kinds, docs/flows.md#scanners)."""

from __future__ import annotations

import itertools
import uuid

import pytest

from flowfabric.server.valkey import bounds
from flowfabric.server.valkey.errors import FlowFabricError
from flowfabric.server.valkey.functions.core import Outcome
from flowfabric.server.valkey.functions.flow import Projected, Reconciled
from flowfabric.server.valkey.ids import ExecutionId
from flowfabric.server.valkey.store import Store
from tests.api.util import keyspace_dump
from tests.lua.flowutil import run, state, states, submit
from tests.lua.test_flow_incremental import Flow, public


async def expect(call: object, code: str) -> FlowFabricError:
    with pytest.raises(FlowFabricError) as err:
        await call  # type: ignore[misc]
    assert err.value.code == code, err.value
    return err.value


async def test_members_past_the_bound_are_refused_and_nothing_is_written(store: Store) -> None:
    f = Flow(store)
    await f.create()
    first = await f.member()
    # stand-ins fill the member set up to the bound (the check counts the set)
    fillers = [f"{f.tag}:{uuid.uuid4()}" for _ in range(bounds.FLOW_MEMBERS_MAX.hi - 1)]
    for i in range(0, len(fillers), 1000):
        await store.call("SADD", f.keys.members, *fillers[i : i + 1000])
    eid = ExecutionId(f.p, str(uuid.uuid4()))
    from tests.lua.util import create

    await create(store, eid)
    before = await keyspace_dump(store)
    err = await expect(f.fn.add_execution_to_flow(f.fid, eid), "flow_limit_exceeded")
    assert err.details[:2] == ["FLOW_MEMBERS_MAX", "10000"]
    assert await keyspace_dump(store) == before
    # an existing member is still answered (no new member)
    again = await f.fn.add_execution_to_flow(f.fid, first)
    assert again.execution_id == str(first)


async def test_edges_per_member_past_the_bound_are_refused(store: Store) -> None:
    f = Flow(store)
    await f.create()
    hub = await f.member()
    edge_max = bounds.FLOW_EDGES_PER_MEMBER_MAX.hi
    # stand-in edge ids fill the hub's outbound adjacency up to the bound
    await store.call(
        "SADD", f.keys.outgoing(str(hub)), *[str(uuid.uuid4()) for _ in range(edge_max)]
    )
    other = await f.member()
    before = await keyspace_dump(store)
    err = await expect(
        f.fn.stage_dependency_edge(
            f.fid, str(uuid.uuid4()), hub, other, "", "", await f.revision()
        ),
        "flow_limit_exceeded",
    )
    assert err.details[:2] == ["FLOW_EDGES_PER_MEMBER_MAX", str(edge_max)]
    assert await keyspace_dump(store) == before
    await store.call("DEL", f.keys.outgoing(str(hub)))
    await store.call(
        "SADD", f.keys.incoming(str(other)), *[str(uuid.uuid4()) for _ in range(edge_max)]
    )
    err = await expect(
        f.fn.stage_dependency_edge(
            f.fid, str(uuid.uuid4()), hub, other, "", "", await f.revision()
        ),
        "flow_limit_exceeded",
    )
    assert "inbound" in err.details[2]


async def test_depth_is_tracked_incrementally_and_bounded(store: Store) -> None:
    f = Flow(store)
    await f.create()
    depth_max = bounds.FLOW_DEPTH_MAX.hi
    chain = [await f.member() for _ in range(depth_max)]
    # build the chain from its tail, so every stage raises the depth of the part below it
    for up, down in reversed(list(itertools.pairwise(chain))):
        await f.edge(up, down)
    depth = await store.call("HGET", f.keys.core.replace(":core", ":depth"), str(chain[-1]))
    assert int(depth) == depth_max - 1
    extra = await f.member()
    err = await expect(
        f.fn.stage_dependency_edge(f.fid, str(uuid.uuid4()), chain[-1], extra, "", "",
                                   await f.revision()),
        "flow_limit_exceeded",
    )  # fmt: skip
    assert err.details[:2] == ["FLOW_DEPTH_MAX", str(depth_max)]
    top = await f.member()
    err = await expect(
        f.fn.stage_dependency_edge(f.fid, str(uuid.uuid4()), top, chain[0], "", "",
                                   await f.revision()),
        "flow_limit_exceeded",
    )  # fmt: skip
    # a side branch off the middle stays within the bound
    await f.edge(chain[10], extra)


async def test_a_quorum_built_edge_by_edge_waits_for_its_expected_edges(store: Store) -> None:
    f = Flow(store)
    await f.create()
    u1, u2, u3 = [await f.member() for _ in range(3)]
    child = await f.member(blocked=True)
    await run(store, u1, "failed")
    join = {"join_kind": "quorum", "join_quorum": 2, "join_expected_edges": 3}
    await f.edge(u1, child, **join)
    # one impossible edge of three expected: 2 may still succeed
    assert await public(store, child) == "waiting_children"
    await f.edge(u2, child, **join)
    await f.edge(u3, child, **join)
    await run(store, u2)
    assert await public(store, child) == "waiting_children"
    await run(store, u3)
    assert await public(store, child) == "waiting"


async def test_a_quorum_is_not_judged_on_fewer_than_k_edges(store: Store) -> None:
    f = Flow(store)
    await f.create()
    u1, u2, u3 = [await f.member() for _ in range(3)]
    child = await f.member(blocked=True)
    await run(store, u1, "failed")
    await f.edge(u1, child, join_kind="quorum", join_quorum=2)
    assert await public(store, child) == "waiting_children"
    await f.edge(u2, child)
    await f.edge(u3, child)
    await run(store, u2, "failed")
    assert await public(store, child) == "skipped"


async def test_an_all_join_with_expected_edges_is_not_released_early(store: Store) -> None:
    f = Flow(store)
    await f.create()
    u1, u2 = await f.member(), await f.member()
    child = await f.member(blocked=True)
    await run(store, u1)
    await f.edge(u1, child, join_kind="all", join_expected_edges=2)
    assert await public(store, child) == "waiting_children"
    await f.edge(u2, child, join_kind="all", join_expected_edges=2)
    await run(store, u2)
    assert await public(store, child) == "waiting"


async def test_reconcile_resolves_a_lost_resolution_and_waits_out_a_fresh_empty_member(
    store: Store,
) -> None:
    dag = await submit(store, "AB", [("A", "B")])
    fn = Flow(store).fn
    assert await fn.reconcile_dependencies(dag["B"], 0) == Reconciled(0, "")
    # A ended without its call resolving the edge (a write outside the functions stands in
    # for the lost resolution)
    await store.call(
        "HSET", f"ff:exec:{dag.tag}:{dag['A']}:core", "lifecycle_phase", "terminal",
        "terminal_outcome", "success",
    )  # fmt: skip
    assert await fn.reconcile_dependencies(dag["B"], 0) == Reconciled(1, "released")
    assert await state(store, dag["B"]) == "waiting"
    assert await fn.reconcile_dependencies(dag["B"], 0) == Outcome("not_blocked")
    f = Flow(store)
    await f.create()
    empty = await f.member(blocked=True)
    assert await fn.reconcile_dependencies(empty, 60_000) == Reconciled(0, "")
    assert await public(store, empty) == "waiting_children"
    assert await fn.reconcile_dependencies(empty, 0) == Reconciled(0, "released")
    assert await public(store, empty) == "waiting"


async def test_project_flow_counts_every_member_and_repairs(store: Store) -> None:
    dag = await submit(store, "ABC", [("A", "B")])
    fn = Flow(store).fn
    good = await fn.project_flow(dag.tag, dag.flow_id)
    assert good == Projected("open", 0)
    await store.call("HSET", dag.keys.core, "members_waiting", "0", "members_active", "5")
    fixed = await fn.project_flow(dag.tag, dag.flow_id)
    assert fixed == Projected("open", 1)
    for eid in (dag["A"], dag["C"]):
        await run(store, eid)
    await run(store, dag["B"])
    assert await fn.project_flow(dag.tag, dag.flow_id) == Projected("completed", 0)
    from flowfabric.server.valkey.keys import PartitionKeys

    assert not await store.call("SISMEMBER", PartitionKeys(dag.tag).flow_index, dag.flow_id)
    assert await states(store, dag) == {"A": "completed", "B": "completed", "C": "completed"}


async def test_fail_fast_in_one_call_cancels_every_unfinished_member(store: Store) -> None:
    f = Flow(store)
    await f.fn.create_flow(f.tag, f.fid, "dag", "ns", "fail_fast")
    a, b, c = await f.member(), await f.member(), await f.member()
    await f.edge(a, b)
    await run(store, c)
    await run(store, a, "failed")
    assert (await public(store, b), await public(store, c)) == ("cancelled", "completed")
    core = await store.call("HGET", f.keys.core, "halted_by")
    assert core.decode() == str(a)
    assert await state(store, a) == "failed"
    reply = await f.fn.reconcile_dependencies(b, 0)
    assert reply == Outcome("not_blocked")
    assert not isinstance(reply, Reconciled)
