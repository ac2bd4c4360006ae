"""AdminService: server information and lane/partition collision analysis (spec 50 §2.8)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from flowfabric.server.errors import InvalidInput
from flowfabric.server.ids import solo_partition, validate_lane
from flowfabric.server.servicers.base import ServerContext, pending
from flowfabric.v1 import admin_pb2 as pb
from flowfabric.v1 import admin_pb2_grpc as rpc

SERVER_VERSION = "0.1.0"


def collision_severity(colliding: int, total: int) -> int:
    """Clean (0), Watch (< 5 %), Elevated (5 %..15 % inclusive), Remediate (> 15 %)."""
    if colliding == 0:
        return pb.COLLISION_SEVERITY_CLEAN
    share = colliding / total
    if share < 0.05:
        return pb.COLLISION_SEVERITY_WATCH
    if share <= 0.15:
        return pb.COLLISION_SEVERITY_ELEVATED
    return pb.COLLISION_SEVERITY_REMEDIATE


def partition_collisions(
    lanes: list[str], partitions: int
) -> tuple[list[pb.PartitionCollisionsResponse.LanePartition], int]:
    if len(set(lanes)) != len(lanes):
        raise InvalidInput("lanes", "duplicate lane names")
    for lane in lanes:
        validate_lane(lane, "lanes")
    by_partition: dict[int, list[str]] = defaultdict(list)
    for lane in lanes:
        by_partition[solo_partition(lane, partitions)].append(lane)
    rows = []
    colliding = 0
    for part in sorted(by_partition):
        group = sorted(by_partition[part])
        if len(group) > 1:
            colliding += len(group)
        for lane in group:
            others = [o for o in group if o != lane]
            rows.append(
                pb.PartitionCollisionsResponse.LanePartition(
                    lane=lane, partition=part, collides_with=others
                )
            )
    return rows, collision_severity(colliding, max(len(lanes), 1))


@pending(
    pb.DESCRIPTOR.services_by_name["AdminService"], "the suspension and signals work (issue 6)"
)
class AdminServicer(rpc.AdminServiceServicer):  # type: ignore[misc]
    def __init__(self, ctx: ServerContext, valkey_version: str) -> None:
        self.ctx = ctx
        self.valkey_version = valkey_version

    async def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: Any
    ) -> pb.GetServerInfoResponse:
        cfg = self.ctx.config
        return pb.GetServerInfoResponse(
            server_version=SERVER_VERSION,
            library_version=self.ctx.store.library.version,
            valkey_version=self.valkey_version,
            num_flow_partitions=cfg.flow_partitions,
            num_budget_partitions=cfg.budget_partitions,
            num_quota_partitions=cfg.quota_partitions,
            lanes=list(cfg.lanes),
        )

    async def PartitionCollisions(
        self, request: pb.PartitionCollisionsRequest, context: Any
    ) -> pb.PartitionCollisionsResponse:
        lanes = list(request.lanes) or list(self.ctx.config.lanes)
        partitions = (
            request.num_flow_partitions
            if request.HasField("num_flow_partitions")
            else self.ctx.partitions
        )
        if partitions == 0:
            raise InvalidInput("num_flow_partitions", "num_flow_partitions must be > 0")
        rows, severity = partition_collisions(lanes, partitions)
        return pb.PartitionCollisionsResponse(lanes=rows, severity=severity)  # type: ignore[arg-type]
