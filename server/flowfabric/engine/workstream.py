"""Server-pushed work (`WorkerService.StreamWork`): claim on the worker's behalf and stream tasks.

The stream claims through the Scheduler's own pass (`Scheduler.claim`, the same one ClaimNext
uses) and keeps at most `max_in_flight` unfinished tasks. It tracks its in-flight set
{execution_id: lease_id}; a task stops counting once its execution leaves that lease (a terminal
call, suspend, delay, move, revoke, cancel, lease expiry). That is learnt event-driven: the stream
listens on `ff:exec_events:{fp:N}` of its tasks' partitions, and a `state_changed` of an
in-flight execution (or a `resync`) makes it re-read the core's `lifecycle_phase`,
`ownership_state` and `current_lease_id` — the stored state decides, never the event. Every
RECHECK_S all in-flight tasks are re-read as a backstop for lost events (pub/sub is at most once).

With free slots it claims; with nothing to claim it long-polls like `claim_next`: woken by a
`waiting` event on its lanes' solo partitions or an in-process wake (a create in this server),
with a 1 s backstop for work on partitions it does not listen to. When the Scheduler closes
(server stop) the stream ends; the caller turns that into UNAVAILABLE `shutting_down`. A client
cancel ends it where it stands: its tasks stay leased to the worker, who still owns them.
Known limit: grpc.aio does not always tell the handler of a client's cancel at once (seen in
the API tests, server and client in one process); the stream then ends at its next write, and
the tasks it claimed for that write stay leased until their lease expires and are reclaimed,
as after a worker crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

from flowfabric.server.engine.events import EventHub
from flowfabric.server.engine.scheduler import WAIT_BACKSTOP_S, Claimed, ClaimRequest, Scheduler
from flowfabric.server.valkey.codec import text
from flowfabric.server.valkey.ids import ExecutionId
from flowfabric.server.valkey.keys import ExecKeys, PartitionKeys
from flowfabric.server.valkey.store import Store

RECHECK_S = 1.0
MAX_CLAIM = 100  # claims per Scheduler pass, as ClaimNext's max_tasks


class StreamClosed(Exception):
    """The Scheduler is closing (server stop): the stream must end."""


class WorkStream:
    def __init__(
        self, scheduler: Scheduler, store: Store, hub: EventHub | None, req: ClaimRequest,
        max_in_flight: int,
    ) -> None:  # fmt: skip
        self.scheduler = scheduler
        self.store = store
        self.hub = hub
        self.req = req
        self.max_in_flight = max_in_flight
        self.in_flight: dict[str, tuple[ExecutionId, str]] = {}
        self.suspects: set[str] = set()
        self.wake = asyncio.Event()
        self._channels: set[str] = set()
        self._stack = contextlib.AsyncExitStack()

    # -- events -------------------------------------------------------------------------------

    def _on_work(self, event: dict[str, Any]) -> None:
        if event.get("public_state") == "waiting" or event.get("type") == "resync":
            self.wake.set()

    def _on_task(self, event: dict[str, Any]) -> None:
        if event.get("type") == "resync":
            self.suspects |= set(self.in_flight)
            self.wake.set()
            return
        eid = event.get("execution_id")
        if event.get("type") == "state_changed" and eid in self.in_flight:
            self.suspects.add(eid)
            self.wake.set()

    async def _listen(self, channel: str, listener: Any) -> None:
        if self.hub is not None:
            await self._stack.enter_async_context(self.hub.listen(channel, listener))

    async def _track(self, claims: list[Claimed]) -> None:
        for c in claims:
            self.in_flight[str(c.execution_id)] = (c.execution_id, c.lease_id)
            channel = PartitionKeys(c.execution_id.tag).exec_events
            if channel not in self._channels:
                self._channels.add(channel)
                await self._listen(channel, self._on_task)

    # -- in-flight accounting -----------------------------------------------------------------

    async def _recheck(self, members: list[str]) -> None:
        """Drop the tasks whose execution left the lease the stream handed out."""
        pipe = self.store.pipeline()
        for member in members:
            eid, _ = self.in_flight[member]
            pipe.hmget(
                ExecKeys(eid).core, ["lifecycle_phase", "ownership_state", "current_lease_id"]
            )
        rows = await self.store.run_pipeline(pipe)
        for member, (phase, ownership, lease_id) in zip(members, rows, strict=True):
            held = (text(phase), text(ownership), text(lease_id)) == (
                "active", "leased", self.in_flight[member][1],
            )  # fmt: skip
            if not held:
                del self.in_flight[member]

    async def _settle(self, full: bool) -> None:
        members = list(self.in_flight if full else self.suspects & self.in_flight.keys())
        self.suspects.clear()
        if members:
            await self._recheck(members)

    # -- the loop -----------------------------------------------------------------------------

    async def run(self) -> AsyncIterator[list[Claimed]]:
        """Batches of newly claimed tasks, never more than `max_in_flight` unfinished at once.

        Raises StreamClosed when the Scheduler closes."""
        closing = self.scheduler.closing
        # in-process creates and ready announcements of its lanes wake this stream as they
        # wake claim_next
        with self.scheduler.local_wakes(self.wake, frozenset(self.req.lanes)):
            async with self._stack:
                own = self.scheduler.lane_parts
                for p in {p for lane in self.req.lanes for p in own.of(lane)}:
                    await self._listen(PartitionKeys.of(p).exec_events, self._on_work)
                next_full = time.monotonic() + RECHECK_S
                while True:
                    if closing.is_set():
                        raise StreamClosed
                    self.wake.clear()
                    full = time.monotonic() >= next_full
                    if full:
                        next_full = time.monotonic() + RECHECK_S
                    await self._settle(full)
                    free = self.max_in_flight - len(self.in_flight)
                    if free > 0:
                        req = dataclasses.replace(self.req, max_tasks=min(free, MAX_CLAIM))
                        got = await self.scheduler.claim(req)
                        if got:
                            await self._track(got)
                            yield got
                            continue
                    await self._wait(closing, next_full)

    async def _wait(self, closing: asyncio.Event, next_full: float) -> None:
        timeout = max(0.0, min(WAIT_BACKSTOP_S, next_full - time.monotonic()))
        waiters = [asyncio.ensure_future(closing.wait()), asyncio.ensure_future(self.wake.wait())]
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
