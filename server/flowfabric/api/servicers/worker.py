"""WorkerService: claims, lease renewal and every lease-scoped transition (spec 10, spec 50 §3-4).

Terminal calls reconcile a retry after a lost reply in the server (spec 50 §3.3): when the
engine answers `execution_not_active` and its detail shows this caller's own committed
outcome, the success variant is returned with `replayed = true`.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from flowfabric.server.api import limits
from flowfabric.server.api.servicers.base import ServerContext, pending
from flowfabric.server.engine.scheduler import Claimed, ClaimRequest, Scheduler
from flowfabric.server.engine.workstream import StreamClosed, WorkStream
from flowfabric.server.valkey.codec import cancel_source, enum_value, hash_to_dict, text
from flowfabric.server.valkey.errors import FlowFabricError, InvalidInput
from flowfabric.server.valkey.functions import Claimer, Fence, Frame, Functions, Suspension
from flowfabric.server.valkey.functions.execution import DelayReplayed, FailReplayed, Replayed
from flowfabric.server.valkey.functions.stream import Appended
from flowfabric.server.valkey.ids import (
    ExecutionId,
    capabilities_csv,
    parse_uuid,
    validate_identifier,
    validate_lane,
)
from flowfabric.server.valkey.keys import ExecKeys, WaitpointKeys
from flowfabric.server.valkey.records import read_signals, signal_record
from flowfabric.server.valkey.workers import WorkerRegistry
from flowfabric.v1 import types_pb2 as t
from flowfabric.v1 import worker_pb2 as pb
from flowfabric.v1 import worker_pb2_grpc as rpc

R = TypeVar("R")
DEFAULT_LEASE_TTL_MS = 30_000
DEFAULT_GRANT_TTL_MS = 10_000
MAX_GRANT_TTL_MS = 60_000
MAX_WAIT_MS = 30_000
MAX_BATCH = 100
MAX_COMPLETIONS = 1000
MAX_IN_FLIGHT = 1000
MAX_WAITPOINT_KEY_BYTES = 256
REQUESTERS = ("worker", "operator", "policy", "system_timeout_policy")

log = logging.getLogger("flowfabric.rpc")


def waitpoint_id_of(value: str, field: str = "waitpoint_id") -> str:
    """A caller's waitpoint id (a UUID) or a fresh one."""
    return parse_uuid(value, field) if value else str(uuid.uuid4())


def waitpoint_key_of(value: str, waitpoint_id: str) -> str:
    """Opaque label, at most 256 bytes; default `wpk:<waitpoint_id>` (spec 20 §2)."""
    key = value or f"wpk:{waitpoint_id}"
    if len(key.encode()) > MAX_WAITPOINT_KEY_BYTES:
        raise FlowFabricError(
            "invalid_waitpoint_key",
            message=f"waitpoint_key must be at most {MAX_WAITPOINT_KEY_BYTES} bytes",
        )
    return key


def suspension_of(request: pb.SuspendRequest) -> Suspension:
    """Validate a Suspend request's own fields and fill the defaults."""
    if request.use_pending_waitpoint and not request.waitpoint_id:
        raise InvalidInput("waitpoint_id", "use_pending_waitpoint needs the pending waitpoint_id")
    wp = waitpoint_id_of(request.waitpoint_id)
    requested_by = request.requested_by or "worker"
    if requested_by not in REQUESTERS:
        raise InvalidInput("requested_by", f"requested_by must be one of {', '.join(REQUESTERS)}")
    return Suspension(
        suspension_id=validate_identifier(request.suspension_id, "suspension_id")
        if request.suspension_id else str(uuid.uuid4()),
        waitpoint_id=wp,
        waitpoint_key=waitpoint_key_of(request.waitpoint_key, wp),
        reason_code=validate_identifier(request.reason_code or "waiting_for_signal", "reason_code"),
        requested_by=requested_by,
        resume_condition_json=request.resume_condition_json or "{}",
        resume_policy_json=request.resume_policy_json or "{}",
        continuation_metadata_pointer=request.continuation_metadata_pointer,
        timeout_at=request.timeout_at if request.HasField("timeout_at") else None,
        timeout_in_ms=request.timeout_in_ms if request.HasField("timeout_in_ms") else None,
        use_pending_waitpoint=request.use_pending_waitpoint,
        timeout_behavior=request.timeout_behavior,
    )  # fmt: skip


