"""SignalService watches: WatchSignals and WatchWaitpoints (docs/suspension.md#watches,
docs/architecture.md#events-and-watches).

Event-driven, never polling: the functions `SPUBLISH` slot-local JSON events on
`ff:signal_events:{p}` (signals, waitpoints) and `ff:exec_events:{p}` (state changes) in the same
atomic call that makes the change; the EventHub fans them out in-process. Pub/sub is
at-most-once, so every watch subscribes first, waits for the confirmation, then reads what is
stored, then goes live, de-duplicating by id: no gap, no duplicate. A `resync` event (the
subscriber reconnected) re-reads the stored history after the last delivered cursor, and so
does a rare backstop timer. A watch ends `OK` once the execution is terminal and everything
stored has been delivered; on server stop it ends `UNAVAILABLE shutting_down` (`shutdown()`).

Each watcher has its own bounded queue and the listener callbacks never block: a signal watcher
more than `queue_limit` events behind ends with RESOURCE_EXHAUSTED (`concurrency_limit`, pool
`watch_queue`; resume from the last `stream_id`/`accepted_at`), a waitpoint watcher that far
behind drops its queue and re-reads the stored waitpoints instead (latest state wins).

Tokens appear only in `Opened` messages (a disclosure point of
docs/suspension.md#token-security-properties): never log them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from flowfabric.server.api.watch_sources import (
    BACKSTOP_S,
    SIGNAL_EVENTS,
    SUBSCRIBE_WAIT_S,
    TERMINAL_STATES,
    WAITPOINT_EVENTS,
    Feed,
    SignalLog,
    Source,
    WaitpointView,
    parse_stream_id,
    shutting_down,
)
from flowfabric.server.engine.events import EventHub
from flowfabric.server.valkey.codec import text
from flowfabric.server.valkey.errors import FlowFabricError, InvalidInput
from flowfabric.server.valkey.ids import ExecutionId, parse_uuid
from flowfabric.server.valkey.keys import ExecKeys, PartitionKeys, WaitpointKeys
from flowfabric.server.valkey.store import Store
from flowfabric.v1 import signal_pb2

# -- the watches ------------------------------------------------------------------------------


class SignalWatches:
    """The two server-streaming watches of SignalService; `shutdown()` ends them all."""

    def __init__(self, store: Store, hub: EventHub, *, queue_limit: int = 1000) -> None:
        self.store = store
        self.hub = hub
        self.queue_limit = queue_limit
        self.stopping = asyncio.Event()
        self.backstop_s = BACKSTOP_S

    def shutdown(self) -> None:
        """Live watches end with `UNAVAILABLE shutting_down` at their next step."""
        self.stopping.set()

    async def signals(
        self, eid: ExecutionId, waitpoint_id: str, after_stream_id: str, after_accepted_at: int
    ) -> AsyncIterator[signal_pb2.WatchSignalsResponse]:
        """Stored signals after the cursor, then live ones; ends when the execution is terminal."""
        if waitpoint_id:
            parse_uuid(waitpoint_id, "waitpoint_id")
        after_stream = parse_stream_id(after_stream_id, "after_stream_id")
        if after_accepted_at < 0:
            raise InvalidInput("after_accepted_at", "after_accepted_at must not be negative")
        log = SignalLog(self.store, eid, waitpoint_id, after_stream, after_stream_id != "",
                         after_accepted_at)  # fmt: skip

        def accept(event: dict[str, Any]) -> bool:
            return event.get("type") in SIGNAL_EVENTS and (
                not waitpoint_id or event.get("waitpoint_id") == waitpoint_id
            )

        feed = Feed(eid, self.queue_limit, accept, fail_on_overflow=True)
        async for message in self._run(eid, feed, log, waitpoint_id):
            yield message

    async def waitpoints(
        self, eid: ExecutionId
    ) -> AsyncIterator[signal_pb2.WatchWaitpointsResponse]:
        """Each open waitpoint (with its token), then each opening and closing, until terminal."""

        def accept(event: dict[str, Any]) -> bool:
            return event.get("type") in WAITPOINT_EVENTS

        feed = Feed(eid, self.queue_limit, accept, fail_on_overflow=False)
        async for message in self._run(eid, feed, WaitpointView(self.store, eid)):
            yield message

    # -- shared machinery ---------------------------------------------------------------------

    async def _run(
        self, eid: ExecutionId, feed: Feed, source: Source, waitpoint_id: str = ""
    ) -> AsyncIterator[Any]:
        """Subscribe, read stored, go live; on resync or backstop re-read; end after terminal."""
        p = PartitionKeys(eid.tag)
        async with (
            self.hub.listen(p.signal_events, feed.on_signal_event),
            self.hub.listen(p.exec_events, feed.on_exec_event),
        ):
            await self._wait_subscribed(eid)
            terminal = await self._terminal(eid, seen=False)
            if waitpoint_id:
                await self._check_waitpoint(eid, waitpoint_id)
            while True:
                feed.resync = False
                # Observed before the read: a read after a terminal state sees all it wrote.
                final = terminal or feed.terminal
                self._raise_if_stopping()
                async for message in source.replay():
                    yield message
                if final:
                    return
                async for message in self._drain(feed, source):
                    yield message
                if feed.resync:
                    await self._wait_subscribed(eid)
                terminal = feed.terminal or await self._terminal(eid, seen=True)

    async def _drain(self, feed: Feed, source: Source) -> AsyncIterator[Any]:
        """Live events until a resync or terminal state needs a stored read."""
        while True:
            self._raise_if_stopping()
            if feed.overflowed:
                raise FlowFabricError(
                    "concurrency_limit",
                    message=f"watcher fell more than {feed.limit} events behind; resume from "
                    "the last stream_id / accepted_at",
                    metadata={"pool": "watch_queue", "max": str(feed.limit)},
                )
            if feed.resync or feed.terminal:
                return
            if feed.queue:
                async for message in source.live(feed.queue.popleft()):
                    yield message
                continue
            await self._next(feed)

    async def _next(self, feed: Feed) -> None:
        """Wait for an event or server stop; after `backstop_s` of silence, re-read."""
        feed.wake.clear()
        if not feed.idle() or self.stopping.is_set():
            return
        waiters = [
            asyncio.ensure_future(feed.wake.wait()),
            asyncio.ensure_future(self.stopping.wait()),
        ]
        try:
            done, _ = await asyncio.wait(
                waiters, timeout=self.backstop_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for waiter in waiters:
                waiter.cancel()
        if not done:
            feed.resync = True

    def _raise_if_stopping(self) -> None:
        if self.stopping.is_set():
            raise shutting_down()

    async def _wait_subscribed(self, eid: ExecutionId) -> None:
        """Events published from here on reach the watcher (both channels share one node)."""
        p = PartitionKeys(eid.tag)
        try:
            async with asyncio.timeout(SUBSCRIBE_WAIT_S):
                await self.hub.wait_subscribed(p.signal_events)
                await self.hub.wait_subscribed(p.exec_events)
        except TimeoutError:
            raise FlowFabricError(
                "backend_unavailable", message="event subscription not confirmed by Valkey",
                retry_after_ms=1000,
            ) from None  # fmt: skip

    async def _terminal(self, eid: ExecutionId, *, seen: bool) -> bool:
        """Whether the stored execution is terminal. Missing: `execution_not_found` at the start,
        terminal once the watch has seen it (retention may delete a terminal execution)."""
        public, phase = await self.store.call(
            "HMGET", ExecKeys(eid).core, "public_state", "lifecycle_phase"
        )
        if public is None and phase is None:
            if seen:
                return True
            raise FlowFabricError("execution_not_found", message=f"execution {eid} not found")
        return text(public) in TERMINAL_STATES or text(phase) == "terminal"

    async def _check_waitpoint(self, eid: ExecutionId, waitpoint_id: str) -> None:
        """A waitpoint of another execution is not watchable (not-yet-created ones are)."""
        owner = await self.store.call(
            "HGET", WaitpointKeys(eid.tag, waitpoint_id).waitpoint, "execution_id"
        )
        if owner is not None and text(owner) != str(eid):
            raise FlowFabricError(
                "waitpoint_not_found",
                message=f"waitpoint {waitpoint_id} does not belong to execution {eid}",
            )
