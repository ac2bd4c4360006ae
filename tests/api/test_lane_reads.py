"""Lane depth reads (flowfabric.server.valkey.lane_reads): counts by state equal the ZCARDs of
the lane's indexes summed over the partitions whose registry names it, and the head's
eligible-since time is decoded from the eligible score, on both topologies."""

from __future__ import annotations

import time

from flowfabric.server.valkey.keys import PartitionKeys
from flowfabric.server.valkey.lane_reads import LANE_STATES, eligible_since, lane_depths
from flowfabric.v1 import execution_pb2 as pb
from tests.conftest import Api

PARTS = range(8)


async def test_depth_by_state_sums_the_partitions_that_hold_the_lane(api: Api) -> None:
    before = int(time.time() * 1000)
    later = before + 3_600_000
    reqs = [
        pb.CreateExecutionRequest(execution_kind="k", lane_id="depth-a", partition_id=1),
        pb.CreateExecutionRequest(execution_kind="k", lane_id="depth-a", partition_id=2,
                                  priority=5),
        pb.CreateExecutionRequest(execution_kind="k", lane_id="depth-a", partition_id=2,
                                  delay_until=later),
        pb.CreateExecutionRequest(execution_kind="k", lane_id="depth-b", partition_id=3),
    ]  # fmt: skip
    for r in reqs:
        await api.execution.CreateExecution(r, metadata=api.metadata)
    depths = await lane_depths(api.store, PARTS)
    a, b = depths["depth-a"], depths["depth-b"]
    assert a.counts["eligible"] == 2 and a.counts["delayed"] == 1
    assert sorted(a.partitions) == [1, 2] and b.partitions == [3]
    assert b.counts["eligible"] == 1 and b.blocked == 0
    for depth in (a, b):
        for state in LANE_STATES:
            want = 0
            for p in depth.partitions:
                want += await api.store.call("ZCARD", PartitionKeys.of(p).lane(depth.lane, state))
            assert depth.counts[state] == want, state
    after = int(time.time() * 1000)
    assert a.head_eligible_since_ms is not None
    assert before - 1000 <= a.head_eligible_since_ms <= after + 1000
    assert a.head_age_ms(after + 10_000) >= 10_000
    only = await lane_depths(api.store, PARTS, lanes=["depth-b", "nowhere"])
    assert set(only) == {"depth-b", "nowhere"}
    assert only["nowhere"].partitions == [] and only["nowhere"].head_eligible_since_ms is None


def test_eligible_since_recovers_the_time_under_any_priority() -> None:
    now = 1_790_000_000_000
    for priority in (0, 1, 5, 9000):
        for since in (now - 86_400_000, now - 5, now):
            assert eligible_since(-(priority * 10**12) + since, now) == since
