"""Batched Functions (docs/lifecycle.md#batched-functions): RenewLeases and CompleteExecutions run
one FCALL per partition touched, AppendFrames one per run of frames; each item is still fenced,
checked and answered on its own, in request order, and a refused item changes nothing (both
topologies). The FCALLs are counted from Valkey's `INFO commandstats`, never timed."""

from __future__ import annotations

import grpc

from flowfabric.server.valkey.errors import FlowFabricError
from flowfabric.server.valkey.functions import Fence, Frame, Functions
from flowfabric.server.valkey.ids import ExecutionId, parse_execution_id, solo_partition
from flowfabric.server.valkey.store import Store
from flowfabric.v1 import types_pb2 as t
from flowfabric.v1 import worker_pb2 as wpb
from tests.api.test_lifecycle import claim_one, core, create, result_of, with_epoch
from tests.api.util import expect_error
from tests.conftest import Api

PARTITIONS = 256  # the default flow partition count the test server runs with
LANE_A = "batch-a"
# A second lane whose solo executions live on another partition than LANE_A's.
LANE_B = next(
    f"batch-b{i}"
    for i in range(100)
    if solo_partition(f"batch-b{i}", PARTITIONS) != solo_partition(LANE_A, PARTITIONS)
)
BAD_ID = "not-an-execution-id"


async def fcalls(store: Store) -> int:
    """FCALLs served so far, on every primary."""
    nodes = store.client.get_primaries() if store.cluster else [None]
    total = 0
    for node in nodes:
        kw = {"target_nodes": node} if node is not None else {}
        stats = await store.client.execute_command("INFO", "commandstats", **kw)
        if isinstance(stats, bytes | str):
            text = stats.decode() if isinstance(stats, bytes) else stats
            line = next((ln for ln in text.splitlines() if ln.startswith("cmdstat_fcall:")), "")
            calls = int(line.split("calls=")[1].split(",")[0]) if line else 0
        else:
            calls = int(stats.get("cmdstat_fcall", {}).get("calls", 0))
        total += calls
    return total


async def leased(api: Api, lane: str, n: int) -> list[t.LeaseHandle]:
    for _ in range(n):
        await create(api, lane_id=lane)
    return [(await claim_one(api, lanes=(lane,))).lease for _ in range(n)]


async def test_renew_batch_one_fcall_per_partition_each_item_its_own_outcome(api: Api) -> None:
    a1, a2 = await leased(api, LANE_A, 2)
    (b1,) = await leased(api, LANE_B, 1)
    stale = with_epoch(a2, a2.lease_epoch + 1)
    before_a2 = await core(api, a2.execution_id)
    items = [
        wpb.RenewLeaseRequest(lease=a1, lease_ttl_ms=60_000),
        wpb.RenewLeaseRequest(lease=stale, lease_ttl_ms=60_000),  # fenced out in Lua
        wpb.RenewLeaseRequest(lease=b1, lease_ttl_ms=10**12),  # invalid at the edge
        wpb.RenewLeaseRequest(execution_id=BAD_ID, lease_ttl_ms=60_000),  # invalid id
        wpb.RenewLeaseRequest(lease=b1, lease_ttl_ms=60_000),
    ]
    calls = await fcalls(api.store)
    reply = await api.worker.RenewLeases(
        wpb.RenewLeasesRequest(renewals=items), metadata=api.metadata
    )
    assert await fcalls(api.store) - calls == 2  # partitions of LANE_A and LANE_B
    got = [(r.execution_id, r.WhichOneof("outcome"), r.error.reason) for r in reply.results]
    assert got == [
        (a1.execution_id, "renewed", ""),
        (a2.execution_id, "error", "stale_lease"),
        (b1.execution_id, "error", "invalid_input"),
        (BAD_ID, "error", "invalid_input"),
        (b1.execution_id, "renewed", ""),
    ]
    assert await core(api, a2.execution_id) == before_a2  # the fenced-out item changed nothing
    assert (await core(api, a1.execution_id))[b"lease_expires_at"] == str(
        reply.results[0].renewed.expires_at
    ).encode()


