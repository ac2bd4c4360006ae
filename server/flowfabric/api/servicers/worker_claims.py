"""WorkerService, part 1: the worker registry and claims (RegisterWorker, Heartbeat,
DeregisterWorker, ClaimNext, StreamWork, ClaimForWorker, ClaimFromGrant), and what every part of
the servicer shares: `WorkerParts` (context, scheduler, registry), the claim request decoder,
the claimed-task encoder and the batch item error."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from flowfabric.server.api import limits
from flowfabric.server.api.limits import bounds
from flowfabric.server.api.servicers.base import ServerContext
from flowfabric.server.engine.scheduler import Claimed, ClaimRequest, Scheduler
from flowfabric.server.engine.workstream import StreamClosed, WorkStream
from flowfabric.server.valkey import tracecontext
from flowfabric.server.valkey.codec import enum_value
from flowfabric.server.valkey.errors import FlowFabricError, InvalidInput
from flowfabric.server.valkey.functions import Claimer, Functions
from flowfabric.server.valkey.ids import capabilities_csv, validate_identifier, validate_lane
from flowfabric.server.valkey.keys import ExecKeys
from flowfabric.server.valkey.workers import WorkerRegistry
from flowfabric.v1 import types_pb2 as t
from flowfabric.v1 import worker_pb2 as pb

DEFAULT_LEASE_TTL_MS = limits.DEFAULT_LEASE_TTL_MS
DEFAULT_GRANT_TTL_MS = limits.DEFAULT_GRANT_TTL_MS
MAX_GRANT_TTL_MS = bounds.GRANT_TTL_MS.hi
MAX_WAIT_MS = bounds.WAIT_MS.hi
MAX_BATCH = bounds.MAX_TASKS.hi
MAX_IN_FLIGHT = bounds.MAX_IN_FLIGHT.hi


def lanes_of(lanes: list[str], field: str = "lane_ids") -> list[str]:
    """A request's lanes: at most LANES, each a valid lane id."""
    limits.check_count(bounds.LANES, len(lanes), field)
    for lane in lanes:
        validate_lane(lane, field)
    return lanes


def task_message(c: Claimed, who: Claimer, lease_ttl_ms: int) -> t.ClaimedTask:
    carrier, link = tracecontext.decode(c.trace_context) if c.trace_context else ({}, False)
    return t.ClaimedTask(
        lease=t.LeaseHandle(
            execution_id=str(c.execution_id),
            lane_id=c.lane_id,
            worker_id=who.worker_id,
            worker_instance_id=who.worker_instance_id,
            attempt_index=c.attempt_index,
            attempt_id=c.attempt_id,
            lease_id=c.lease_id,
            lease_epoch=c.lease_epoch,
            lease_ttl_ms=lease_ttl_ms,
            lease_expires_at=c.lease_expires_at,
        ),
        payload=c.payload,
        payload_encoding=c.payload_encoding,
        execution_kind=c.execution_kind,
        tags=c.tags,
        attempt_type=enum_value(t.AttemptType, c.attempt_type),
        namespace=c.namespace,
        priority=c.priority,
        flow_id=c.flow_id or None,
        resumed=c.resumed,
        trace_context=carrier,
        trace_link=link,
    )


def item_error(exc: FlowFabricError) -> pb.RenewLeasesResponse.ItemError:
    """One batch item's failure: the status the single call would have ended with."""
    status = exc.to_status()
    return pb.RenewLeasesResponse.ItemError(
        code=status.code, reason=exc.code, message=exc.describe(), metadata=_metadata(exc)
    )


def _metadata(exc: FlowFabricError) -> dict[str, str]:
    from google.rpc import error_details_pb2

    info = error_details_pb2.ErrorInfo()
    exc.to_status().details[0].Unpack(info)
    return dict(info.metadata)


