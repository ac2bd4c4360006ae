"""In-process fan-out of the slot-local watch events the functions publish
(docs/architecture.md#shared-transition-rules).

Functions `SPUBLISH` a JSON event on `ff:exec_events:{fp:N}` in the same atomic call that makes
the change. The hub subscribes once per partition, lazily, on one pub/sub connection (sharded
pub/sub on Cluster), and hands each event to the listeners of that channel. Pub/sub is
at-most-once, so listeners always read stored state first, and after a reconnect every listener
receives a `{"type": "resync"}` event telling it to re-read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from typing import Any

from flowfabric.server.engine.aio import cancel_and_wait
from flowfabric.server.valkey.store import Store

log = logging.getLogger("flowfabric.events")

Listener = Callable[[dict[str, Any]], None]
RESYNC: dict[str, Any] = {"type": "resync"}
READ_SLICE_S = 0.2


class _NodeReader:
    """One pub/sub connection to one node, with its own reader task (no cross-node stalls)."""

    def __init__(self, hub: EventHub, client: Any, owns_client: bool) -> None:
        self.hub = hub
        self.client = client
        self.owns_client = owns_client
        self.pubsub: Any = None
        self.subscribed: set[str] = set()
        self.confirming: set[str] = set()
        self.pending: set[str] = set()
        self.wake = asyncio.Event()
        self.changed = asyncio.Condition()
        self.closed = False
        self.task = asyncio.create_task(self._run(), name="event-reader")

    def add(self, channel: str) -> None:
        if channel not in self.subscribed and channel not in self.confirming:
            self.pending.add(channel)
            self.wake.set()

    async def close(self) -> None:
        # The client library can swallow a cancel that lands in its own timeout handling
        # (mid-subscribe, typically): the flag ends the loop at its next turn regardless.
        self.closed = True
        self.wake.set()
        await cancel_and_wait([self.task], grace=2.0)
        await self._close_pubsub()
        if self.owns_client:
            await self.client.aclose()

    async def _close_pubsub(self) -> None:
        if self.pubsub is not None:
            with contextlib.suppress(Exception):
                await self.pubsub.aclose()
            self.pubsub = None

    async def _run(self) -> None:
        while not self.closed:
            try:
                await self._serve()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("event subscriber lost (%s); reconnecting in 1s", exc)
                await self._close_pubsub()
                self.pending |= self.subscribed | self.confirming
                self.subscribed.clear()
                self.confirming.clear()
                await asyncio.sleep(1.0)
                if self.closed:
                    return
                for channel in self.pending:
                    self.hub.publish_local(channel, RESYNC | {"channel": channel})

    async def _serve(self) -> None:
        while not self.closed:
            if self.pending:
                if self.pubsub is None:
                    self.pubsub = self.client.pubsub()
                for channel in sorted(self.pending):
                    if self.closed:
                        return
                    # one channel per SSUBSCRIBE: several must share a slot
                    await self.pubsub.ssubscribe(channel)
                    self.pending.discard(channel)
                    self.confirming.add(channel)
            if not self.subscribed and not self.confirming:
                self.wake.clear()
                await self.wake.wait()
                continue
            message = await self.pubsub.get_message(
                ignore_subscribe_messages=False, timeout=READ_SLICE_S
            )
            if not isinstance(message, dict):
                continue
            kind, channel = _text(message.get("type")), _text(message.get("channel"))
            if kind == "ssubscribe":
                # Subscribed only once Valkey confirms: events published before the
                # confirmation are not delivered, so watchers wait for this point.
                self.confirming.discard(channel)
                self.subscribed.add(channel)
                async with self.changed:
                    self.changed.notify_all()
                continue
            if kind != "smessage":
                continue
            try:
                event = json.loads(message.get("data") or b"{}")
            except ValueError:
                log.warning("undecodable event on %s", channel)
                continue
            self.hub.publish_local(channel, event)


class EventHub:
    """Per-node subscriber connections; any number of in-process listeners per channel."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._listeners: dict[str, set[Listener]] = defaultdict(set)
        self._readers: dict[str, _NodeReader] = {}

    def start(self) -> None:
        """Readers start lazily, with the first listener of a node's channels."""

    async def stop(self) -> None:
        readers, self._readers = list(self._readers.values()), {}
        for reader in readers:
            await reader.close()

    def _reader_for(self, channel: str) -> _NodeReader:
        if self.store.cluster:
            node = self.store.cluster_client.get_node_from_key(channel)
            if node is None:
                raise RuntimeError(f"no cluster node serves {channel}")
            name = node.name
        else:
            name = "standalone"
        reader = self._readers.get(name)
        if reader is None:
            if self.store.cluster:
                reader = _NodeReader(self, node_client(node), owns_client=True)
            else:
                reader = _NodeReader(self, self.store.client, owns_client=False)
            self._readers[name] = reader
        return reader

    @contextlib.asynccontextmanager
    async def listen(self, channel: str, listener: Listener) -> AsyncIterator[None]:
        """Deliver events of `channel` to `listener` while the context is open."""
        self._listeners[channel].add(listener)
        self._reader_for(channel).add(channel)
        try:
            yield
        finally:
            self._listeners[channel].discard(listener)

    async def wait_subscribed(self, channel: str) -> None:
        """Wait until `channel` is subscribed (events published after this are delivered).

        Callers bound the wait with `asyncio.timeout`.
        """
        reader = self._reader_for(channel)
        async with reader.changed:
            await reader.changed.wait_for(lambda: channel in reader.subscribed)

    def publish_local(self, channel: str, event: dict[str, Any]) -> None:
        """Deliver an event to this process's listeners without a round trip."""
        for listener in list(self._listeners.get(channel, ())):
            listener(event)


def node_client(node: Any) -> Any:
    """A standalone client for one cluster node (sharded pub/sub is served by the slot owner)."""
    import redis.asyncio as aioredis

    return aioredis.Redis(host=node.host, port=node.port, decode_responses=False)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
