"""FlowService end to end over gRPC, both topologies (docs/flows.md).

The `api` fixture runs no scanners: every release and skip below happens inside the call that
ended the upstream, which is the mechanism these tests pin down.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import grpc
import pytest

from flowfabric.server.valkey.ids import flow_partition, solo_partition
from flowfabric.v1 import execution_pb2 as epb
from flowfabric.v1 import flow_pb2 as pb
from flowfabric.v1 import flow_pb2_grpc
from flowfabric.v1 import types_pb2 as t
from flowfabric.v1 import worker_pb2 as wpb
from tests.api.test_lifecycle import claim_next, claim_one, complete, eventually, fail, state
from tests.api.util import expect_error, keyspace_size
from tests.conftest import Api

C = grpc.StatusCode
PARTITIONS = 256
S = t.PublicState
M = pb.SubmitFlowRequest.Member
E = pb.SubmitFlowRequest.Edge


def flows(api: Api) -> flow_pb2_grpc.FlowServiceStub:
    return flow_pb2_grpc.FlowServiceStub(api.channel)


def lane_for(key: str, fid: str) -> str:
    """A lane for member `key` whose solo partition is the flow's, so the scheduler's first
    probe of the lane is the flow's partition and each test claims exactly the member it means
    (the scheduler visits other partitions in a moving window)."""
    p = flow_partition(fid, PARTITIONS)
    n = 0
    while solo_partition(f"lane-{key}-{n}", PARTITIONS) != p:
        n += 1
    return f"lane-{key}-{n}"


def member(key: str, fid: str | None = None, **kw: Any) -> pb.SubmitFlowRequest.Member:
    lane = lane_for(key, fid) if fid else f"lane-{key}"
    return M(key=key, lane_id=lane, execution_kind="step", **kw)


async def submit(
    api: Api, keys: str, edges: list[tuple[str, str]], **kw: Any
) -> tuple[str, dict[str, str]]:
    joins = kw.pop("joins", {})
    kinds = kw.pop("kinds", {})
    fid = kw.pop("flow_id", None) or str(uuid.uuid4())
    req = pb.SubmitFlowRequest(
        flow_id=fid, flow_kind="dag", namespace="ns",
        members=[member(k, fid, join=joins.get(k)) for k in keys],
        edges=[E(upstream_key=u, downstream_key=d, kind=kinds.get((u, d), 0)) for u, d in edges],
        **kw,
    )  # fmt: skip
    reply = await flows(api).SubmitFlow(req, metadata=api.metadata)
    assert reply.WhichOneof("outcome") == "submitted", reply
    return reply.submitted.flow_id, {m.key: m.execution_id for m in reply.submitted.members}


async def run(api: Api, fid: str, key: str, ok: bool = True) -> None:
    task = await claim_one(api, lanes=(lane_for(key, fid),))
    if ok:
        await complete(api, task.lease)
    else:
        reply = await fail(api, task.lease)
        assert reply.WhichOneof("outcome") == "terminal_failed", reply


async def states(api: Api, ids: dict[str, str]) -> dict[str, int]:
    return {k: await state(api, eid) for k, eid in ids.items()}


async def describe(api: Api, fid: str) -> pb.DescribeFlowResponse:
    return await flows(api).DescribeFlow(  # type: ignore[no-any-return]
        pb.DescribeFlowRequest(flow_id=fid), metadata=api.metadata
    )


DIAMOND = [("A", "B"), ("A", "C"), ("B", "D"), ("C", "D")]


async def test_diamond_runs_in_dependency_order(api: Api) -> None:
    fid, ids = await submit(api, "ABCD", DIAMOND)
    assert await states(api, ids) == {
        "A": S.PUBLIC_STATE_WAITING, "B": S.PUBLIC_STATE_WAITING_CHILDREN,
        "C": S.PUBLIC_STATE_WAITING_CHILDREN, "D": S.PUBLIC_STATE_WAITING_CHILDREN,
    }  # fmt: skip
    nothing = await api.worker.ClaimNext(
        wpb.ClaimNextRequest(
            worker_id="w", worker_instance_id="w-1",
            lane_ids=[lane_for("B", fid), lane_for("D", fid)],
        ),
        metadata=api.metadata,
    )  # fmt: skip
    assert nothing.WhichOneof("outcome") == "no_work"
    await run(api, fid, "A")
    # claimable the moment A's completion returned: nothing else ran in between
    assert await state(api, ids["B"]) == S.PUBLIC_STATE_WAITING
    assert await state(api, ids["C"]) == S.PUBLIC_STATE_WAITING
    await run(api, fid, "B")
    assert await state(api, ids["D"]) == S.PUBLIC_STATE_WAITING_CHILDREN
    assert (await describe(api, fid)).flow.public_flow_state == "open"
    await run(api, fid, "C")
    assert await state(api, ids["D"]) == S.PUBLIC_STATE_WAITING
    task = await claim_one(api, lanes=(lane_for("D", fid),))
    assert (await describe(api, fid)).flow.public_flow_state == "running"
    await complete(api, task.lease)
    view = await describe(api, fid)
    assert view.flow.public_flow_state == "completed"
    assert (view.flow.graph_revision, view.flow.node_count, view.flow.edge_count) == (8, 4, 4)
    assert dict(view.members_by_state) == {"completed": 4}
    assert view.flow.failure_policy == "skip_dependents"


async def test_a_failure_skips_descendants_and_the_flow_fails(api: Api) -> None:
    fid, ids = await submit(api, "ABCDE", [*DIAMOND, ("D", "E")])
    await run(api, fid, "A")
    await run(api, fid, "B", ok=False)
    assert await state(api, ids["D"]) == S.PUBLIC_STATE_SKIPPED
    assert await state(api, ids["E"]) == S.PUBLIC_STATE_SKIPPED
    view = await describe(api, fid)
    assert view.flow.public_flow_state == "open"  # C can still run
    assert [(f.execution_id, f.public_state, f.reason) for f in view.failures] == [
        (ids["B"], "failed", "boom")
    ]
    await run(api, fid, "C")
    view = await describe(api, fid)
    assert view.flow.public_flow_state == "failed"
    assert dict(view.members_by_state) == {"completed": 2, "failed": 1, "skipped": 2}
    # a skipped member replays back to waiting for its (reopened) edges
    replayed = await api.execution.ReplayExecution(
        epb.ReplayExecutionRequest(execution_id=ids["D"]), metadata=api.metadata
    )
    assert replayed.replayed.public_state == S.PUBLIC_STATE_WAITING_CHILDREN
    assert (await describe(api, fid)).flow.public_flow_state == "blocked"


@pytest.mark.parametrize(
    ("join", "outcomes", "expected"),
    [
        (pb.Join(kind=pb.Join.KIND_ANY), (False, True), S.PUBLIC_STATE_WAITING),
        (pb.Join(kind=pb.Join.KIND_ANY), (False, False), S.PUBLIC_STATE_SKIPPED),
        (pb.Join(kind=pb.Join.KIND_QUORUM, quorum=2), (True, False), S.PUBLIC_STATE_SKIPPED),
        (pb.Join(kind=pb.Join.KIND_ALL), (True, True), S.PUBLIC_STATE_WAITING),
    ],
)
async def test_joins(api: Api, join: pb.Join, outcomes: tuple[bool, bool], expected: int) -> None:
    edges = [("A", "J"), ("B", "J"), ("C", "J")] if join.quorum else [("A", "J"), ("B", "J")]
    fid, ids = await submit(api, "ABCJ" if join.quorum else "ABJ", edges, joins={"J": join})
    for key, ok in zip("AB", outcomes, strict=True):
        await run(api, fid, key, ok)
    if join.quorum:
        await run(api, fid, "C", False)
    assert await state(api, ids["J"]) == expected


async def test_completion_edge_orders_without_requiring_success(api: Api) -> None:
    kinds = {("A", "B"): pb.DEPENDENCY_KIND_COMPLETION}
    fid, ids = await submit(api, "AB", [("A", "B")], kinds=kinds)
    await run(api, fid, "A", ok=False)
    assert await state(api, ids["B"]) == S.PUBLIC_STATE_WAITING
    edges = await flows(api).ListEdges(
        pb.ListEdgesRequest(
            direction=t.EdgeDirection(outgoing=t.EdgeDirection.Outgoing(from_node=ids["A"]))
        ),
        metadata=api.metadata,
    )
    assert [(e.dependency_kind, e.satisfaction_condition) for e in edges.edges] == [
        ("completion", "upstream_terminal")
    ]
    assert edges.edges[0].flow_id == fid


async def test_resubmit_is_idempotent_by_flow_id(api: Api) -> None:
    fid = str(uuid.uuid4())
    _, ids = await submit(api, "AB", [("A", "B")], flow_id=fid)
    again = await flows(api).SubmitFlow(
        pb.SubmitFlowRequest(flow_id=fid, flow_kind="dag", namespace="ns", members=[member("X")]),
        metadata=api.metadata,
    )
    assert again.WhichOneof("outcome") == "already_submitted"
    assert {m.key: m.execution_id for m in again.already_submitted.members} == ids


def _bad(fid: str, **kw: Any) -> pb.SubmitFlowRequest:
    kw.setdefault("members", [member("A", fid), member("B", fid)])
    return pb.SubmitFlowRequest(flow_id=fid, flow_kind="dag", namespace="ns", **kw)


@pytest.mark.parametrize(
    ("request_kw", "code", "reason"),
    [
        ({"edges": [E(upstream_key="A", downstream_key="B"),
                    E(upstream_key="B", downstream_key="A")]},
         C.FAILED_PRECONDITION, "cycle_detected"),
        ({"edges": [E(upstream_key="A", downstream_key="A")]},
         C.INVALID_ARGUMENT, "self_referencing_edge"),
        ({"members": [member("A"), member("B", join=pb.Join(kind=pb.Join.KIND_QUORUM, quorum=2))],
          "edges": [E(upstream_key="A", downstream_key="B")]},
         C.INVALID_ARGUMENT, "invalid_dependency"),
        ({"edges": [E(upstream_key="A", downstream_key="B", kind=pb.DEPENDENCY_KIND_COMPLETION,
                      data_passing_ref="r")]},
         C.INVALID_ARGUMENT, "invalid_dependency"),
        ({"edges": [E(upstream_key="A", downstream_key="nope")]},
         C.INVALID_ARGUMENT, "invalid_dependency"),
        ({"members": [member("A"), member("A")]}, C.INVALID_ARGUMENT, "invalid_input"),
        ({"members": []}, C.INVALID_ARGUMENT, "invalid_input"),
        ({"members": [member(f"m{i}") for i in range(1001)]}, C.INVALID_ARGUMENT, "invalid_input"),
        ({"members": [member("A", input_payload=b"x" * (1024 * 1024 + 1))]},
         C.INVALID_ARGUMENT, "payload_too_large"),
        ({"members": [member("A", policy_json="{nope")]}, C.INVALID_ARGUMENT,
         "invalid_policy_json"),
        ({"members": [member("A", tags={"Bad": "x"})]}, C.INVALID_ARGUMENT, "invalid_tag_key"),
        ({"edges": [E(upstream_key="A", downstream_key="B", kind=9)]},  # type: ignore[arg-type]
         C.INVALID_ARGUMENT, "invalid_input"),
    ],
)  # fmt: skip
async def test_bad_submissions_change_nothing(
    api: Api, request_kw: dict[str, Any], code: grpc.StatusCode, reason: str
) -> None:
    before = await keyspace_size(api.store)
    await expect_error(
        flows(api).SubmitFlow(_bad(str(uuid.uuid4()), **request_kw), metadata=api.metadata),
        code, reason,
    )  # fmt: skip
    assert await keyspace_size(api.store) == before


async def test_a_member_minted_elsewhere_is_a_partition_mismatch(api: Api) -> None:
    fid = str(uuid.uuid4())
    p = flow_partition(fid, 256)
    eid = f"{{fp:{(p + 1) % 256}}}:{uuid.uuid4()}"
    await expect_error(
        flows(api).SubmitFlow(
            _bad(fid, members=[member("A", execution_id=eid)]), metadata=api.metadata
        ),
        C.INVALID_ARGUMENT, "partition_mismatch",
    )  # fmt: skip


async def create_member(api: Api, fid: str, key: str, blocked: bool = False) -> str:
    reply = await api.execution.CreateExecution(
        epb.CreateExecutionRequest(
            flow_id=fid, lane_id=lane_for(key, fid), execution_kind="step",
            blocked_by_dependencies=blocked,
        ),
        metadata=api.metadata,
    )  # fmt: skip
    return str(reply.created.execution_id)


async def test_incremental_build_without_an_early_claim(api: Api) -> None:
    fx = flows(api)
    fid = str(uuid.uuid4())
    created = await fx.CreateFlow(
        pb.CreateFlowRequest(flow_id=fid, flow_kind="dag", namespace="ns"), metadata=api.metadata
    )
    assert created.WhichOneof("outcome") == "created"
    a = await create_member(api, fid, "A", blocked=True)
    b = await create_member(api, fid, "B", blocked=True)
    assert await state(api, a) == S.PUBLIC_STATE_WAITING_CHILDREN
    again = await fx.AddExecutionToFlow(
        pb.AddExecutionToFlowRequest(flow_id=fid, execution_id=a), metadata=api.metadata
    )
    assert again.already_member.node_count == 2
    added = await fx.AddDependency(
        pb.AddDependencyRequest(flow_id=fid, upstream_execution_id=a, downstream_execution_id=b),
        metadata=api.metadata,
    )
    assert (added.new_graph_revision, added.unsatisfied_count) == (3, 1)
    await expect_error(
        fx.StageDependencyEdge(
            pb.StageDependencyEdgeRequest(flow_id=fid, upstream_execution_id=b,
                                          downstream_execution_id=a, expected_graph_revision=2),
            metadata=api.metadata,
        ),
        C.ABORTED, "stale_graph_revision",
    )  # fmt: skip
    await expect_error(
        fx.AddDependency(
            pb.AddDependencyRequest(
                flow_id=fid, upstream_execution_id=b, downstream_execution_id=a
            ),
            metadata=api.metadata,
        ),
        C.FAILED_PRECONDITION, "cycle_detected",
    )  # fmt: skip
    await expect_error(
        fx.AddDependency(
            pb.AddDependencyRequest(
                flow_id=fid, upstream_execution_id=a, downstream_execution_id=a
            ),
            metadata=api.metadata,
        ),
        C.INVALID_ARGUMENT, "self_referencing_edge",
    )  # fmt: skip
    await expect_error(
        fx.AddDependency(
            pb.AddDependencyRequest(flow_id=fid, edge_id=added.edge_id, upstream_execution_id=a,
                                    downstream_execution_id=b),
            metadata=api.metadata,
        ),
        C.ALREADY_EXISTS, "dependency_already_exists",
    )  # fmt: skip
    await expect_error(
        fx.PromoteBlockedToEligible(
            pb.PromoteBlockedToEligibleRequest(execution_id=b), metadata=api.metadata
        ),
        C.FAILED_PRECONDITION, "deps_not_satisfied",
    )  # fmt: skip
    await fx.PromoteBlockedToEligible(
        pb.PromoteBlockedToEligibleRequest(execution_id=a), metadata=api.metadata
    )
    await run(api, fid, "A")
    assert await state(api, b) == S.PUBLIC_STATE_WAITING
    edge = await fx.DescribeEdge(
        pb.DescribeEdgeRequest(flow_id=fid, edge_id=added.edge_id), metadata=api.metadata
    )
    assert (edge.edge.upstream_execution_id, edge.edge.edge_state) == (a, "pending")
    await expect_error(
        fx.DescribeEdge(
            pb.DescribeEdgeRequest(flow_id=fid, edge_id=str(uuid.uuid4())), metadata=api.metadata
        ),
        C.NOT_FOUND, "edge_not_found",
    )  # fmt: skip


async def test_list_edges_pages_and_tags(api: Api) -> None:
    fid, ids = await submit(api, "ABCD", [("A", "D"), ("B", "D"), ("C", "D")])
    fx = flows(api)
    incoming = t.EdgeDirection(incoming=t.EdgeDirection.Incoming(to_node=ids["D"]))
    seen, token = [], ""
    while True:
        page = await fx.ListEdges(
            pb.ListEdgesRequest(direction=incoming, page_size=2, page_token=token),
            metadata=api.metadata,
        )
        seen += [e.upstream_execution_id for e in page.edges]
        token = page.next_page_token
        if not token:
            break
    assert sorted(seen) == sorted(ids[k] for k in "ABC")
    await expect_error(
        fx.ListEdges(
            pb.ListEdgesRequest(direction=incoming, page_size=1001), metadata=api.metadata
        ),
        C.INVALID_ARGUMENT, "invalid_input",
    )  # fmt: skip
    tagged = await fx.SetFlowTags(
        pb.SetFlowTagsRequest(flow_id=fid, tags={"app.run": "r1"}), metadata=api.metadata
    )
    assert tagged.ok.count == 1
    await expect_error(
        fx.SetFlowTags(
            pb.SetFlowTagsRequest(flow_id=fid, tags={"nodot": "x"}), metadata=api.metadata
        ),
        C.INVALID_ARGUMENT, "invalid_tag_key",
    )  # fmt: skip
    assert dict((await describe(api, fid)).flow.tags) == {"app.run": "r1"}
    await expect_error(
        fx.DescribeFlow(pb.DescribeFlowRequest(flow_id=str(uuid.uuid4())), metadata=api.metadata),
        C.NOT_FOUND, "flow_not_found",
    )  # fmt: skip


async def test_cancel_flow_cancels_members_and_is_repeatable(api: Api) -> None:
    fid, ids = await submit(api, "ABC", [("A", "B")])
    fx = flows(api)
    req = pb.CancelFlowRequest(
        flow_id=fid, reason="stop", cancellation_policy="cancel_all", wait=True
    )
    reply = await fx.CancelFlow(req, metadata=api.metadata)
    assert reply.WhichOneof("outcome") == "cancelled"
    assert sorted(reply.cancelled.member_execution_ids) == sorted(ids.values())
    final = await states(api, ids)
    assert final["A"] == final["C"] == S.PUBLIC_STATE_CANCELLED
    assert final["B"] in (S.PUBLIC_STATE_CANCELLED, S.PUBLIC_STATE_SKIPPED)
    again = await fx.CancelFlow(
        pb.CancelFlowRequest(flow_id=fid, cancellation_policy="other"), metadata=api.metadata
    )
    assert again.cancelled.cancellation_policy == "cancel_all"
    view = await describe(api, fid)
    assert (view.flow.public_flow_state, view.flow.cancel_reason) == ("cancelled", "stop")
    await expect_error(
        api.execution.CreateExecution(
            epb.CreateExecutionRequest(flow_id=fid, execution_kind="k"), metadata=api.metadata
        ),
        C.FAILED_PRECONDITION, "flow_already_terminal",
    )  # fmt: skip


def _fan_out(fid: str, lane: str, width: int) -> pb.SubmitFlowRequest:
    kids = [M(key=f"k{i}", lane_id="kids", execution_kind="step") for i in range(width)]
    return pb.SubmitFlowRequest(
        flow_id=fid, flow_kind="dag", namespace="ns",
        members=[M(key="root", lane_id=lane, execution_kind="step"), *kids],
        edges=[E(upstream_key="root", downstream_key=k.key) for k in kids],
    )  # fmt: skip


async def _complete_the_root_of_a_fan_out(api: Api, partitions: int, width: int) -> list[str]:
    """Submit root -> `width` children, run the root; returns the children's ids."""
    fid = str(uuid.uuid4())
    p = flow_partition(fid, partitions)
    lane = next(f"fan-{n}" for n in range(10_000) if solo_partition(f"fan-{n}", partitions) == p)
    reply = await flows(api).SubmitFlow(_fan_out(fid, lane, width), metadata=api.metadata)
    ids = {m.key: m.execution_id for m in reply.submitted.members}
    task = await claim_one(api, lanes=(lane,))
    await complete(api, task.lease)
    return [eid for key, eid in ids.items() if key != "root"]