async def test_complete_batch_one_fcall_per_partition_with_replays_and_refusals(
    api: Api,
) -> None:
    a1, a2 = await leased(api, LANE_A, 2)
    (b1,) = await leased(api, LANE_B, 1)
    before_a2 = await core(api, a2.execution_id)
    items = [
        wpb.CompleteExecutionRequest(lease=a1, result_payload=b"a1"),
        wpb.CompleteExecutionRequest(lease=with_epoch(a2, 99), result_payload=b"x"),  # stale
        wpb.CompleteExecutionRequest(execution_id=BAD_ID, result_payload=b"x"),  # invalid
        wpb.CompleteExecutionRequest(lease=b1, result_payload=b"b1"),
        wpb.CompleteExecutionRequest(lease=a1, result_payload=b"a1"),  # sent twice: a replay
    ]
    calls = await fcalls(api.store)
    reply = await api.worker.CompleteExecutions(
        wpb.CompleteExecutionsRequest(items=items), metadata=api.metadata
    )
    assert await fcalls(api.store) - calls == 2
    got = [
        (r.execution_id, r.WhichOneof("outcome"), r.error.reason, r.completed.replayed)
        for r in reply.results
    ]
    assert got == [
        (a1.execution_id, "completed", "", False),
        (a2.execution_id, "error", "stale_lease", False),
        (BAD_ID, "error", "invalid_input", False),
        (b1.execution_id, "completed", "", False),
        (a1.execution_id, "completed", "", True),
    ]
    assert await result_of(api, a1.execution_id) == b"a1"
    assert await result_of(api, b1.execution_id) == b"b1"
    assert await core(api, a2.execution_id) == before_a2


async def test_append_batch_is_one_fcall_and_stops_at_the_first_bad_frame(api: Api) -> None:
    (h,) = await leased(api, LANE_A, 1)
    eid = parse_execution_id(h.execution_id, PARTITIONS)
    fence = Fence(h.lease_id, h.lease_epoch, h.attempt_id)
    fn = Functions(api.store)

    def frame(kind: str, payload: bytes = b"p") -> tuple[ExecutionId, int, Fence, Frame]:
        return (eid, h.attempt_index, fence, Frame(frame_type=kind, payload=payload))

    calls = await fcalls(api.store)
    replies = await fn.stream.append_frames([frame("out"), frame("out"), frame(""), frame("out")])
    assert await fcalls(api.store) - calls == 1
    assert [type(r).__name__ for r in replies] == ["Appended", "Appended", "FlowFabricError"]
    assert isinstance(replies[2], FlowFabricError) and replies[2].code == "invalid_frame_type"
    assert [getattr(r, "frame_count", None) for r in replies[:2]] == [1, 2]
    # the frame after the bad one was not appended: the stream holds the first two only
    read = await api.worker.AppendFrames(
        iter([wpb.AppendFramesRequest(frame=wpb.AppendFrameRequest(
            lease=h, frame_type="out", payload=b"q"))]),
        metadata=api.metadata,
    )  # fmt: skip
    assert (read.appended_count, read.frame_count) == (1, 3)


async def test_append_frames_stream_reports_the_failing_frame_and_appends_none_after(
    api: Api,
) -> None:
    (h,) = await leased(api, LANE_A, 1)

    def msg(kind: str) -> wpb.AppendFramesRequest:
        return wpb.AppendFramesRequest(
            frame=wpb.AppendFrameRequest(lease=h, frame_type=kind, payload=b"p")
        )

    stale = wpb.AppendFramesRequest(
        frame=wpb.AppendFrameRequest(lease=with_epoch(h, 99), frame_type="out", payload=b"p")
    )
    info = await expect_error(
        api.worker.AppendFrames(
            iter([msg("out"), msg("out"), stale, msg("out")]), metadata=api.metadata
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "stale_owner_cannot_append",
    )
    assert info.metadata["appended_count"] == "2"
    tail = await api.worker.AppendFrames(iter([msg("out")]), metadata=api.metadata)
    assert tail.frame_count == 3  # two before the stale frame, none after it, plus this one