def source_text(source: int, fenced: bool) -> str:
    """Unfenced worker calls must say OPERATOR_OVERRIDE explicitly (UNSPECIFIED is refused)."""
    if source == t.CANCEL_SOURCE_UNSPECIFIED and not fenced:
        raise FlowFabricError(
            "fence_required",
            message="unfenced calls need source = CANCEL_SOURCE_OPERATOR_OVERRIDE",
        )
    return cancel_source(source, "lease_holder")


def task_message(c: Claimed, who: Claimer, lease_ttl_ms: int) -> t.ClaimedTask:
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
    )


@pending(pb.DESCRIPTOR.services_by_name["WorkerService"], "the signals and streams work")
class WorkerServicer(rpc.WorkerServiceServicer):  # type: ignore[misc]
    def __init__(self, ctx: ServerContext, scheduler: Scheduler, registry: WorkerRegistry) -> None:
        self.ctx = ctx
        self.scheduler = scheduler
        self.registry = registry

    @property
    def fn(self) -> Functions:
        return self.ctx.functions

    # -- request decoding ---------------------------------------------------------------------

    def _fenced(self, request: Any) -> tuple[ExecutionId, Fence, int]:
        """Execution, fence and attempt index from the LeaseHandle or the contract fields.

        Epochs start at 1, so a proto3 `lease_epoch` of 0 is "absent": a fence missing only its
        epoch is `partial_fence_triple`, and an empty fence message is no fence at all.
        """
        has_lease = request.HasField("lease")
        has_fence = (
            request.HasField("fence") if "fence" in request.DESCRIPTOR.fields_by_name else False
        )
        if has_lease:
            h = request.lease
            if request.execution_id and request.execution_id != h.execution_id:
                raise InvalidInput("execution_id", "execution_id differs from lease.execution_id")
            eid = self.ctx.execution_id(h.execution_id, "lease.execution_id")
            fence = Fence(h.lease_id, h.lease_epoch or None, h.attempt_id)
            if has_fence and (request.fence.lease_id, request.fence.lease_epoch,
                              request.fence.attempt_id) != (h.lease_id, h.lease_epoch,
                                                            h.attempt_id):  # fmt: skip
                raise InvalidInput("fence", "fence differs from the lease handle")
            return eid, fence, h.attempt_index
        eid = self.ctx.execution_id(request.execution_id)
        if has_fence:
            f = request.fence
            return (
                eid,
                Fence(f.lease_id, f.lease_epoch or None, f.attempt_id),
                request.attempt_index,
            )
        if "lease_id" in request.DESCRIPTOR.fields_by_name:
            fence = Fence(request.lease_id, request.lease_epoch or None, request.attempt_id)
            return eid, fence, 0
        return eid, Fence(), getattr(request, "attempt_index", 0)

    def _claim_request(
        self, request: Any, lanes: list[str], caps: list[str], max_tasks: int
    ) -> ClaimRequest:
        worker_id = validate_identifier(request.worker_id, "worker_id")
        instance = validate_identifier(request.worker_instance_id, "worker_instance_id")
        if not lanes:
            raise InvalidInput("lane_ids", "at least one lane is required")
        for lane in lanes:
            validate_lane(lane, "lane_ids")
        grant_ttl = request.grant_ttl_ms or DEFAULT_GRANT_TTL_MS
        if not 1 <= grant_ttl <= MAX_GRANT_TTL_MS:
            raise InvalidInput("grant_ttl_ms", f"grant_ttl_ms must be 1..{MAX_GRANT_TTL_MS}")
        return ClaimRequest(
            worker_id=worker_id,
            worker_instance_id=instance,
            lanes=tuple(dict.fromkeys(lanes)),
            capabilities_csv=capabilities_csv(caps),
            # ClaimForWorker has no lease TTL (the lease is taken by ClaimFromGrant)
            lease_ttl_ms=getattr(request, "lease_ttl_ms", 0) or DEFAULT_LEASE_TTL_MS,
            grant_ttl_ms=grant_ttl,
            max_tasks=max_tasks,
        )

    # -- worker registry ----------------------------------------------------------------------

    async def RegisterWorker(
        self, request: pb.RegisterWorkerRequest, context: Any
    ) -> pb.RegisterWorkerResponse:
        validate_identifier(request.worker_id, "worker_id")
        validate_identifier(request.worker_instance_id, "worker_instance_id")
        for lane in request.lane_ids:
            validate_lane(lane, "lane_ids")
        caps = capabilities_csv(list(request.capabilities))
        ttl = request.lease_ttl_ms or DEFAULT_LEASE_TTL_MS
        expires = await self.registry.register(
            request.worker_id, request.worker_instance_id, caps, list(request.lane_ids), ttl
        )
        return pb.RegisterWorkerResponse(expires_at=expires, heartbeat_interval_ms=ttl // 3)

    async def Heartbeat(self, request: pb.HeartbeatRequest, context: Any) -> pb.HeartbeatResponse:
        validate_identifier(request.worker_instance_id, "worker_instance_id")
        caps = capabilities_csv(list(request.capabilities))
        ttl = request.lease_ttl_ms or DEFAULT_LEASE_TTL_MS
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

    # -- claims -------------------------------------------------------------------------------

    async def ClaimNext(self, request: pb.ClaimNextRequest, context: Any) -> pb.ClaimNextResponse:
        if request.wait_ms > MAX_WAIT_MS:
            raise InvalidInput("wait_ms", f"wait_ms must be at most {MAX_WAIT_MS}")
        if request.max_tasks > MAX_BATCH:
            raise InvalidInput("max_tasks", f"max_tasks must be at most {MAX_BATCH}")
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
        if request.max_in_flight > MAX_IN_FLIGHT:
            raise InvalidInput("max_in_flight", f"max_in_flight must be at most {MAX_IN_FLIGHT}")
        req = self._claim_request(request, list(request.lane_ids), list(request.capabilities), 1)
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
        if request.grant_ttl_ms == 0:  # no default here: "Grant lifetime, 1..60000 ms"
            raise InvalidInput("grant_ttl_ms", f"grant_ttl_ms must be 1..{MAX_GRANT_TTL_MS}")
        req = self._claim_request(request, [lane], list(request.worker_capabilities), 1)
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
        ttl = request.lease_ttl_ms or DEFAULT_LEASE_TTL_MS
        claimed = await self.scheduler.claim_granted(
            eid, who, ttl, request.lease_id, request.attempt_id
        )
        return pb.ClaimFromGrantResponse(claimed=task_message(claimed, who, ttl))

    # -- lease --------------------------------------------------------------------------------

    async def RenewLease(
        self, request: pb.RenewLeaseRequest, context: Any
    ) -> pb.RenewLeaseResponse:
        eid, fence, attempt_index = self._fenced(request)
        ttl = request.lease_ttl_ms or (request.lease.lease_ttl_ms if request.HasField("lease")
                                        else 0) or DEFAULT_LEASE_TTL_MS  # fmt: skip
        grace = request.lease_history_grace_ms if request.HasField(
            "lease_history_grace_ms") else 5000  # fmt: skip
        reply = await self.fn.lease.renew_lease(eid, attempt_index, fence, ttl, grace)
        renewed = pb.RenewLeaseResponse.Renewed(expires_at=reply.expires_at)
        return pb.RenewLeaseResponse(renewed=renewed)

    async def RenewLeases(
        self, request: pb.RenewLeasesRequest, context: Any
    ) -> pb.RenewLeasesResponse:
        if not request.renewals:
            raise InvalidInput("renewals", "at least one renewal is required")
        if len(request.renewals) > 1000:
            raise InvalidInput("renewals", "at most 1000 renewals per call")

        async def one(item: pb.RenewLeaseRequest) -> pb.RenewLeasesResponse.Result:
            eid_text = item.lease.execution_id if item.HasField("lease") else item.execution_id
            try:
                renewed = await self.RenewLease(item, context)
            except FlowFabricError as exc:
                return pb.RenewLeasesResponse.Result(execution_id=eid_text, error=item_error(exc))
            return pb.RenewLeasesResponse.Result(execution_id=eid_text, renewed=renewed.renewed)

        results = await asyncio.gather(*(one(r) for r in request.renewals))
        return pb.RenewLeasesResponse(results=results)

    async def UpdateProgress(
        self, request: pb.UpdateProgressRequest, context: Any
    ) -> pb.UpdateProgressResponse:
        eid, fence, _ = self._fenced(request)
        pct = request.progress_pct if request.HasField("progress_pct") else None
        if pct is not None and pct > 100:
            raise InvalidInput("progress_pct", "progress_pct must be 0..100")
        await self.fn.execution.update_progress(eid, fence, pct, request.progress_message)
        return pb.UpdateProgressResponse(updated=pb.UpdateProgressResponse.Updated())

    # -- attempt output streams (spec 30 §2.1) --------------------------------------------------

    async def _append(self, request: pb.AppendFrameRequest) -> Appended:
        """One fenced `ff_append_frame`; the payload is passed through as bytes."""
        eid, fence, idx = self._fenced(request)
        if not request.HasField("lease"):
            idx = request.attempt_index
        frame = Frame(
            frame_type=request.frame_type,
            payload=request.payload,
            timestamp=request.timestamp or None,
            encoding=request.encoding,
            metadata_json=request.metadata_json,
            correlation_id=request.correlation_id,
            source=request.source,
            retention_maxlen=request.retention_maxlen
            if request.HasField("retention_maxlen") else None,
            max_payload_bytes=request.max_payload_bytes
            if request.HasField("max_payload_bytes") else None,
        )  # fmt: skip
        return await self.fn.stream.append_frame(eid, idx, fence, frame)

    async def AppendFrame(
        self, request: pb.AppendFrameRequest, context: Any
    ) -> pb.AppendFrameResponse:
        reply = await self._append(request)
        return pb.AppendFrameResponse(
            appended=pb.AppendFrameResponse.Appended(
                entry_id=reply.entry_id, frame_count=reply.frame_count
            )
        )

    async def AppendFrames(self, request_iterator: Any, context: Any) -> pb.AppendFramesResponse:
        """Frames in order, each fenced on its own; the first failure ends the call with that
        frame's error and `appended_count` = frames appended before it."""
        limit = limits.REQUEST_LIMITS["/flowfabric.v1.WorkerService/AppendFrame"]
        out = pb.AppendFramesResponse()
        async for item in request_iterator:
            try:
                if item.ByteSize() > limit:
                    raise FlowFabricError(
                        "payload_too_large",
                        message=f"frame message is {item.ByteSize()} bytes; the limit is {limit}",
                        metadata={"limit_bytes": str(limit)},
                    )
                reply = await self._append(item.frame)
            except FlowFabricError as exc:
                exc.metadata["appended_count"] = str(out.appended_count)
                raise
            out.appended_count += 1
            out.last_entry_id = reply.entry_id
            out.frame_count = reply.frame_count
        return out

    # -- waitpoints and suspension (spec 20 §5.1, §5.2, §5.6, §5.8) ---------------------------

    async def CreatePendingWaitpoint(
        self, request: pb.CreatePendingWaitpointRequest, context: Any
    ) -> pb.CreatePendingWaitpointResponse:
        eid, fence, idx = self._fenced(request)
        if not request.HasField("lease"):
            idx = request.attempt_index
        wp = waitpoint_id_of(request.waitpoint_id)
        key = waitpoint_key_of(request.waitpoint_key, wp)
        if request.expires_in_ms <= 0:
            raise InvalidInput("expires_in_ms", "expires_in_ms is required (> 0)")
        reply = await self.fn.suspension.create_pending_waitpoint(
            eid, fence, idx, wp, key, request.expires_in_ms
        )
        return pb.CreatePendingWaitpointResponse(
            created=pb.CreatePendingWaitpointResponse.Created(
                waitpoint_id=reply.waitpoint_id,
                waitpoint_key=reply.waitpoint_key,
                waitpoint_token=reply.waitpoint_token,
            )
        )

    async def Suspend(self, request: pb.SuspendRequest, context: Any) -> pb.SuspendResponse:
        eid, fence, idx = self._fenced(request)
        s = suspension_of(request)
        if request.HasField("timeout_in_ms") and request.HasField("timeout_at"):
            raise InvalidInput("timeout_in_ms", "give timeout_at or timeout_in_ms, not both")
        try:
            reply = await self.fn.suspension.suspend_execution(eid, fence, idx, s)
        except FlowFabricError as exc:
            if exc.code not in ("execution_not_active", "already_suspended"):
                raise
            stored = await self._own_suspension(eid, idx, s) if request.suspension_id else None
            if stored is None:
                raise
            # a retry after a lost reply: this call's suspension is the stored one
            token = text(
                await self.ctx.store.call(
                    "HGET", WaitpointKeys(eid.tag, s.waitpoint_id).waitpoint, "waitpoint_token"
                )
            )
            done = pb.SuspendResponse.Suspended(
                suspension_id=s.suspension_id, waitpoint_id=s.waitpoint_id,
                waitpoint_key=stored.get("waitpoint_key", ""), waitpoint_token=token,
            )  # fmt: skip
            return pb.SuspendResponse(suspended=done, replayed=True)
        values = {
            "suspension_id": reply.suspension_id, "waitpoint_id": reply.waitpoint_id,
            "waitpoint_key": reply.waitpoint_key, "waitpoint_token": reply.waitpoint_token,
        }  # fmt: skip
        if reply.already_satisfied:
            matched = list(reply.matched_signal_ids)
            records = await read_signals(self.ctx.store, eid, matched)
            return pb.SuspendResponse(
                already_satisfied=pb.SuspendResponse.AlreadySatisfied(**values, signals=records)
            )
        return pb.SuspendResponse(suspended=pb.SuspendResponse.Suspended(**values))

    async def _own_suspension(
        self, eid: ExecutionId, attempt_index: int, s: Suspension
    ) -> dict[str, str] | None:
        """The stored suspension record if it is the one this call (same id, attempt and
        waitpoint) made, else None."""
        raw = await self.ctx.store.call("HGETALL", ExecKeys(eid).suspension_current)
        stored = hash_to_dict(raw)
        mine = (
            stored.get("suspension_id") == s.suspension_id
            and stored.get("attempt_index") == str(attempt_index)
            and stored.get("waitpoint_id") == s.waitpoint_id
        )
        return stored if mine else None

    async def GetResumeSignals(
        self, request: pb.GetResumeSignalsRequest, context: Any
    ) -> pb.GetResumeSignalsResponse:
        eid, _fence, idx = self._fenced(request)
        rows = await self.fn.suspension.read_resume_signals(eid, idx)
        return pb.GetResumeSignalsResponse(
            signals=[signal_record(r.fields, r.payload) for r in rows]
        )

    async def CloseWaitpoint(
        self, request: pb.CloseWaitpointRequest, context: Any
    ) -> pb.CloseWaitpointResponse:
        eid = self.ctx.execution_id(request.execution_id)
        wp = parse_uuid(request.waitpoint_id, "waitpoint_id")
        reason = validate_identifier(request.reason, "reason") if request.reason else ""
        await self.fn.suspension.close_waitpoint(eid, wp, reason)
        return pb.CloseWaitpointResponse(closed=pb.CloseWaitpointResponse.Closed())

    # -- terminal and pausing transitions -----------------------------------------------------

    async def CompleteExecution(
        self, request: pb.CompleteExecutionRequest, context: Any
    ) -> pb.CompleteExecutionResponse:
        eid, fence, _ = self._fenced(request)
        source = source_text(request.source, bool(fence.lease_id))
        reply = await self.fn.execution.complete_execution(
            eid, fence, request.result_payload, request.result_encoding, source
        )
        done = pb.CompleteExecutionResponse.Completed(
            execution_id=str(eid), public_state=t.PUBLIC_STATE_COMPLETED
        )
        return pb.CompleteExecutionResponse(completed=done, replayed=isinstance(reply, Replayed))

    async def CompleteExecutions(
        self, request: pb.CompleteExecutionsRequest, context: Any
    ) -> pb.CompleteExecutionsResponse:
        """Each item through CompleteExecution, concurrently; one result per item, in order.
        With `claim`, then claims as ClaimNext with `wait_ms` = 0 would."""
        if not request.items:
            raise InvalidInput("items", "at least one completion is required")
        if len(request.items) > MAX_COMPLETIONS:
            raise InvalidInput("items", f"at most {MAX_COMPLETIONS} completions per call")
        claim = self._claim_after(request.claim) if request.HasField("claim") else None
        limit = limits.REQUEST_LIMITS["/flowfabric.v1.WorkerService/CompleteExecution"]
        result = pb.CompleteExecutionsResponse.Result

        async def one(item: pb.CompleteExecutionRequest) -> pb.CompleteExecutionsResponse.Result:
            eid_text = item.lease.execution_id if item.HasField("lease") else item.execution_id
            try:
                if item.ByteSize() > limit:
                    raise FlowFabricError(
                        "payload_too_large",
                        message=f"item is {item.ByteSize()} bytes; the limit is {limit}",
                        metadata={"limit_bytes": str(limit)},
                    )
                done = await self.CompleteExecution(item, context)
            except FlowFabricError as exc:
                return result(execution_id=eid_text, error=item_error(exc))
            except Exception:  # as the interceptor does for a whole call: logged, not leaked
                log.exception("unexpected error completing %s in a batch", eid_text)
                internal = FlowFabricError("protocol_error", message="internal error")
                return result(execution_id=eid_text, error=item_error(internal))
            return result(execution_id=eid_text, completed=done)

        results = await asyncio.gather(*(one(item) for item in request.items))
        reply = pb.CompleteExecutionsResponse(results=results)
        if claim is not None:
            await self._claim_into(claim, reply)
        return reply

    def _claim_after(self, claim: pb.ClaimNextRequest) -> ClaimRequest:
        """The claim of a CompleteExecutions, validated before any item runs."""
        if claim.wait_ms:
            raise InvalidInput("claim.wait_ms", "a claim after completions cannot wait")
        if claim.max_tasks > MAX_BATCH:
            raise InvalidInput("claim.max_tasks", f"max_tasks must be at most {MAX_BATCH}")
        lanes, caps = list(claim.lane_ids), list(claim.capabilities)
        return self._claim_request(claim, lanes, caps, max(claim.max_tasks, 1))

    async def _claim_into(self, req: ClaimRequest, reply: pb.CompleteExecutionsResponse) -> None:
        """Claim after the completions committed; a failure is reported, never raised (the
        completions stand)."""
        try:
            claimed = await self.scheduler.claim_next(req, 0)
        except FlowFabricError as exc:
            reply.claim_error.CopyFrom(item_error(exc))
            return
        except Exception:  # as the interceptor does for a whole call: logged, not leaked
            log.exception("unexpected error claiming after completions")
            internal = FlowFabricError("protocol_error", message="internal error")
            reply.claim_error.CopyFrom(item_error(internal))
            return
        who = Claimer(req.worker_id, req.worker_instance_id, "", req.capabilities_csv)
        reply.claimed.extend(task_message(c, who, req.lease_ttl_ms) for c in claimed)

    async def FailExecution(
        self, request: pb.FailExecutionRequest, context: Any
    ) -> pb.FailExecutionResponse:
        eid, fence, _ = self._fenced(request)
        source = source_text(request.source, bool(fence.lease_id))
        retry_after = request.retry_after_ms if request.HasField("retry_after_ms") else None
        if retry_after is not None and request.retry_policy_json:
            raise InvalidInput(
                "retry_after_ms", "retry_after_ms and retry_policy_json are mutually exclusive"
            )
        reply = await self.fn.execution.fail_execution(
            eid, fence, request.failure_reason, request.failure_category, source,
            request.retry_policy_json, retry_after,
        )  # fmt: skip
        replayed = isinstance(reply, FailReplayed)
        if reply.outcome == "retry_scheduled":
            return pb.FailExecutionResponse(
                retry_scheduled=pb.FailExecutionResponse.RetryScheduled(
                    delay_until=reply.delay_until or 0,
                    next_attempt_index=reply.next_attempt_index or 0,
                ),
                replayed=replayed,
            )
        return pb.FailExecutionResponse(
            terminal_failed=pb.FailExecutionResponse.TerminalFailed(), replayed=replayed
        )

    async def CancelLeasedExecution(
        self, request: pb.CancelLeasedExecutionRequest, context: Any
    ) -> pb.CancelLeasedExecutionResponse:
        eid, fence, _ = self._fenced(request)
        if not fence.lease_id:
            raise FlowFabricError("fence_required", message="CancelLeasedExecution needs a fence")
        reply = await self.fn.execution.cancel_execution(eid, request.reason, "lease_holder", fence)
        done = pb.CancelLeasedExecutionResponse.Cancelled(
            execution_id=str(eid), public_state=t.PUBLIC_STATE_CANCELLED
        )
        return pb.CancelLeasedExecutionResponse(
            cancelled=done, replayed=isinstance(reply, Replayed)
        )

    async def DelayExecution(
        self, request: pb.DelayExecutionRequest, context: Any
    ) -> pb.DelayExecutionResponse:
        eid, fence, _ = self._fenced(request)
        source = source_text(request.source, bool(fence.lease_id))
        if request.delay_until <= 0:
            raise InvalidInput("delay_until", "delay_until is required (ms since the epoch)")
        reply = await self.fn.execution.delay_execution(eid, fence, request.delay_until, source)
        done = pb.DelayExecutionResponse.Delayed(
            execution_id=str(eid), public_state=t.PUBLIC_STATE_DELAYED
        )
        return pb.DelayExecutionResponse(delayed=done, replayed=isinstance(reply, DelayReplayed))

    async def MoveToWaitingChildren(
        self, request: pb.MoveToWaitingChildrenRequest, context: Any
    ) -> pb.MoveToWaitingChildrenResponse:
        eid, fence, _ = self._fenced(request)
        source = source_text(request.source, bool(fence.lease_id))
        reply = await self.fn.execution.move_to_waiting_children(eid, fence, source)
        done = pb.MoveToWaitingChildrenResponse.Moved(
            execution_id=str(eid), public_state=t.PUBLIC_STATE_WAITING_CHILDREN
        )
        return pb.MoveToWaitingChildrenResponse(moved=done, replayed=isinstance(reply, Replayed))


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
