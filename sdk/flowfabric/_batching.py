"""Natural batching of completions: concurrent CompleteExecution calls share one round trip.

A completion is queued; if no batch call is in flight it is sent at once (a batch of one: no
added latency at low load), otherwise it joins the next batch, sent as soon as the one in
flight answers. Each caller awaits its own item's outcome, typed exactly as the single call's
(`CompleteExecutions` runs every item through CompleteExecution on the server). A server
without `CompleteExecutions` (UNIMPLEMENTED) gets single calls from then on.

With a `ClaimAhead` (the worker's slot accounting) each batch call also asks for new work
(`CompleteExecutionsRequest.claim`): `reserve` says how many tasks to claim, given the slots the
batch's completions free, and `settle` takes the tasks the reply brought (exactly once per
reservation, also when the call failed).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any, Protocol

import grpc

from flowfabric._errors import FlowFabricError, from_item_error
from flowfabric._retry import Backoff, with_retries
from flowfabric._transport import Transport
from flowfabric.v1 import types_pb2, worker_pb2

log = logging.getLogger("flowfabric.worker")

#: Items per CompleteExecutions call.
MAX_ITEMS = 64
#: Serialised items per call (the server takes 2 MiB per request); a larger item is sent alone
#: as a CompleteExecution, so an oversized result fails only its own completion.
MAX_BYTES = 1 << 20

Pending = tuple[worker_pb2.CompleteExecutionRequest, int, "asyncio.Future[Reply]", Any]
Reply = worker_pb2.CompleteExecutionResponse


class ClaimAhead(Protocol):
    """Slot accounting of a worker that claims with its completions."""

    def reserve(self, owners: list[Any]) -> tuple[worker_pb2.ClaimNextRequest, Any] | None:
        """The claim to send with the completions of `owners` and a ticket for `settle`, or
        None to claim nothing."""

    def settle(self, ticket: Any, claimed: list[types_pb2.ClaimedTask], sent: bool) -> None:
        """The reply's tasks (maybe none); `sent` is False if the call failed as a whole."""


class CompletionBatcher:
    """Coalesces one worker's completions into CompleteExecutions calls (one in flight)."""

    def __init__(
        self,
        transport: Transport,
        backoff: Backoff,
        *,
        max_items: int = MAX_ITEMS,
        max_bytes: int = MAX_BYTES,
        claims: ClaimAhead | None = None,
        max_in_flight: int = 1,
    ) -> None:
        self.transport = transport
        self.backoff = backoff
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.claims = claims
        self.batched = True  # False once the server answered UNIMPLEMENTED
        self._queue: collections.deque[Pending] = collections.deque()
        self.max_in_flight = max_in_flight
        self._senders: set[asyncio.Task[None]] = set()

    async def complete(
        self, request: worker_pb2.CompleteExecutionRequest, owner: Any = None
    ) -> Reply:
        """Complete one execution; retried on UNAVAILABLE with the same request (the server
        reconciles a retry whose first call committed). `owner` is passed to `ClaimAhead`."""
        return await with_retries(lambda: self._once(request, owner), self.backoff)

    async def aclose(self) -> None:
        """Wait for the call in flight (if any) to answer."""
        if self._senders:
            await asyncio.wait(set(self._senders))

    async def _once(self, request: worker_pb2.CompleteExecutionRequest, owner: Any) -> Reply:
        size = request.ByteSize()
        if not self.batched or size > self.max_bytes:
            return await self._single(request)
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._queue.append((request, size, future, owner))
        if len(self._senders) < self.max_in_flight:
            sender = asyncio.create_task(self._drain())
            self._senders.add(sender)
            sender.add_done_callback(self._senders.discard)
        return await future

    async def _single(self, request: worker_pb2.CompleteExecutionRequest) -> Reply:
        workers = self.transport.workers
        return await self.transport.unary(workers.CompleteExecution, request, retry=False)

    async def _drain(self) -> None:
        while self._queue:
            batch = self._take()
            if batch:
                await self._send(batch)

    def _take(self) -> list[Pending]:
        """The next batch: queued items in order, up to the item and byte caps; items whose
        caller gave up (cancelled) are dropped."""
        batch: list[Pending] = []
        total = 0
        while self._queue and len(batch) < self.max_items:
            pending = self._queue[0]
            size, future = pending[1], pending[2]
            if future.done():
                self._queue.popleft()
                continue
            if batch and total + size > self.max_bytes:
                break
            self._queue.popleft()
            batch.append(pending)
            total += size
        return batch

    async def _send(self, batch: list[Pending]) -> None:
        try:
            if self.batched:
                await self._send_batch(batch)
            else:
                await self._send_singles(batch)
        except BaseException as exc:  # never strand a caller (cancelled sender, a bug)
            error = FlowFabricError(f"completion batch failed: {exc!r}")
            for _, _, future, _ in batch:
                if not future.done():
                    future.set_exception(error)
            if not isinstance(exc, Exception):
                raise
            log.exception("completion batch failed")

    async def _send_batch(self, batch: list[Pending]) -> None:
        request = worker_pb2.CompleteExecutionsRequest(items=[p[0] for p in batch])
        reserved = self.claims.reserve([p[3] for p in batch]) if self.claims else None
        if reserved is not None:
            request.claim.CopyFrom(reserved[0])
        reply = None
        try:
            reply = await self.transport.unary(
                self.transport.workers.CompleteExecutions, request, retry=False
            )
        except FlowFabricError as exc:
            self._settle(reserved, None)
            if exc.code == grpc.StatusCode.UNIMPLEMENTED:
                log.info("the server has no CompleteExecutions: completing one call at a time")
                self.batched = False
                await self._send_singles(batch)
                return
            for _, _, future, _ in batch:  # e.g. UNAVAILABLE: every caller retries its own item
                if not future.done():
                    future.set_exception(exc)
            return
        except BaseException:
            self._settle(reserved, None)
            raise
        self._settle(reserved, reply)
        if len(reply.results) != len(batch):
            raise ValueError(f"{len(reply.results)} results for {len(batch)} completions")
        for (_, _, future, _), result in zip(batch, reply.results, strict=True):
            if future.done():
                continue
            if result.WhichOneof("outcome") == "completed":
                future.set_result(result.completed)
            else:
                e = result.error
                future.set_exception(from_item_error(e.code, e.reason, e.message, e.metadata))

    async def _send_singles(self, batch: list[Pending]) -> None:
        async def one(
            request: worker_pb2.CompleteExecutionRequest, future: asyncio.Future[Reply]
        ) -> None:
            try:
                reply = await self._single(request)
            except FlowFabricError as exc:
                if not future.done():
                    future.set_exception(exc)
                return
            if not future.done():
                future.set_result(reply)

        await asyncio.gather(*(one(p[0], p[2]) for p in batch))

    def _settle(
        self,
        reserved: tuple[worker_pb2.ClaimNextRequest, Any] | None,
        reply: worker_pb2.CompleteExecutionsResponse | None,
    ) -> None:
        if reserved is None or self.claims is None:
            return
        if reply is not None and reply.HasField("claim_error"):
            e = reply.claim_error
            log.warning("claim after completions failed: %s %s", e.reason, e.message)
        claimed = list(reply.claimed) if reply is not None else []
        self.claims.settle(reserved[1], claimed, reply is not None)
