"""Flow operations end to end over gRPC, both topologies (docs/flows.md): failure policies,
cancel (inline and through the backlog), replay, data passing, limits, the watch, and the
scanners (docs/flows.md#scanners; `engine_api` runs them at 100 ms)."""

from __future__ import annotations

import asyncio
import itertools
import uuid

import grpc
import pytest

from flowfabric.server.valkey.codec import text
from flowfabric.server.valkey.functions import Functions
from flowfabric.server.valkey.ids import flow_partition, parse_execution_id, solo_partition
from flowfabric.server.valkey.keys import ExecKeys, FlowKeys, PartitionKeys
from flowfabric.v1 import flow_pb2 as pb
from flowfabric.v1 import types_pb2 as t
from tests.api.test_flows import E, describe, flows, lane_for, member, run, states, submit
from tests.api.test_lifecycle import claim_one, complete, eventually, result_of, state
from tests.api.util import expect_error
from tests.conftest import Api

C = grpc.StatusCode
S = t.PublicState
DONE = S.PUBLIC_STATE_COMPLETED
WAITING = S.PUBLIC_STATE_WAITING
BLOCKED = S.PUBLIC_STATE_WAITING_CHILDREN
SKIPPED = S.PUBLIC_STATE_SKIPPED
FAILED = S.PUBLIC_STATE_FAILED
CANCELLED = S.PUBLIC_STATE_CANCELLED


async def cancel(
    api: Api, fid: str, wait: bool, policy: str = "cancel_all"
) -> pb.CancelFlowResponse:
    return await flows(api).CancelFlow(  # type: ignore[no-any-return]
        pb.CancelFlowRequest(flow_id=fid, reason="stop", cancellation_policy=policy, wait=wait),
        metadata=api.metadata,
    )


async def replay(api: Api, fid: str) -> pb.ReplayFlowResponse:
    return await flows(api).ReplayFlow(  # type: ignore[no-any-return]
        pb.ReplayFlowRequest(flow_id=fid, reason="again"), metadata=api.metadata
    )


M = pb.SubmitFlowRequest.Member


def lane16(key: str, fid: str) -> str:
    """As test_flows.lane_for, for `engine_api`'s 16 partitions."""
    p = flow_partition(fid, 16)
    n = 0
    while solo_partition(f"lane-{key}-{n}", 16) != p:
        n += 1
    return f"lane-{key}-{n}"


def tag_of(fid: str, partitions: int = 256) -> str:
    return f"{{fp:{flow_partition(fid, partitions)}}}"


# -- shapes ---------------------------------------------------------------------------------


async def test_a_failure_mid_chain_skips_everything_downstream_and_nothing_else(api: Api) -> None:
    # A -> B -> C -> D -> E, plus A -> X and an unrelated root R
    fid, ids = await submit(
        api, "ABCDEXR", [("A", "B"), ("B", "C"), ("C", "D"), ("D", "E"), ("A", "X")]
    )
    await run(api, fid, "A")
    await run(api, fid, "B")
    await run(api, fid, "C", ok=False)
    assert await states(api, ids) == {
        "A": DONE, "B": DONE, "C": FAILED, "D": SKIPPED, "E": SKIPPED, "X": WAITING,
        "R": WAITING,
    }  # fmt: skip
    await run(api, fid, "X")
    await run(api, fid, "R")
    assert (await describe(api, fid)).flow.public_flow_state == "failed"


async def test_a_hundred_wide_fan_out_and_fan_in(engine_api: Api) -> None:
    api = engine_api
    fid = str(uuid.uuid4())
    mids = [f"m{i}" for i in range(100)]
    lane = lane16("mid", fid)
    reply = await flows(api).SubmitFlow(
        pb.SubmitFlowRequest(
            flow_id=fid, flow_kind="dag", namespace="ns",
            members=[M(key="root", lane_id=lane16("root", fid), execution_kind="s"),
                     M(key="sink", lane_id=lane16("sink", fid), execution_kind="s"),
                     *[pb.SubmitFlowRequest.Member(key=k, lane_id=lane, execution_kind="s")
                       for k in mids]],
            edges=[E(upstream_key="root", downstream_key=k) for k in mids]
            + [E(upstream_key=k, downstream_key="sink") for k in mids],
        ),
        metadata=api.metadata,
    )  # fmt: skip
    ids = {m.key: m.execution_id for m in reply.submitted.members}
    root = await eventually(lambda: _claim(api, lane16("root", fid)), "the root")
    await complete(api, root.lease)
    seen = set()
    for _ in mids:  # past the per-call bound the reconciler releases the rest
        task = await eventually(lambda: _claim(api, lane), "a released middle member")
        seen.add(task.lease.execution_id)
        assert await state(api, ids["sink"]) == BLOCKED
        await complete(api, task.lease)
    assert seen == {ids[k] for k in mids}
    sink = await eventually(lambda: _claim(api, lane16("sink", fid)), "the sink")
    await complete(api, sink.lease)
    assert (await describe(api, fid)).flow.public_flow_state == "completed"