async def test_fan_out_past_the_per_call_bound_is_finished_at_once(api: Api) -> None:
    # No scanners run here: only the follow-up the completing call announced can release
    # the 36 children past its bound of 64.
    kids = await _complete_the_root_of_a_fan_out(api, PARTITIONS, 100)

    async def all_released() -> bool:
        return all([await state(api, eid) == S.PUBLIC_STATE_WAITING for eid in kids])

    await eventually(all_released, "the follow-up releases the children past the bound")


async def test_fan_out_past_the_bound_is_finished_by_the_reconciler_when_unannounced(
    engine_api: Api, _session_api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the announcement is pub/sub (at most once): lost (no server on this Valkey acts on
    # it), the reconciler still finishes
    for server in (engine_api.server, _session_api.server):
        monkeypatch.setattr(server.ready, "_on_pending", [])
    kids = await _complete_the_root_of_a_fan_out(engine_api, 16, 70)

    async def all_released() -> bool:
        return all([await state(engine_api, eid) == S.PUBLIC_STATE_WAITING for eid in kids])

    await eventually(all_released, "the reconciler releases the children past the bound")


async def test_a_waiting_claim_is_woken_where_a_flow_member_becomes_claimable(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A member lives on its flow's partition, not on its lane's: the call that makes it
    claimable announces it, the waiting ClaimNext wakes and claims it in its next pass."""
    scheduler = api.server.scheduler
    assert scheduler is not None
    passes: list[int] = []
    claim = scheduler.claim

    async def counted(req: Any) -> Any:
        got = await claim(req)
        passes.append(len(got))
        return got

    monkeypatch.setattr(scheduler, "claim", counted)
    lane = "wake-lane"
    fid = next(
        f for f in (str(uuid.uuid4()) for _ in range(1000))
        if flow_partition(f, PARTITIONS) != solo_partition(lane, PARTITIONS)
    )  # fmt: skip

    async def parked_claim() -> asyncio.Future[wpb.ClaimNextResponse]:
        passes.clear()
        waiting = asyncio.ensure_future(claim_next(api, "w-wake", lanes=(lane,), wait_ms=20_000))
        await eventually(lambda: asyncio.sleep(0, passes), "the claim found nothing and waits")
        return waiting

    waiting = await parked_claim()
    reply = await flows(api).SubmitFlow(
        pb.SubmitFlowRequest(
            flow_id=fid, flow_kind="dag", namespace="ns",
            members=[M(key=k, lane_id=lane, execution_kind="step") for k in "ab"],
            edges=[E(upstream_key="a", downstream_key="b")],
        ),
        metadata=api.metadata,
    )  # fmt: skip
    ids = {m.key: m.execution_id for m in reply.submitted.members}
    task = (await waiting).task
    assert task.lease.execution_id == ids["a"]
    # Woken, and claimed by the next pass (or the one after it: the submit's in-process wake
    # can beat the announcement), never left to the 1 s backstop's passes.
    assert passes[-1] == 1 and len(passes) <= 3, passes
    assert flow_partition(fid, PARTITIONS) in dict(scheduler.hints.of_lane(lane))

    waiting = await parked_claim()
    await complete(api, task.lease)  # another client finishes the parent
    assert (await waiting).task.lease.execution_id == ids["b"]
    assert passes[-1] == 1 and len(passes) <= 3, passes
