"""What the SignalService watches read: stored signal history and waitpoint state.

`SignalLog` replays an execution's (or one waitpoint's) signals after a client's cursor and
turns one live event into records; `WaitpointView` tracks which waitpoints a watcher has been
shown open or closed. `watches.py` drives them (subscribe, replay, live, de-duplicate); the
design is in docs/suspension.md. Tokens appear only in `Opened` messages: never log them.
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from flowfabric.server.valkey.codec import hash_to_dict, int64, text
from flowfabric.server.valkey.errors import FlowFabricError, InvalidInput
from flowfabric.server.valkey.ids import ExecutionId
from flowfabric.server.valkey.keys import ExecKeys, WaitpointKeys, signal_key
from flowfabric.server.valkey.keys import signal_payload_key as payload_key
from flowfabric.server.valkey.records import read_signal, read_waitpoint, signal_record
from flowfabric.server.valkey.store import Store
from flowfabric.v1 import signal_pb2
from flowfabric.v1 import types_pb2 as t

TERMINAL_STATES = frozenset({"completed", "failed", "cancelled", "expired", "skipped"})
OPEN_STATES = frozenset({"pending", "active"})
SIGNAL_EVENTS = frozenset({"signal_accepted", "signal_buffered"})
WAITPOINT_EVENTS = frozenset({"waitpoint_opened", "waitpoint_closed"})
SUBSCRIBE_WAIT_S = 5.0
BACKSTOP_S = 30.0  # re-read stored state if nothing arrived for this long (lost-event backstop)
PAGE = 100  # stored entries per replay read
U64_MAX = (1 << 64) - 1
STREAM_ID_RE = re.compile(r"^([0-9]+)(?:-([0-9]+))?$", re.ASCII)

StreamId = tuple[int, int]


def parse_stream_id(value: str, field: str) -> StreamId:
    """A concrete stream id `<ms>` or `<ms>-<seq>` (`<ms>` = `<ms>-0`); empty = `0-0`."""
    if value == "":
        return (0, 0)
    m = STREAM_ID_RE.match(value)
    if m:
        ms, seq = int(m.group(1)), int(m.group(2) or 0)
        if ms <= U64_MAX and seq <= U64_MAX:
            return (ms, seq)
    raise InvalidInput(
        field, f"invalid stream id {value!r} (expected '<ms>' or '<ms>-<seq>'; empty = '0-0')"
    )


def to_stream_id(value: str) -> StreamId:
    """A stored stream id as a sortable pair; unknown/empty sorts first."""
    try:
        return parse_stream_id(value, "stream_id")
    except FlowFabricError:
        return (0, 0)


def format_stream_id(sid: StreamId) -> str:
    return f"{sid[0]}-{sid[1]}"


def as_int(value: Any) -> int:
    try:
        return int64(int(text(value) or 0))
    except ValueError:
        return 0


def score_pairs(raw: Any) -> list[tuple[str, int]]:
    """ZRANGE … WITHSCORES (flat list on RESP2, pairs on RESP3) as (member, score)."""
    items = list(raw or [])
    if items and isinstance(items[0], list | tuple):
        return [(text(m), as_int(s)) for m, s in items]
    return [(text(items[i]), as_int(items[i + 1])) for i in range(0, len(items), 2)]


def shutting_down() -> FlowFabricError:
    return FlowFabricError(
        "shutting_down", message="the server is shutting down; resume elsewhere",
        retry_after_ms=1000,
    )  # fmt: skip


class Feed:
    """The live events of one execution for one watcher: a bounded queue plus flags.

    The listener callbacks run on the hub's reader task and never block or await.
    """

    def __init__(
        self, eid: ExecutionId, limit: int, accept: Callable[[dict[str, Any]], bool],
        *, fail_on_overflow: bool,
    ) -> None:  # fmt: skip
        self.eid = str(eid)
        self.limit = limit
        self.accept = accept
        self.fail_on_overflow = fail_on_overflow
        self.queue: deque[dict[str, Any]] = deque()
        self.overflowed = False
        self.resync = False
        self.terminal = False
        self.wake = asyncio.Event()

    def on_signal_event(self, event: dict[str, Any]) -> None:
        if event.get("type") == "resync":
            self.resync = True
        elif event.get("execution_id") == self.eid and self.accept(event):
            if self.overflowed:
                return
            if len(self.queue) < self.limit:
                self.queue.append(event)
            elif self.fail_on_overflow:
                self.overflowed = True
            else:  # coalesce: drop what is queued and re-read the stored state instead
                self.queue.clear()
                self.resync = True
        else:
            return
        self.wake.set()

    def on_exec_event(self, event: dict[str, Any]) -> None:
        if event.get("type") == "resync":
            self.resync = True
        elif event.get("execution_id") == self.eid and event.get("public_state") in TERMINAL_STATES:
            self.terminal = True
        else:
            return
        self.wake.set()

    def idle(self) -> bool:
        return not (self.queue or self.resync or self.terminal or self.overflowed)


class Source(Protocol):
    """What one kind of watch reads: its stored history, and what one live event shows."""

    def replay(self) -> AsyncIterator[Any]: ...

    def live(self, event: dict[str, Any]) -> AsyncIterator[Any]: ...


# -- WatchSignals -----------------------------------------------------------------------------


class SignalLog:
    """Signals of one execution (or one of its waitpoints) after the client's cursor.

    With a waitpoint: the waitpoint's stream after `after_stream` (exclusive). Without: the
    execution's signal zset after `after_accepted` (exclusive; with `after_stream` given, signals
    accepted in that same millisecond whose stream id is greater are included too), ordered by
    (accepted_at, stream id). `seen` de-duplicates replay against live events.
    """

    def __init__(
        self, store: Store, eid: ExecutionId, waitpoint_id: str, after_stream: StreamId,
        stream_given: bool, after_accepted: int,
    ) -> None:  # fmt: skip
        self.store = store
        self.eid = eid
        self.waitpoint_id = waitpoint_id
        self.after_stream = after_stream
        self.stream_given = stream_given
        self.after_accepted = after_accepted
        self.seen: set[str] = set()
        self.last_stream = after_stream  # waitpoint mode: last delivered stream id
        self.last_accepted: int | None = None  # execution mode: last delivered accepted_at

    def wanted(self, record: t.SignalRecord) -> bool:
        """After the client's cursor, and really a signal of this execution (and waitpoint)."""
        if record.signal_id in self.seen or record.execution_id != str(self.eid):
            return False
        sid = to_stream_id(record.stream_id)
        if self.waitpoint_id:
            return record.waitpoint_id == self.waitpoint_id and sid > self.after_stream
        if record.accepted_at != self.after_accepted:
            return record.accepted_at > self.after_accepted
        return self.stream_given and sid > self.after_stream

    def delivered(self, record: t.SignalRecord) -> signal_pb2.WatchSignalsResponse:
        self.seen.add(record.signal_id)
        self.last_stream = max(self.last_stream, to_stream_id(record.stream_id))
        self.last_accepted = max(self.last_accepted or 0, record.accepted_at)
        return signal_pb2.WatchSignalsResponse(signal=record)

    async def replay(self) -> AsyncIterator[signal_pb2.WatchSignalsResponse]:
        source = self._stream_replay() if self.waitpoint_id else self._zset_replay()
        async for record in source:
            if self.wanted(record):
                yield self.delivered(record)

    async def live(self, event: dict[str, Any]) -> AsyncIterator[signal_pb2.WatchSignalsResponse]:
        signal_id = text(event.get("signal_id"))
        if not signal_id or signal_id in self.seen:
            return
        record = await read_signal(self.store, self.eid, signal_id, text(event.get("stream_id")))
        if record is not None and self.wanted(record):
            yield self.delivered(record)

    async def _stream_replay(self) -> AsyncIterator[t.SignalRecord]:
        key = WaitpointKeys(self.eid.tag, self.waitpoint_id).stream
        cursor = self.last_stream
        while cursor < (U64_MAX, U64_MAX):
            entries = await self.store.call(
                "XRANGE", key, "(" + format_stream_id(cursor), "+", "COUNT", str(PAGE)
            )
            entries = list(entries or [])
            if not entries:
                return
            items = [(hash_to_dict(e[1]).get("signal_id", ""), text(e[0])) for e in entries]
            for record in await self._read([(s, i) for s, i in items if s not in self.seen]):
                yield record
            cursor = to_stream_id(text(entries[-1][0]))
            if len(entries) < PAGE:
                return

    async def _zset_replay(self) -> AsyncIterator[t.SignalRecord]:
        """The signal zset by score; a same-millisecond group is sorted by stream id whole."""
        if self.last_accepted is not None:
            low = str(self.last_accepted)  # re-read: inclusive, `seen` drops the delivered
        else:
            low = ("" if self.stream_given else "(") + str(self.after_accepted)
        key = ExecKeys(self.eid).signals
        held: list[tuple[str, int]] = []
        offset = 0
        while True:
            page = score_pairs(
                await self.store.call(
                    "ZRANGE", key, low, "+inf", "BYSCORE", "LIMIT", str(offset), str(PAGE),
                    "WITHSCORES",
                )
            )  # fmt: skip
            offset += len(page)
            held += [(m, s) for m, s in page if m not in self.seen]
            last_page = len(page) < PAGE
            cut = len(held) if last_page else group_start(held)
            ready, held = held[:cut], held[cut:]
            records = await self._read([(m, "") for m, _ in ready])
            records.sort(key=lambda r: (r.accepted_at, to_stream_id(r.stream_id), r.signal_id))
            for record in records:
                yield record
            if last_page:
                return

    async def _read(self, items: list[tuple[str, str]]) -> list[t.SignalRecord]:
        """Signal records (with payloads) by (signal id, stream id or ""), in one pipeline."""
        if not items:
            return []
        tag = self.eid.tag
        pipe = self.store.pipeline()
        for signal_id, _ in items:
            pipe.hgetall(signal_key(tag, signal_id))
            pipe.get(payload_key(tag, signal_id))
        raw = await self.store.run_pipeline(pipe)
        records: list[t.SignalRecord] = []
        for n, (_, stream_id) in enumerate(items):
            fields = hash_to_dict(raw[2 * n])
            if fields:
                payload = raw[2 * n + 1]
                body = payload if isinstance(payload, bytes) else text(payload).encode()
                records.append(signal_record(fields, body, stream_id))
        return records