async def _claim(api: Api, lane: str) -> t.ClaimedTask | None:
    from tests.api.test_lifecycle import claim_next

    reply = await claim_next(api, lanes=(lane,))
    return reply.task if reply.WhichOneof("outcome") == "task" else None


# -- failure policies -------------------------------------------------------------------------

# A -> B -> C -> F, A -> D, and an independent root E; B fails.
GRAPH = [("A", "B"), ("B", "C"), ("C", "F"), ("A", "D")]


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("skip_dependents", {"C": SKIPPED, "F": SKIPPED, "D": WAITING, "E": WAITING}),
        ("continue", {"C": SKIPPED, "F": WAITING, "D": WAITING, "E": WAITING}),
        ("fail_fast", {"C": CANCELLED, "F": CANCELLED, "D": CANCELLED, "E": CANCELLED}),
    ],
)
async def test_each_failure_policy_leaves_its_exact_set(
    api: Api, policy: str, expected: dict[str, int]
) -> None:
    fid, ids = await submit(api, "ABCDEF", GRAPH, failure_policy=policy)
    assert (await describe(api, fid)).flow.failure_policy == policy
    await run(api, fid, "A")
    await run(api, fid, "B", ok=False)
    assert await states(api, ids) == {"A": DONE, "B": FAILED, **expected}


async def test_fail_fast_fences_a_running_member(api: Api) -> None:
    fid, ids = await submit(api, "ABE", [("A", "B")], failure_policy="fail_fast")
    running = await claim_one(api, lanes=(lane_for("E", fid),))
    await run(api, fid, "A", ok=False)
    assert await states(api, ids) == {"A": FAILED, "B": CANCELLED, "E": CANCELLED}
    await expect_error(complete(api, running.lease), C.FAILED_PRECONDITION, "execution_not_active")
    view = await describe(api, fid)
    assert view.flow.public_flow_state == "failed"
    assert view.members_by_state == {"failed": 1, "cancelled": 2}


async def test_an_unknown_failure_policy_is_refused_and_writes_nothing(api: Api) -> None:
    fid = str(uuid.uuid4())
    await expect_error(
        flows(api).CreateFlow(
            pb.CreateFlowRequest(flow_id=fid, flow_kind="dag", namespace="ns",
                                 failure_policy="whatever"),
            metadata=api.metadata,
        ),
        C.INVALID_ARGUMENT, "invalid_input",
    )  # fmt: skip
    assert not await api.store.call("EXISTS", FlowKeys(tag_of(fid), fid).core)


# -- data passing -----------------------------------------------------------------------------


async def test_the_child_claims_the_parents_result_as_its_input(api: Api) -> None:
    fid = str(uuid.uuid4())
    reply = await flows(api).SubmitFlow(
        pb.SubmitFlowRequest(
            flow_id=fid, flow_kind="dag", namespace="ns",
            members=[member("A", fid), member("B", fid, input_payload=b"original"),
                     member("C", fid, input_payload=b"mine")],
            edges=[E(upstream_key="A", downstream_key="B", data_passing_ref="result"),
                   E(upstream_key="A", downstream_key="C")],
        ),
        metadata=api.metadata,
    )  # fmt: skip
    assert reply.WhichOneof("outcome") == "submitted"
    parent = await claim_one(api, lanes=(lane_for("A", fid),))
    await complete(api, parent.lease, b"\x00R-from-A")
    child = await claim_one(api, lanes=(lane_for("B", fid),))
    assert child.payload == b"\x00R-from-A"
    other = await claim_one(api, lanes=(lane_for("C", fid),))
    assert other.payload == b"mine"