class WorkerParts:
    """What every part of the WorkerService servicer shares."""

    def __init__(self, ctx: ServerContext, scheduler: Scheduler, registry: WorkerRegistry) -> None:
        self.ctx = ctx
        self.scheduler = scheduler
        self.registry = registry

    @property
    def fn(self) -> Functions:
        return self.ctx.functions

    def _claim_request(
        self, request: Any, lanes: list[str], caps: list[str], max_tasks: int,
        capped: bool = True,
    ) -> ClaimRequest:  # fmt: skip
        """`capped`: one reply carries every task of a claim pass (ClaimNext and the claim of
        CompleteExecutions), so they are capped by the caller's `max_reply_bytes`."""
        worker_id = validate_identifier(request.worker_id, "worker_id")
        instance = validate_identifier(request.worker_instance_id, "worker_instance_id")
        if not lanes:
            raise InvalidInput("lane_ids", "at least one lane is required")
        lanes_of(lanes)
        grant_ttl = request.grant_ttl_ms or DEFAULT_GRANT_TTL_MS
        limits.check(bounds.GRANT_TTL_MS, grant_ttl, "grant_ttl_ms")
        return ClaimRequest(
            worker_id=worker_id,
            worker_instance_id=instance,
            lanes=tuple(dict.fromkeys(lanes)),
            capabilities_csv=capabilities_csv(caps),
            # ClaimForWorker has no lease TTL (the lease is taken by ClaimFromGrant)
            lease_ttl_ms=limits.lease_ttl(getattr(request, "lease_ttl_ms", 0)),
            grant_ttl_ms=grant_ttl,
            max_tasks=max_tasks,
            max_reply_bytes=reply_budget(request.max_reply_bytes) if capped else None,
        )


def reply_budget(declared: int) -> int:
    """What the tasks of one claim reply may cost (docs/lifecycle.md#claim-reply-size): the
    caller's receive limit, or gRPC's default, less the framing margin."""
    receive = declared or limits.CLIENT_RECEIVE_DEFAULT
    if not limits.CLAIM_REPLY_MIN <= receive <= limits.CLAIM_REPLY_MAX:
        raise InvalidInput(
            "max_reply_bytes",
            f"max_reply_bytes must be 0 (the gRPC default, {limits.CLIENT_RECEIVE_DEFAULT}) or "
            f"{limits.CLAIM_REPLY_MIN}..{limits.CLAIM_REPLY_MAX}",
        )
    return receive - limits.REPLY_MARGIN


