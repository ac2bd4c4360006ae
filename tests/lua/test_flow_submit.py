"""ff_submit_flow and resolution inside the terminal call: a whole DAG in one call, children
released or skipped by the call that ends their last deciding parent (docs/flows.md)."""

from __future__ import annotations

import uuid

import pytest

from flowfabric.server.valkey.errors import FlowFabricError
from flowfabric.server.valkey.functions import Functions
from flowfabric.server.valkey.functions.flow import AlreadySubmitted, SubmitEdge, SubmitMember
from flowfabric.server.valkey.ids import ExecutionId
from flowfabric.server.valkey.keys import ExecKeys, PartitionKeys
from flowfabric.server.valkey.store import Store
from tests.api.util import keyspace_size
from tests.lua.flowutil import flow_core, new_flow, run, state, states, submit
from tests.lua.util import LANE, cancel, claim, core_of, hash_of, listening

DIAMOND = (("A", "B"), ("A", "C"), ("B", "D"), ("C", "D"))


async def test_diamond_is_created_blocked_and_released_by_each_completion(store: Store) -> None:
    dag = await submit(store, "ABCD", DIAMOND)
    assert dag.reply.graph_revision == 8
    assert await states(store, dag) == {
        "A": "waiting", "B": "waiting_children", "C": "waiting_children", "D": "waiting_children",
    }  # fmt: skip
    lane = PartitionKeys(dag.tag).lane(LANE, "eligible")
    assert await store.call("ZRANGE", lane, 0, -1) == [str(dag["A"]).encode()]
    f = await flow_core(store, dag)
    assert (f["public_flow_state"], f["node_count"], f["edge_count"]) == ("open", "4", "4")
    assert (f["members_waiting"], f["members_waiting_children"]) == ("1", "3")

    await run(store, dag["A"])
    # released by A's own completion call: no listener, no reconciler ran
    assert await states(store, dag) == {
        "A": "completed", "B": "waiting", "C": "waiting", "D": "waiting_children",
    }  # fmt: skip
    await run(store, dag["B"])
    assert await state(store, dag["D"]) == "waiting_children"
    await run(store, dag["C"])
    assert await state(store, dag["D"]) == "waiting"
    lease = await claim(store, dag["D"])
    assert (await flow_core(store, dag))["public_flow_state"] == "running"
    assert lease.attempt_index == 0
    await run_lease_complete(store, dag["D"], lease.fence)
    f = await flow_core(store, dag)
    assert f["public_flow_state"] == "completed"
    assert f["members_completed"] == "4"


async def run_lease_complete(store: Store, eid: ExecutionId, fence: list[str]) -> None:
    from tests.lua.util import complete

    assert (await complete(store, eid, fence))[:2] == [1, b"OK"]


async def test_a_failure_skips_its_descendants_recording_why(store: Store) -> None:
    dag = await submit(store, "ABCDE", (*DIAMOND, ("D", "E")))
    await run(store, dag["A"])
    async with listening(store, "ff:dag:completions") as sub:
        await run(store, dag["B"], "failed")
        events = await sub.drain()
    assert await states(store, dag) == {
        "A": "completed", "B": "failed", "C": "waiting", "D": "skipped", "E": "skipped",
    }  # fmt: skip
    d = await core_of(store, dag["D"])
    edge_bd = await store.call("SMEMBERS", dag.keys.incoming(str(dag["D"])))
    assert d["skipped_by_upstream"] == str(dag["B"])
    assert d["skipped_upstream_outcome"] == "failed"
    assert d["skipped_by_edge"].encode() in edge_bd
    assert (d["lifecycle_phase"], d["terminal_outcome"], d["attempt_state"]) == (
        "terminal", "skipped", "none",
    )  # fmt: skip
    e = await core_of(store, dag["E"])
    assert (e["skipped_by_upstream"], e["skipped_upstream_outcome"]) == (str(dag["D"]), "skipped")
    lanes = PartitionKeys(dag.tag)
    for k in "DE":
        assert await store.call("ZSCORE", lanes.lane(LANE, "terminal"), str(dag[k])) is not None
        assert (
            await store.call("ZSCORE", lanes.lane(LANE, "blocked:dependencies"), str(dag[k]))
            is None
        )
    outcomes = {(ev["execution_id"], ev["outcome"]) for ev in events}
    assert {
        (str(dag["B"]), "failed"),
        (str(dag["D"]), "skipped"),
        (str(dag["E"]), "skipped"),
    } <= outcomes
    # C still runs; the flow is not terminal until it ends, then failed
    assert (await flow_core(store, dag))["public_flow_state"] == "open"
    await run(store, dag["C"])
    f = await flow_core(store, dag)
    assert (f["public_flow_state"], f["members_skipped"], f["members_failed"]) == (
        "failed",
        "2",
        "1",
    )
    failures = await store.call("LRANGE", dag.keys.failures, 0, -1)
    assert len(failures) == 1 and str(dag["B"]).encode() in failures[0]


