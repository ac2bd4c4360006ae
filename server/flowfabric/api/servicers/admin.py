"""AdminService: waitpoint HMAC secret rotation and keystore inspection
(docs/suspension.md#kid-rotation),
server information and lane/partition collision analysis (docs/architecture.md#the-sdk-and-cli)."""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from typing import Any

from flowfabric.server.api.limits import check_count
from flowfabric.server.api.servicers.base import ServerContext
from flowfabric.server.config import MAX_GRACE_MS
from flowfabric.server.engine.keystore import ROTATION_DEADLINE_S, audit, rotate_secret
from flowfabric.server.engine.repair import repair_sweep
from flowfabric.server.valkey.bounds import HORIZON_MS, LANES, check
from flowfabric.server.valkey.errors import FlowFabricError, InvalidInput
from flowfabric.server.valkey.functions import Keystore
from flowfabric.server.valkey.ids import is_secret_hex, solo_partition, validate_lane
from flowfabric.server.valkey.keys import PartitionKeys
from flowfabric.v1 import admin_pb2 as pb
from flowfabric.v1 import admin_pb2_grpc as rpc
from flowfabric.v1 import types_pb2 as t

log = logging.getLogger("flowfabric.admin")

REPAIR_MIN_AGE_MS = 3_600_000

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
    check_count(LANES, len(lanes), "lanes")
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


def validate_rotation(request: pb.RotateWaitpointSecretRequest, default_grace_ms: int) -> int:
    """Check a rotation before any partition is touched; returns the grace in ms.

    Error messages never carry the secret."""
    kid = request.new_kid
    if not kid or ":" in kid or len(kid.encode()) > 64 or not kid.isprintable() or " " in kid:
        raise FlowFabricError(
            "invalid_kid", message="new_kid must be 1..64 printable bytes without ':' or spaces"
        )
    hexed = request.new_secret_hex
    if not is_secret_hex(hexed):
        raise FlowFabricError(
            "invalid_secret_hex",
            message="new_secret_hex must be a non-empty even-length hex string",
        )
    grace = request.grace_ms if request.HasField("grace_ms") else default_grace_ms
    if grace > MAX_GRACE_MS:
        raise FlowFabricError("invalid_grace_ms", message=f"grace_ms must be <= {MAX_GRACE_MS}")
    return int(grace)


def _all_failed(codes: dict[str, int]) -> FlowFabricError:
    if set(codes) == {"rotation_conflict"}:
        return FlowFabricError(
            "rotation_conflict",
            message="the kid already exists with another secret on every partition; pick a new kid",
        )
    return FlowFabricError(
        "backend_unavailable",
        message=f"the rotation failed on every partition ({', '.join(sorted(codes))}); "
        "retrying the same rotation is safe",
        retry_after_ms=1000,
    )


class AdminServicer(rpc.AdminServiceServicer):
    def __init__(self, ctx: ServerContext, valkey_version: str) -> None:
        self.ctx = ctx
        self.valkey_version = valkey_version
        self._rotation = asyncio.Lock()  # single-flight: a concurrent rotation fails fast
        self._repair = asyncio.Lock()

    @property
    def keystore(self) -> Keystore:
        return self.ctx.functions.keystore

    async def RotateWaitpointSecret(
        self, request: pb.RotateWaitpointSecretRequest, context: Any
    ) -> pb.RotateWaitpointSecretResponse:
        grace = validate_rotation(request, self.ctx.config.waitpoint_hmac_grace_ms)
        if self._rotation.locked():
            raise FlowFabricError(
                "concurrency_limit",
                message="another waitpoint secret rotation is running; retry when it ends",
                metadata={"pool": "admin_rotate", "max": "1"},
                retry_after_ms=1000,
            )
        async with self._rotation:
            kid, parts = request.new_kid, self.ctx.partitions
            try:
                async with asyncio.timeout(ROTATION_DEADLINE_S):
                    result = await rotate_secret(
                        self.keystore, parts, kid, request.new_secret_hex, grace
                    )
            except TimeoutError:
                audit.error(
                    "waitpoint_hmac_rotation_timeout new_kid=%s timeout_s=%d",
                    kid,
                    ROTATION_DEADLINE_S,
                )
                raise FlowFabricError(
                    "backend_timeout",
                    message=f"the rotation exceeded {ROTATION_DEADLINE_S:.0f} s; retrying the "
                    "same rotation is safe",
                ) from None
        if result.rotated == 0:
            raise _all_failed(dict(result.codes))
        return pb.RotateWaitpointSecretResponse(
            rotated=result.rotated, failed=result.failed, new_kid=kid
        )

    async def ListWaitpointKids(
        self, request: pb.ListWaitpointKidsRequest, context: Any
    ) -> pb.ListWaitpointKidsResponse:
        part = request.partition if request.HasField("partition") else 0
        if part >= self.ctx.partitions:
            raise InvalidInput(
                "partition", f"partition must be < num_flow_partitions ({self.ctx.partitions})"
            )
        listed = await self.keystore.list_kids(PartitionKeys.of(part).tag)
        kids = t.WaitpointHmacKids(
            current_kid=listed.current_kid or None,
            verifying=[t.VerifyingKid(kid=k, expires_at_ms=e) for k, e in listed.verifying],
        )
        return pb.ListWaitpointKidsResponse(partition=part, kids=kids)

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

    async def RepairSweep(
        self, request: pb.RepairSweepRequest, context: Any
    ) -> pb.RepairSweepResponse:
        """docs/architecture.md#repair-sweep; one sweep at a time per server."""
        min_age = request.min_age_ms if request.HasField("min_age_ms") else REPAIR_MIN_AGE_MS
        check(HORIZON_MS, min_age, "min_age_ms")
        if self._repair.locked():
            raise FlowFabricError(
                "concurrency_limit", message="a repair sweep is running; retry when it ends",
                metadata={"pool": "admin_repair", "max": "1"}, retry_after_ms=1000,
            )  # fmt: skip
        async with self._repair:
            report = await repair_sweep(
                self.ctx.store, self.ctx.functions, self.ctx.partitions, min_age
            )
        return pb.RepairSweepResponse(
            scanned=report.scanned, orphans_removed=report.orphans_removed,
            clamped=report.clamped, skipped=report.skipped,
            repaired_execution_ids=report.repaired_ids,
        )  # fmt: skip

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