class ClaimsMixin(WorkerParts):
    """The worker registry and claims."""

    async def RegisterWorker(
        self, request: pb.RegisterWorkerRequest, context: Any
    ) -> pb.RegisterWorkerResponse:
        validate_identifier(request.worker_id, "worker_id")
        validate_identifier(request.worker_instance_id, "worker_instance_id")
        lanes_of(list(request.lane_ids))
        caps = capabilities_csv(list(request.capabilities))
        ttl = limits.lease_ttl(request.lease_ttl_ms)
        expires = await self.registry.register(
            request.worker_id, request.worker_instance_id, caps, list(request.lane_ids), ttl
        )
        return pb.RegisterWorkerResponse(expires_at=expires, heartbeat_interval_ms=ttl // 3)

    async def Heartbeat(self, request: pb.HeartbeatRequest, context: Any) -> pb.HeartbeatResponse:
        validate_identifier(request.worker_instance_id, "worker_instance_id")
        caps = capabilities_csv(list(request.capabilities))
        ttl = limits.lease_ttl(request.lease_ttl_ms)
        expires = await self.registry.heartbeat(
            request.worker_id, request.worker_instance_id, caps, ttl
        )
        return pb.HeartbeatResponse(expires_at=expires)

    async def DeregisterWorker(
        self, request: pb.DeregisterWorkerRequest, context: Any
    ) -> pb.DeregisterWorkerResponse:
        validate_identifier(request.worker_instance_id, "worker_instance_id")
        existed = await self.registry.deregister(request.worker_instance_id)
        return pb.DeregisterWorkerResponse(was_registered=existed)

    async def ClaimNext(self, request: pb.ClaimNextRequest, context: Any) -> pb.ClaimNextResponse:
        limits.check(bounds.WAIT_MS, request.wait_ms, "wait_ms")
        limits.check(bounds.MAX_TASKS, request.max_tasks, "max_tasks")
        batch = request.max_tasks > 1
        req = self._claim_request(
            request, list(request.lane_ids), list(request.capabilities), max(request.max_tasks, 1)
        )
        claimed = await self.scheduler.claim_next(req, request.wait_ms)
        if not claimed:
            return pb.ClaimNextResponse(no_work=t.NoWork())
        who = Claimer(req.worker_id, req.worker_instance_id, "", req.capabilities_csv)
        tasks = [task_message(c, who, req.lease_ttl_ms) for c in claimed]
        if batch:
            return pb.ClaimNextResponse(batch=pb.ClaimedTaskBatch(tasks=tasks))
        return pb.ClaimNextResponse(task=tasks[0])

    async def StreamWork(
        self, request: pb.StreamWorkRequest, context: Any
    ) -> AsyncIterator[pb.StreamWorkResponse]:
        """Claims on the worker's behalf (ClaimNext's validation and Scheduler pass) and streams
        the tasks, at most `max_in_flight` unfinished at once (engine/workstream.py). Ends with
        UNAVAILABLE `shutting_down` on server stop; a client cancel leaves its tasks leased."""
        limits.check(bounds.MAX_IN_FLIGHT, request.max_in_flight, "max_in_flight")
        # one task per message: no reply cap across tasks
        req = self._claim_request(
            request, list(request.lane_ids), list(request.capabilities), 1, capped=False
        )
        who = Claimer(req.worker_id, req.worker_instance_id, "", req.capabilities_csv)
        stream = WorkStream(
            self.scheduler, self.ctx.store, self.scheduler.hub, req, request.max_in_flight or 1
        )
        try:
            async for claimed in stream.run():
                for c in claimed:
                    yield pb.StreamWorkResponse(task=task_message(c, who, req.lease_ttl_ms))
        except StreamClosed:
            raise FlowFabricError(
                "shutting_down", message="the server is shutting down; resume elsewhere",
                retry_after_ms=1000,
            ) from None  # fmt: skip

    async def ClaimForWorker(
        self, request: pb.ClaimForWorkerRequest, context: Any
    ) -> pb.ClaimForWorkerResponse:
        lane = validate_lane(request.lane_id or "default")
        # no default here: "Grant lifetime, 1..60000 ms"
        limits.check(bounds.GRANT_TTL_MS, request.grant_ttl_ms, "grant_ttl_ms")
        req = self._claim_request(
            request, [lane], list(request.worker_capabilities), 1, capped=False
        )
        who = Claimer(req.worker_id, req.worker_instance_id, lane, req.capabilities_csv,
                      request.capability_hash)  # fmt: skip
        if request.execution_id:
            eid = self.ctx.execution_id(request.execution_id)
            reply = await self.fn.scheduling.issue_claim_grant(eid, who, req.grant_ttl_ms)
        else:
            found = await self.scheduler.grant(req, who)
            if found is None:
                return pb.ClaimForWorkerResponse(no_work=t.NoWork())
            eid, reply = found
        grant = t.ClaimGrant(
            execution_id=str(eid),
            partition_key=eid.tag,
            grant_key=ExecKeys(eid).claim_grant,
            expires_at_ms=reply.grant_expires_at,
        )
        return pb.ClaimForWorkerResponse(
            granted=pb.ClaimForWorkerResponse.Granted(execution_id=str(eid), grant=grant)
        )

    async def ClaimFromGrant(
        self, request: pb.ClaimFromGrantRequest, context: Any
    ) -> pb.ClaimFromGrantResponse:
        validate_identifier(request.worker_id, "worker_id")
        validate_identifier(request.worker_instance_id, "worker_instance_id")
        lane = validate_lane(request.lane_id or "default")
        eid = self.ctx.execution_id(request.grant.execution_id, "grant.execution_id")
        who = Claimer(request.worker_id, request.worker_instance_id, lane)
        ttl = limits.lease_ttl(request.lease_ttl_ms)
        claimed = await self.scheduler.claim_granted(
            eid, who, ttl, request.lease_id, request.attempt_id
        )
        return pb.ClaimFromGrantResponse(claimed=task_message(claimed, who, ttl))