# -- cancel ---------------------------------------------------------------------------------


async def _wide(api: Api, n: int) -> tuple[str, list[str]]:
    """A flow of `n` members without edges, on lane `lane_for("wide", fid)`."""
    fid = str(uuid.uuid4())
    lane = lane_for("wide", fid)
    reply = await flows(api).SubmitFlow(
        pb.SubmitFlowRequest(
            flow_id=fid, flow_kind="dag", namespace="ns",
            members=[pb.SubmitFlowRequest.Member(key=f"m{i}", lane_id=lane,
                                                 execution_kind="s") for i in range(n)],
        ),
        metadata=api.metadata,
    )  # fmt: skip
    return fid, [m.execution_id for m in reply.submitted.members]


async def test_cancel_flow_wait_cancels_a_thousand_members_and_fences_the_running(
    api: Api,
) -> None:
    fid, ids = await _wide(api, 1000)
    running = await claim_one(api, lanes=(lane_for("wide", fid),))
    reply = await cancel(api, fid, wait=True)
    assert reply.WhichOneof("outcome") == "cancelled"
    assert sorted(reply.cancelled.member_execution_ids) == sorted(ids)
    view = await describe(api, fid)
    assert view.members_by_state == {"cancelled": 1000}
    assert view.flow.public_flow_state == "cancelled"
    await expect_error(complete(api, running.lease), C.FAILED_PRECONDITION, "execution_not_active")
    keys = FlowKeys(tag_of(fid), fid)
    assert not await api.store.call("EXISTS", keys.pending_cancels)
    assert await api.store.call("ZSCORE", PartitionKeys(tag_of(fid)).cancel_backlog, fid) is None


async def test_cancel_flow_without_wait_is_scheduled_and_drained(api: Api) -> None:
    fid, _ids = await _wide(api, 300)
    reply = await cancel(api, fid, wait=False)
    assert reply.WhichOneof("outcome") == "cancellation_scheduled"
    assert reply.cancellation_scheduled.member_count == 300

    async def drained() -> bool:
        return (await describe(api, fid)).members_by_state == {"cancelled": 300}

    await eventually(drained, "the background drain cancels every member")
    keys = FlowKeys(tag_of(fid), fid)
    assert not await api.store.call("EXISTS", keys.pending_cancels)


async def test_cancel_with_other_policies_only_marks_the_flow(api: Api) -> None:
    fid, ids = await submit(api, "AB", [("A", "B")])
    reply = await cancel(api, fid, wait=False, policy="let_active_finish")
    assert reply.WhichOneof("outcome") == "cancelled"
    assert await states(api, ids) == {"A": WAITING, "B": BLOCKED}
    assert not await api.store.call("EXISTS", FlowKeys(tag_of(fid), fid).pending_cancels)


async def test_a_member_whose_cancel_cannot_succeed_is_reported_and_retried_boundedly(
    api: Api,
) -> None:
    fid, ids = await _wide(api, 3)
    bad = sorted(ids)[1]
    # a corrupt member: its core is not a hash, so every cancel of it raises
    core = _eid(bad).core
    await api.store.call("DEL", core)
    await api.store.call("SET", core, "garbage")
    reply = await cancel(api, fid, wait=True)
    assert reply.WhichOneof("outcome") == "partially_cancelled"
    assert list(reply.partially_cancelled.failed_member_execution_ids) == [bad]
    for eid in ids:
        if eid != bad:
            assert await state(api, eid) == CANCELLED
    tag = tag_of(fid)
    keys = FlowKeys(tag, fid)
    assert [text(m) for m in await api.store.call("SMEMBERS", keys.pending_cancels)] == [bad]
    assert text(await api.store.call("HGET", keys.cancel_attempts, bad)) == "1"
    # the reconciler's retries are bounded: after 3 failed attempts the member is dropped
    canceller = api.server.canceller
    assert canceller is not None
    for _ in range(2):
        assert await canceller.drain(tag, fid, [bad]) == [bad]
    assert not await api.store.call("EXISTS", keys.pending_cancels)
    assert await api.store.call("ZSCORE", PartitionKeys(tag).cancel_backlog, fid) is None