def group_start(held: list[tuple[str, int]]) -> int:
    """Index of the first member of the last same-score group (held back to the next page)."""
    if not held:
        return 0
    last = held[-1][1]
    i = len(held)
    while i > 0 and held[i - 1][1] == last:
        i -= 1
    return i


# -- WatchWaitpoints --------------------------------------------------------------------------


class WaitpointView:
    """Which waitpoints of one execution the watcher has been shown open, and which closed."""

    def __init__(self, store: Store, eid: ExecutionId) -> None:
        self.store = store
        self.eid = eid
        self.shown: dict[str, str] = {}  # waitpoint id -> the state it was shown open in
        self.closed: set[str] = set()

    async def replay(self) -> AsyncIterator[signal_pb2.WatchWaitpointsResponse]:
        """Each open waitpoint not yet shown in its current state; closures of shown ones."""
        members = await self.store.call("SMEMBERS", ExecKeys(self.eid).waitpoints)
        for waitpoint_id in sorted(text(m) for m in members or ()):
            if waitpoint_id not in self.closed:
                async for message in self._refresh(waitpoint_id, 0):
                    yield message

    async def live(
        self, event: dict[str, Any]
    ) -> AsyncIterator[signal_pb2.WatchWaitpointsResponse]:
        waitpoint_id = text(event.get("waitpoint_id"))
        if not waitpoint_id or waitpoint_id in self.closed:
            return
        at = as_int(event.get("at"))
        if event.get("type") == "waitpoint_opened":
            async for message in self._refresh(waitpoint_id, at):
                yield message
        else:
            yield self._closed(waitpoint_id, text(event.get("close_reason")), at)

    async def _refresh(
        self, waitpoint_id: str, at: int
    ) -> AsyncIterator[signal_pb2.WatchWaitpointsResponse]:
        """Re-read one waitpoint (the token comes from its hash, never from an event)."""
        info = await read_waitpoint(self.store, self.eid, waitpoint_id)
        if info is None:
            return
        if info.state in OPEN_STATES and info.waitpoint_token:
            if self.shown.get(waitpoint_id) != info.state:
                self.shown[waitpoint_id] = info.state
                when = at or info.activated_at or info.created_at
                yield signal_pb2.WatchWaitpointsResponse(
                    opened=signal_pb2.WatchWaitpointsResponse.Opened(waitpoint=info), at=when
                )
        elif info.state not in OPEN_STATES and waitpoint_id in self.shown:
            reason, closed_at = await self.store.call(
                "HMGET", WaitpointKeys(self.eid.tag, waitpoint_id).waitpoint, "close_reason",
                "closed_at",
            )  # fmt: skip
            yield self._closed(waitpoint_id, text(reason), at or as_int(closed_at))

    def _closed(
        self, waitpoint_id: str, reason: str, at: int
    ) -> signal_pb2.WatchWaitpointsResponse:
        self.shown.pop(waitpoint_id, None)
        self.closed.add(waitpoint_id)
        return signal_pb2.WatchWaitpointsResponse(
            closed=signal_pb2.WatchWaitpointsResponse.Closed(
                waitpoint_id=waitpoint_id, close_reason=reason
            ),
            at=at,
        )