async def test_any_join_is_released_by_the_first_satisfied_edge(store: Store) -> None:
    dag = await submit(store, "ABC", (("A", "C"), ("B", "C")), joins={"C": ("any", 0)})
    await run(store, dag["A"], "failed")
    assert await state(store, dag["C"]) == "waiting_children"
    await run(store, dag["B"])
    assert await state(store, dag["C"]) == "waiting"


async def test_any_join_is_skipped_only_when_every_edge_is_impossible(store: Store) -> None:
    dag = await submit(store, "ABC", (("A", "C"), ("B", "C")), joins={"C": ("any", 0)})
    await run(store, dag["A"], "failed")
    await run(store, dag["B"], "failed")
    assert await state(store, dag["C"]) == "skipped"


async def test_quorum_join(store: Store) -> None:
    dag = await submit(
        store, "ABCDE", (("A", "D"), ("B", "D"), ("C", "D"), ("A", "E"), ("B", "E"), ("C", "E")),
        joins={"D": ("quorum", 2), "E": ("quorum", 2)},
    )  # fmt: skip
    await run(store, dag["A"], "failed")
    assert await states(store, dag) | {} == {
        "A": "failed", "B": "waiting", "C": "waiting", "D": "waiting_children",
        "E": "waiting_children",
    }  # fmt: skip
    await run(store, dag["B"])
    assert await state(store, dag["D"]) == "waiting_children"  # 1 of 2, one still possible
    await run(store, dag["C"])
    assert (await state(store, dag["D"]), await state(store, dag["E"])) == ("waiting", "waiting")


async def test_quorum_join_is_skipped_once_k_is_out_of_reach(store: Store) -> None:
    dag = await submit(
        store, "ABCD", (("A", "D"), ("B", "D"), ("C", "D")), joins={"D": ("quorum", 2)}
    )
    await run(store, dag["A"], "failed")
    await run(store, dag["B"], "failed")
    assert await state(store, dag["D"]) == "skipped"


async def test_completion_edge_is_satisfied_by_any_outcome(store: Store) -> None:
    dag = await submit(store, "ABC", (("A", "B", "completion"), ("B", "C", "completion")))
    await run(store, dag["A"], "failed")
    assert await state(store, dag["B"]) == "waiting"
    assert (await cancel(store, dag["B"]))[:2] == [1, b"OK"]
    assert await state(store, dag["C"]) == "waiting"


async def test_a_cancelled_parent_skips_the_child_in_its_own_call(store: Store) -> None:
    dag = await submit(store, "AB", (("A", "B"),))
    assert (await cancel(store, dag["A"], source="flow_cascade"))[:2] == [1, b"OK"]
    assert await state(store, dag["B"]) == "skipped"


async def test_data_passing_edge_copies_the_result(store: Store) -> None:
    dag = await submit(store, "ABC", (("A", "B"), ("A", "C")), refs={("A", "B"): "result"})
    await run(store, dag["A"], result=b"R")
    assert await store.call("GET", ExecKeys(dag["B"]).payload) == b"R"
    assert await store.call("GET", ExecKeys(dag["C"]).payload) == b"in-C"


async def test_fan_out_past_the_bound_is_announced_and_finished_by_resolve_outgoing(
    store: Store,
) -> None:
    kids = [f"k{i}" for i in range(70)]
    dag = await submit(store, ["A", *kids], [("A", k) for k in kids])
    pending = PartitionKeys(dag.tag).deps_pending
    async with listening(store, PartitionKeys(dag.tag).ready, sharded=True) as sub:
        await run(store, dag["A"])
        events = await sub.drain()
    # The completing call released exactly 64 (one ready event each, published before the
    # announcement; a server's follow-up, if one runs on this Valkey, comes after it).
    announced = events.index({"type": "deps_pending", "execution_id": str(dag["A"])})
    assert events[:announced] == [{"type": "ready", "lane": LANE}] * 64
    fn = Functions(store).flow
    for _ in range(3):  # whatever a follow-up left, these calls finish
        reply = await fn.resolve_outgoing(dag["A"])
        if getattr(reply, "pending", 0) == 0:
            break
    assert all([await state(store, dag[k]) == "waiting" for k in kids])
    assert await store.call("ZSCORE", pending, str(dag["A"])) is None


async def test_a_released_member_is_announced_on_its_partition(store: Store) -> None:
    dag = await submit(store, "AB", (("A", "B"),))
    async with listening(store, PartitionKeys(dag.tag).ready, sharded=True) as sub:
        await run(store, dag["A"])
        assert await sub.drain() == [{"type": "ready", "lane": LANE}]


