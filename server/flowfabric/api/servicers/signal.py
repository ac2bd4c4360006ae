"""SignalService: deliver signals, list open waitpoints with their tokens, and the watches
(docs/suspension.md; docs/architecture.md#the-three-hops).

DeliverSignal dispatches as docs/suspension.md#signal-delivery recommends: `ff_deliver_signal`; on
`waitpoint_pending_use_buffer_script` (reachable only after the token checked out)
`ff_buffer_signal_for_pending_waitpoint`; on `waitpoint_not_pending` from that (the waitpoint
was activated in between) deliver once more. Tokens are never logged or echoed in errors.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

from flowfabric.server.api import limits
from flowfabric.server.api.limits import bounds
from flowfabric.server.api.servicers.base import ServerContext
from flowfabric.server.api.watches import SignalWatches
from flowfabric.server.valkey.errors import FlowFabricError, InvalidInput
from flowfabric.server.valkey.functions import Functions, Signal
from flowfabric.server.valkey.functions.signal import Accepted, Duplicate
from flowfabric.server.valkey.ids import ExecutionId, parse_uuid
from flowfabric.server.valkey.records import waitpoint_info
from flowfabric.v1 import signal_pb2 as pb
from flowfabric.v1 import signal_pb2_grpc as rpc

MAX_NAME_BYTES = bounds.LABEL_BYTES.hi
PAGE_MAX = bounds.PAGE.hi


def _opt(request: Any, name: str) -> Any:
    return getattr(request, name) if request.HasField(name) else None


def _bounded(request: Any, name: str, limit: int = MAX_NAME_BYTES) -> str:
    value = str(getattr(request, name))
    if len(value.encode()) > limit:
        raise InvalidInput(name, f"{name} must be at most {limit} bytes")
    return value


def signal_from_request(request: pb.DeliverSignalRequest) -> Signal:
    """Validate a DeliverSignal request (nothing reaches Valkey when this raises)."""
    parse_uuid(request.waitpoint_id, "waitpoint_id")
    signal_id = parse_uuid(request.signal_id, "signal_id") if request.signal_id else ""
    if not request.signal_name:
        raise InvalidInput("signal_name", "signal_name is required")
    payload = bytes(request.payload)
    if len(payload) > limits.SIGNAL_PAYLOAD_MAX:
        raise FlowFabricError(
            "payload_too_large",
            message=f"signal payload is {len(payload)} bytes; the limit is "
            f"{limits.SIGNAL_PAYLOAD_MAX}",
            metadata={"limit_bytes": str(limits.SIGNAL_PAYLOAD_MAX)},
        )
    if request.target_scope not in ("", "waitpoint", "execution"):
        raise InvalidInput("target_scope", "target_scope must be waitpoint or execution")
    key = _opt(request, "idempotency_key")
    if key is not None and not key:
        raise InvalidInput("idempotency_key", "idempotency_key, when set, must be non-empty")
    return Signal(
        waitpoint_id=request.waitpoint_id,
        signal_id=signal_id or str(uuid.uuid4()),
        signal_name=_bounded(request, "signal_name"),
        waitpoint_token=request.waitpoint_token,
        signal_category=_bounded(request, "signal_category"),
        source_type=_bounded(request, "source_type"),
        source_identity=_bounded(request, "source_identity"),
        payload=payload,
        payload_encoding=_bounded(request, "payload_encoding"),
        correlation_id=_bounded(request, "correlation_id"),
        idempotency_key=_bounded(request, "idempotency_key"),
        target_scope=request.target_scope,
        created_at=limits.optional(bounds.TIMESTAMP_MS, request, "created_at"),
        dedup_ttl_ms=limits.optional(bounds.DEDUP_TTL_MS, request, "dedup_ttl_ms"),
        resume_delay_ms=limits.optional(bounds.HORIZON_MS, request, "resume_delay_ms"),
        max_signals_per_execution=limits.optional(
            bounds.MAX_SIGNALS, request, "max_signals_per_execution"
        ),
        signal_maxlen=limits.optional(bounds.STREAM_MAXLEN, request, "signal_maxlen"),
    )


class SignalServicer(rpc.SignalServiceServicer):
    def __init__(self, ctx: ServerContext, watches: SignalWatches) -> None:
        self.ctx = ctx
        self.watches = watches

    @property
    def fn(self) -> Functions:
        return self.ctx.functions

    async def _deliver(self, eid: ExecutionId, s: Signal) -> Accepted | Duplicate:
        try:
            return await self.fn.signal.deliver_signal(eid, s)
        except FlowFabricError as exc:
            if exc.code != "waitpoint_pending_use_buffer_script":
                raise
        try:
            return await self.fn.signal.buffer_signal_for_pending_waitpoint(eid, s)
        except FlowFabricError as exc:
            if exc.code != "waitpoint_not_pending":
                raise
        return await self.fn.signal.deliver_signal(eid, s)  # activated in between: evaluate it now

    async def DeliverSignal(
        self, request: pb.DeliverSignalRequest, context: Any
    ) -> pb.DeliverSignalResponse:
        eid = self.ctx.execution_id(request.execution_id)
        reply = await self._deliver(eid, signal_from_request(request))
        if isinstance(reply, Duplicate):
            return pb.DeliverSignalResponse(
                duplicate=pb.DeliverSignalResponse.Duplicate(
                    existing_signal_id=reply.existing_signal_id
                )
            )
        return pb.DeliverSignalResponse(
            accepted=pb.DeliverSignalResponse.Accepted(
                signal_id=reply.signal_id, effect=reply.effect
            )
        )

    async def ListPendingWaitpoints(
        self, request: pb.ListPendingWaitpointsRequest, context: Any
    ) -> pb.ListPendingWaitpointsResponse:
        """One page, ordered by waitpoint id; the page token is the last id returned."""
        eid = self.ctx.execution_id(request.execution_id)
        if request.page_size > PAGE_MAX:
            raise InvalidInput("page_size", f"page_size must be at most {PAGE_MAX}")
        size = request.page_size or PAGE_MAX
        after = parse_uuid(request.page_token, "page_token") if request.page_token else ""
        rows = [r for r in await self.fn.suspension.list_waitpoints(eid) if r.waitpoint_id > after]
        page = rows[:size]
        more = len(rows) > size
        return pb.ListPendingWaitpointsResponse(
            waitpoints=[waitpoint_info(r.as_fields(), r.required_signal_names) for r in page],
            next_page_token=page[-1].waitpoint_id if more else "",
        )

    async def WatchSignals(
        self, request: pb.WatchSignalsRequest, context: Any
    ) -> AsyncIterator[pb.WatchSignalsResponse]:
        eid = self.ctx.execution_id(request.execution_id)
        # the watch validates the waitpoint id and the cursors before subscribing
        async for msg in self.watches.signals(
            eid, request.waitpoint_id, request.after_stream_id, request.after_accepted_at
        ):
            yield msg

    async def WatchWaitpoints(
        self, request: pb.WatchWaitpointsRequest, context: Any
    ) -> AsyncIterator[pb.WatchWaitpointsResponse]:
        eid = self.ctx.execution_id(request.execution_id)
        async for msg in self.watches.waitpoints(eid):
            yield msg
