"""WorkerService, part 2: the lease (RenewLease, RenewLeases, UpdateProgress) and the attempt's
output stream (AppendFrame, AppendFrames; docs/streams.md)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

from flowfabric.server.api import fences, limits
from flowfabric.server.api.limits import bounds
from flowfabric.server.api.servicers.base import ServerContext
from flowfabric.server.api.servicers.worker_claims import WorkerParts, item_error
from flowfabric.server.valkey.errors import FlowFabricError, InvalidInput
from flowfabric.server.valkey.functions import Fence, Frame
from flowfabric.server.valkey.functions.lease import Renewed
from flowfabric.server.valkey.functions.stream import Appended
from flowfabric.server.valkey.ids import ExecutionId
from flowfabric.v1 import worker_pb2 as pb

MAX_RENEWALS = bounds.BATCH_ITEMS.hi
# At most this many frames of an AppendFrames stream are read ahead and appended together.
APPEND_RUN = 64

AppendArgs = tuple[ExecutionId, int, Fence, Frame]


RenewArgs = tuple[ExecutionId, int, Fence, int, int]


def renew_args(ctx: ServerContext, request: pb.RenewLeaseRequest) -> RenewArgs:
    """A renewal checked at the edge: (eid, attempt_index, fence, lease_ttl_ms, grace_ms)."""
    eid, fence, attempt_index = fences.of_request(ctx, request).parts()
    if request.lease_ttl_ms or not request.HasField("lease"):
        ttl = limits.lease_ttl(request.lease_ttl_ms)
    else:
        ttl = limits.lease_ttl(request.lease.lease_ttl_ms, "lease.lease_ttl_ms")
    grace = limits.optional(bounds.LEASE_HISTORY_GRACE_MS, request, "lease_history_grace_ms")
    return eid, attempt_index, fence, ttl, 5000 if grace is None else grace


async def renew_lease(ctx: ServerContext, request: pb.RenewLeaseRequest) -> pb.RenewLeaseResponse:
    """One renewal: RenewLease."""
    reply = await ctx.functions.lease.renew_lease(*renew_args(ctx, request))
    renewed = pb.RenewLeaseResponse.Renewed(expires_at=reply.expires_at)
    return pb.RenewLeaseResponse(renewed=renewed)


class LeasesMixin(WorkerParts):
    """Lease renewal, progress and frames."""

    async def RenewLease(
        self, request: pb.RenewLeaseRequest, context: Any
    ) -> pb.RenewLeaseResponse:
        return await renew_lease(self.ctx, request)

    async def RenewLeases(
        self, request: pb.RenewLeasesRequest, context: Any
    ) -> pb.RenewLeasesResponse:
        if not request.renewals:
            raise InvalidInput("renewals", "at least one renewal is required")
        if len(request.renewals) > MAX_RENEWALS:
            raise InvalidInput("renewals", f"at most {MAX_RENEWALS} renewals per call")

        # Each item checked as RenewLease would be, then one ff_renew_leases per partition,
        # the partitions in parallel (docs/lifecycle.md#batched-functions).
        result = pb.RenewLeasesResponse.Result
        results: list[pb.RenewLeasesResponse.Result | None] = [None] * len(request.renewals)
        groups: dict[str, list[tuple[int, str, RenewArgs]]] = {}
        for i, item in enumerate(request.renewals):
            eid_text = item.lease.execution_id if item.HasField("lease") else item.execution_id
            try:
                args = renew_args(self.ctx, item)
            except FlowFabricError as exc:
                results[i] = result(execution_id=eid_text, error=item_error(exc))
                continue
            groups.setdefault(args[0].tag, []).append((i, eid_text, args))

        async def partition(group: list[tuple[int, str, RenewArgs]]) -> None:
            try:
                replies: Sequence[Renewed | FlowFabricError] = await self.fn.lease.renew_leases(
                    [args for _, _, args in group]
                )
            except FlowFabricError as exc:  # the call itself failed: every item says so
                replies = [exc] * len(group)
            for (i, eid_text, _), reply in zip(group, replies, strict=True):
                if isinstance(reply, FlowFabricError):
                    results[i] = result(execution_id=eid_text, error=item_error(reply))
                else:
                    renewed = pb.RenewLeaseResponse.Renewed(expires_at=reply.expires_at)
                    results[i] = result(execution_id=eid_text, renewed=renewed)

        await asyncio.gather(*(partition(g) for g in groups.values()))
        return pb.RenewLeasesResponse(results=[r for r in results if r is not None])

    async def UpdateProgress(
        self, request: pb.UpdateProgressRequest, context: Any
    ) -> pb.UpdateProgressResponse:
        eid, fence, _ = fences.of_loose_request(self.ctx, request).parts()
        pct = request.progress_pct if request.HasField("progress_pct") else None
        if pct is not None and pct > 100:
            raise InvalidInput("progress_pct", "progress_pct must be 0..100")
        await self.fn.execution.update_progress(eid, fence, pct, request.progress_message)
        return pb.UpdateProgressResponse(updated=pb.UpdateProgressResponse.Updated())

    def _frame(self, request: pb.AppendFrameRequest) -> AppendArgs:
        """One frame checked at the edge: (eid, attempt_index, fence, frame); the payload is
        passed through as bytes."""
        eid, fence, idx = fences.of_loose_request(self.ctx, request).parts()
        if not request.HasField("lease"):
            idx = request.attempt_index
        limits.check(bounds.TIMESTAMP_MS, request.timestamp, "timestamp")
        frame = Frame(
            frame_type=request.frame_type,
            payload=request.payload,
            timestamp=request.timestamp or None,
            encoding=request.encoding,
            metadata_json=request.metadata_json,
            correlation_id=request.correlation_id,
            source=request.source,
            retention_maxlen=limits.optional(bounds.STREAM_MAXLEN, request, "retention_maxlen"),
            max_payload_bytes=request.max_payload_bytes
            if request.HasField("max_payload_bytes") else None,
        )  # fmt: skip
        return eid, idx, fence, frame

    async def _append(self, request: pb.AppendFrameRequest) -> Appended:
        """One fenced `ff_append_frame`."""
        return await self.fn.stream.append_frame(*self._frame(request))

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
        frame's error and `appended_count` = frames appended before it. The frames that have
        already arrived are taken together (at most APPEND_RUN), and each run of consecutive
        frames on one partition goes out as one `ff_append_frames`
        (docs/lifecycle.md#batched-functions)."""
        out = pb.AppendFramesResponse()
        inbox: asyncio.Queue[pb.AppendFramesRequest | None] = asyncio.Queue(APPEND_RUN)

        async def read() -> None:
            async for message in request_iterator:
                await inbox.put(message)
            await inbox.put(None)

        reader = asyncio.ensure_future(read())
        try:
            while True:
                first = await self._next(inbox, reader)
                if first is None:
                    return out
                arrived: list[pb.AppendFramesRequest | None] = [first]
                while len(arrived) < APPEND_RUN and not inbox.empty():
                    arrived.append(inbox.get_nowait())
                done = None in arrived
                await self._append_arrived([m for m in arrived if m is not None], out)
                if done:
                    return out
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

    @staticmethod
    async def _next(
        inbox: asyncio.Queue[pb.AppendFramesRequest | None], reader: asyncio.Future[None]
    ) -> pb.AppendFramesRequest | None:
        """The next message, or None at the end of the stream; the reader's error is raised."""
        getter = asyncio.ensure_future(inbox.get())
        racers: set[asyncio.Future[Any]] = {getter, reader}
        await asyncio.wait(racers, return_when=asyncio.FIRST_COMPLETED)
        if getter.done():
            return getter.result()
        getter.cancel()
        reader.result()  # raises the stream's error
        return None  # pragma: no cover - the reader ends only after putting None

    @staticmethod
    def _more(message: pb.AppendFramesRequest) -> list[Frame]:
        """The message's further frames (`frames`), each checked at the edge."""
        if len(message.frames) > bounds.BATCH_ITEMS.hi:
            raise InvalidInput("frames", f"at most {bounds.BATCH_ITEMS.hi} frames per message")
        limit = limits.REQUEST_LIMITS["/flowfabric.v1.WorkerService/AppendFrame"]
        out = []
        for i, f in enumerate(message.frames):
            if f.ByteSize() > limit:
                raise FlowFabricError(
                    "payload_too_large",
                    message=f"frames[{i}] is {f.ByteSize()} bytes; the limit is {limit}",
                    metadata={"limit_bytes": str(limit)},
                )
            limits.check(bounds.TIMESTAMP_MS, f.timestamp, f"frames[{i}].timestamp")
            out.append(Frame(
                frame_type=f.frame_type, payload=f.payload, timestamp=f.timestamp or None,
                encoding=f.encoding, metadata_json=f.metadata_json,
                correlation_id=f.correlation_id, source=f.source,
            ))  # fmt: skip
        return out

    async def _append_arrived(
        self, messages: list[pb.AppendFramesRequest], out: pb.AppendFramesResponse
    ) -> None:
        """Check each frame, append each run of consecutive one-frame messages of one
        partition in one FCALL, and a message with further frames in an FCALL of its own (one
        fence check for all of them, docs/streams.md#appending); at the first failure raise it
        with `appended_count` set."""
        limit = limits.REQUEST_LIMITS["/flowfabric.v1.WorkerService/AppendFrame"]
        run: list[AppendArgs] = []
        try:
            for message in messages:
                try:
                    size = message.frame.ByteSize() if message.frames else message.ByteSize()
                    if size > limit:
                        raise FlowFabricError(
                            "payload_too_large",
                            message=f"frame message is {size} bytes; the limit is {limit}",
                            metadata={"limit_bytes": str(limit)},
                        )
                    args = self._frame(message.frame)
                    more = self._more(message)
                except FlowFabricError:
                    await self._append_run(run, out)
                    run = []
                    raise
                if more:
                    await self._append_run(run, out)
                    run = []
                    reply = await self.fn.stream.append_frame(*args, more)
                    out.appended_count += 1 + len(more)
                    out.last_entry_id = reply.entry_id
                    out.frame_count = reply.frame_count
                    continue
                if run and run[-1][0].tag != args[0].tag:
                    await self._append_run(run, out)
                    run = []
                run.append(args)
            await self._append_run(run, out)
        except FlowFabricError as exc:
            exc.metadata["appended_count"] = str(out.appended_count)
            raise

    async def _append_run(self, run: list[AppendArgs], out: pb.AppendFramesResponse) -> None:
        if not run:
            return
        for reply in await self.fn.stream.append_frames(run):
            if isinstance(reply, FlowFabricError):
                raise reply
            out.appended_count += 1
            out.last_entry_id = reply.entry_id
            out.frame_count = reply.frame_count