async def test_replay_of_a_failed_branch_keeps_the_completed_ones(api: Api) -> None:
    # A -> B -> C, A -> D: B fails, C is skipped, D completes.
    fid, ids = await submit(api, "ABCD", [("A", "B"), ("B", "C"), ("A", "D")])
    await run(api, fid, "A")
    await run(api, fid, "B", ok=False)
    await run(api, fid, "D")
    assert (await describe(api, fid)).flow.public_flow_state == "failed"
    reply = await replay(api, fid)
    assert reply.WhichOneof("outcome") == "replayed"
    assert sorted(reply.replayed.execution_ids) == sorted([ids["B"], ids["C"]])
    assert reply.replayed.reopened_edge_count == 1  # B -> C; A -> B stays satisfied
    assert await states(api, ids) == {"A": DONE, "B": WAITING, "C": BLOCKED, "D": DONE}
    assert await result_of(api, ids["A"]) == b"ok"
    await run(api, fid, "B")
    await run(api, fid, "C")
    assert (await describe(api, fid)).flow.public_flow_state == "completed"
    again = await replay(api, fid)
    assert again.nothing_to_replay.public_flow_state == "completed"


async def test_replay_reopens_a_cancelled_flow(api: Api) -> None:
    fid, ids = await submit(api, "AB", [("A", "B")])
    await cancel(api, fid, wait=True)
    reply = await replay(api, fid)
    assert sorted(reply.replayed.execution_ids) == sorted(ids.values())
    view = await describe(api, fid)
    assert view.flow.public_flow_state == "open"
    assert not view.flow.HasField("cancelled_at")
    assert await states(api, ids) == {"A": WAITING, "B": BLOCKED}
    await run(api, fid, "A")
    await run(api, fid, "B")
    assert (await describe(api, fid)).flow.public_flow_state == "completed"


async def test_replay_of_an_unknown_flow_is_not_found(api: Api) -> None:
    await expect_error(replay(api, str(uuid.uuid4())), C.NOT_FOUND, "flow_not_found")


# -- limits ---------------------------------------------------------------------------------


async def test_a_chain_past_the_depth_bound_is_refused_with_the_limit(api: Api) -> None:
    fid = str(uuid.uuid4())
    keys = [f"n{i}" for i in range(257)]
    req = pb.SubmitFlowRequest(
        flow_id=fid, flow_kind="dag", namespace="ns",
        members=[pb.SubmitFlowRequest.Member(key=k, execution_kind="s") for k in keys],
        edges=[E(upstream_key=a, downstream_key=b) for a, b in itertools.pairwise(keys)],
    )  # fmt: skip
    err = await expect_error(
        flows(api).SubmitFlow(req, metadata=api.metadata),
        C.FAILED_PRECONDITION, "flow_limit_exceeded",
    )  # fmt: skip
    assert (err.metadata["limit"], err.metadata["max"]) == ("FLOW_DEPTH_MAX", "256")
    assert not await api.store.call("EXISTS", FlowKeys(tag_of(fid), fid).core)
    del req.members[-1]
    del req.edges[-1]
    ok = await flows(api).SubmitFlow(req, metadata=api.metadata)
    assert ok.WhichOneof("outcome") == "submitted"


# -- watch ----------------------------------------------------------------------------------


async def test_watch_flow_streams_the_flow_and_its_members_to_the_end(api: Api) -> None:
    fid, ids = await submit(api, "AB", [("A", "B")])
    stream = flows(api).WatchFlow(pb.WatchFlowRequest(flow_id=fid), metadata=api.metadata)
    got: list[pb.WatchFlowResponse] = []

    async def read() -> None:
        async for message in stream:
            got.append(message)

    reader = asyncio.create_task(read())
    await eventually(lambda: _has(got, "synced"), "the opening read")
    opening = [m.WhichOneof("event") for m in got]
    assert opening[0] == "flow" and opening[-1] == "synced"
    members = {(m.member.execution_id, m.member.public_state) for m in got if m.HasField("member")}
    assert members == {(ids["A"], WAITING), (ids["B"], BLOCKED)}
    await run(api, fid, "A")
    await run(api, fid, "B")
    await asyncio.wait_for(reader, 10)
    last = {}
    for m in got:
        if m.HasField("member"):
            last[m.member.execution_id] = m.member.public_state
    assert last == {ids["A"]: DONE, ids["B"]: DONE}
    flows_seen = [m.flow.flow.public_flow_state for m in got if m.HasField("flow")]
    assert flows_seen[-1] == "completed"
    pairs = [(m.member.execution_id, m.member.public_state) for m in got if m.HasField("member")]
    assert len(pairs) == len(set(pairs)), "no state is sent twice"