async def test_a_submit_announces_each_lane_of_its_roots_once(store: Store) -> None:
    fid, _p, tag = new_flow()
    async with listening(store, PartitionKeys(tag).ready, sharded=True) as sub:
        await submit(store, "ABCD", (("A", "D"),), fid=fid)
        # A, B and C are roots on one lane: one announcement; D is blocked
        assert await sub.drain() == [{"type": "ready", "lane": LANE}]


async def test_resubmitting_the_flow_is_already_satisfied(store: Store) -> None:
    dag = await submit(store, "AB", (("A", "B"),))
    fn = Functions(store).flow
    again = await fn.submit_flow(
        dag.tag, dag["A"].partition, dag.flow_id, "dag", "ns",
        [SubmitMember("X", ExecutionId(dag["A"].partition, str(uuid.uuid4())), LANE, "k")], [],
    )  # fmt: skip
    assert isinstance(again, AlreadySubmitted)
    assert sorted((k, e) for k, e, _ in again.members()) == sorted(
        (k, str(v)) for k, v in dag.ids.items()
    )


def _m(key: str, p: int, **over: object) -> SubmitMember:
    return SubmitMember(key, ExecutionId(p, str(uuid.uuid4())), LANE, "k", **over)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("members", "edges", "code"),
    [
        ("AB", [("A", "B"), ("B", "A")], "cycle_detected"),
        ("ABC", [("A", "B"), ("B", "C"), ("C", "A")], "cycle_detected"),
        ("A", [("A", "A")], "self_referencing_edge"),
        ("AB", [("A", "Z")], "invalid_dependency"),
        ("AB", [("A", "B", "bogus")], "invalid_dependency"),
        ("AB", [("A", "B"), ("A", "B")], "invalid_dependency"),
        ("AB", [("A", "B", "completion", "ref")], "invalid_dependency"),
        ("ABC", [("A", "C"), ("B", "C"), ("quorum", "C", 3)], "invalid_dependency"),
        ("AB", [("A", "B"), ("quorum", "B", 0)], "invalid_dependency"),
        ("AB", [("A", "B"), ("any", "A", 0)], "invalid_dependency"),
        ("AB", [("A", "B"), ("all", "B", 2)], "invalid_dependency"),
        ("AB", [("A", "B"), ("fanciest", "B", 0)], "invalid_dependency"),
    ],
)
async def test_invalid_graphs_are_refused_and_write_nothing(
    store: Store, members: str, edges: list[tuple], code: str
) -> None:
    fid, p, tag = new_flow()
    joins = {e[1]: (e[0], e[2]) for e in edges if e[0] in ("quorum", "any", "all", "fanciest")}
    ms = [_m(k, p, join_kind=joins.get(k, ("", 0))[0], join_quorum=joins.get(k, ("", 0))[1])
          for k in members]  # fmt: skip
    es = [
        SubmitEdge(str(uuid.uuid4()), e[0], e[1], e[2] if len(e) > 2 else "",
                   e[3] if len(e) > 3 else "")
        for e in edges if e[0] not in joins.get(e[1], ("",))[:1]
    ]  # fmt: skip
    before = await keyspace_size(store)
    with pytest.raises(FlowFabricError) as err:
        await Functions(store).flow.submit_flow(tag, p, fid, "dag", "ns", ms, es)
    assert err.value.code == code, err.value
    assert await keyspace_size(store) == before


async def test_a_member_off_the_flow_partition_is_refused(store: Store) -> None:
    fid, p, tag = new_flow()
    other = (p + 1) % 256
    with pytest.raises(FlowFabricError) as err:
        await Functions(store).flow.submit_flow(tag, p, fid, "dag", "ns", [_m("A", other)], [])
    assert err.value.code == "invalid_input"
    assert await store.call("EXISTS", f"ff:flow:{tag}:{fid}:core") == 0


async def test_a_skipped_member_replays_to_waiting_children(store: Store) -> None:
    dag = await submit(store, "ABC", (("A", "B"), ("B", "C")))
    await run(store, dag["A"], "failed")
    assert await states(store, dag) == {"A": "failed", "B": "skipped", "C": "skipped"}
    edges = tuple(
        e.decode() for e in await store.call("SMEMBERS", dag.keys.incoming(str(dag["B"])))
    )
    reply = await Functions(store).execution.replay_execution(dag["B"], edges)
    assert reply.public_state == "waiting_children"
    b = await core_of(store, dag["B"])
    assert b["skipped_by_edge"] == ""
    dep = await hash_of(store, ExecKeys(dag["B"]).dep(edges[0]))
    assert dep["state"] == "unsatisfied"
    # replaying the upstream and completing it releases the replayed child
    await Functions(store).execution.replay_execution(dag["A"])
    await run(store, dag["A"])
    assert await state(store, dag["B"]) == "waiting"
