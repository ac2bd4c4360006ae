"""WorkerService, part 3: waitpoints and suspension (CreatePendingWaitpoint, Suspend,
GetResumeSignals, CloseWaitpoint; docs/suspension.md)."""

from __future__ import annotations

import uuid
from typing import Any

from flowfabric.server.api import fences, limits
from flowfabric.server.api.limits import bounds
from flowfabric.server.api.servicers.worker_claims import WorkerParts
from flowfabric.server.valkey.codec import hash_to_dict, text
from flowfabric.server.valkey.errors import FlowFabricError, InvalidInput
from flowfabric.server.valkey.functions import Suspension
from flowfabric.server.valkey.ids import ExecutionId, parse_uuid, validate_identifier
from flowfabric.server.valkey.keys import ExecKeys, WaitpointKeys
from flowfabric.server.valkey.records import read_signals, signal_record
from flowfabric.v1 import worker_pb2 as pb

MAX_WAITPOINT_KEY_BYTES = 256
REQUESTERS = ("worker", "operator", "policy", "system_timeout_policy")


def waitpoint_id_of(value: str, field: str = "waitpoint_id") -> str:
    """A caller's waitpoint id (a UUID) or a fresh one."""
    return parse_uuid(value, field) if value else str(uuid.uuid4())


def waitpoint_key_of(value: str, waitpoint_id: str) -> str:
    """Opaque label, at most 256 bytes; default `wpk:<waitpoint_id>`."""
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
        timeout_at=limits.optional(bounds.TIMESTAMP_MS, request, "timeout_at"),
        timeout_in_ms=limits.optional(bounds.HORIZON_MS, request, "timeout_in_ms"),
        use_pending_waitpoint=request.use_pending_waitpoint,
        timeout_behavior=request.timeout_behavior,
    )  # fmt: skip


class SuspensionMixin(WorkerParts):
    """Waitpoints and suspension."""

    async def CreatePendingWaitpoint(
        self, request: pb.CreatePendingWaitpointRequest, context: Any
    ) -> pb.CreatePendingWaitpointResponse:
        eid, fence, idx = fences.of_loose_request(self.ctx, request).parts()
        if not request.HasField("lease"):
            idx = request.attempt_index
        wp = waitpoint_id_of(request.waitpoint_id)
        key = waitpoint_key_of(request.waitpoint_key, wp)
        if request.expires_in_ms <= 0:
            raise InvalidInput("expires_in_ms", "expires_in_ms is required (> 0)")
        limits.check(bounds.HORIZON_MS, request.expires_in_ms, "expires_in_ms")
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
        eid, fence, idx = fences.of_request(self.ctx, request).parts()
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
        if request.HasField("lease"):
            f = fences.of_handle(self.ctx, request.execution_id, request.lease)
        else:
            f = fences.of_fence(self.ctx, request.execution_id, None, request.attempt_index)
        eid, idx = f.eid, f.attempt_index
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