async def _has(got: list[pb.WatchFlowResponse], which: str) -> bool:
    return any(m.WhichOneof("event") == which for m in got)


async def test_watch_of_an_unknown_flow_is_not_found(api: Api) -> None:
    stream = flows(api).WatchFlow(
        pb.WatchFlowRequest(flow_id=str(uuid.uuid4())), metadata=api.metadata
    )

    async def first() -> None:
        async for _ in stream:
            break

    await expect_error(first(), C.NOT_FOUND, "flow_not_found")


# -- scanners -------------------------------------------------------------------------------


async def test_cancel_reconciler_drains_a_backlog_no_server_dispatched(engine_api: Api) -> None:
    api = engine_api
    fid, _ids = await _wide(api, 120)
    tag = f"{{fp:{flow_partition(fid, 16)}}}"
    fn = Functions(api.store)
    # the function alone: the backlog is recorded, nobody dispatches it
    await fn.flow.cancel_flow(tag, fid, "stop", "cancel_all", 0)
    assert await api.store.call("SCARD", FlowKeys(tag, fid).pending_cancels) == 120

    async def drained() -> bool:
        return (await describe(api, fid)).members_by_state == {"cancelled": 120}

    await eventually(drained, "the cancel reconciler cancels every owed member")
    assert await api.store.call("ZSCORE", PartitionKeys(tag).cancel_backlog, fid) is None


async def test_dependency_reconciler_pages_past_members_that_stay_blocked(
    engine_api: Api,
) -> None:
    api = engine_api
    # 150 members blocked on a live root fill the first pages of the lane's index; a member
    # created later, blocked with no edges, sorts after them and is reached only by paging.
    fid2 = str(uuid.uuid4())
    kids = [pb.SubmitFlowRequest.Member(key=f"k{i}", lane_id="held", execution_kind="s")
            for i in range(150)]  # fmt: skip
    await flows(api).SubmitFlow(
        pb.SubmitFlowRequest(
            flow_id=fid2, flow_kind="dag", namespace="ns",
            members=[pb.SubmitFlowRequest.Member(key="root", lane_id="held-root",
                                                 execution_kind="s"), *kids],
            edges=[E(upstream_key="root", downstream_key=k.key) for k in kids],
        ),
        metadata=api.metadata,
    )  # fmt: skip
    from tests.api.test_lifecycle import create

    late = await create(api, flow_id=fid2, lane_id="held", blocked_by_dependencies=True)
    await eventually(
        lambda: _is(api, late, WAITING), "the reconciler reaches and releases the late member"
    )


async def _is(api: Api, eid: str, public: int) -> bool:
    return await state(api, eid) == public


async def test_flow_projector_repairs_a_drifted_counter(engine_api: Api) -> None:
    api = engine_api
    fid = str(uuid.uuid4())
    await flows(api).SubmitFlow(
        pb.SubmitFlowRequest(
            flow_id=fid, flow_kind="dag", namespace="ns",
            members=[pb.SubmitFlowRequest.Member(key="a", execution_kind="s")],
        ),
        metadata=api.metadata,
    )  # fmt: skip
    core = FlowKeys(f"{{fp:{flow_partition(fid, 16)}}}", fid).core
    await api.store.call("HSET", core, "members_waiting", "7", "members_failed", "3")

    async def repaired() -> bool:
        raw = await api.store.call("HMGET", core, "members_waiting", "members_failed")
        return [text(v) for v in raw] == ["1", "0"]

    await eventually(repaired, "the projector recounts every member")
    assert (await describe(api, fid)).flow.public_flow_state == "open"


def _eid(value: str) -> ExecKeys:
    return ExecKeys(parse_execution_id(value, 1 << 16))
