"""WatchSignals and WatchWaitpoints (docs/suspension.md#watches,
docs/architecture.md#events-and-watches), both topologies.

First part: `SignalWatches` driven directly against real Valkey with a real EventHub; the stored
records (docs/suspension.md#data-model key and field names) and the events (CONTRACT "Events") are
written and
`SPUBLISH`ed by the test exactly as the functions do, so replay, live delivery, de-duplication,
resync, the bounded queue, shutdown and the terminal end are each checked in isolation.
Second part: the same watches end to end through gRPC on the real functions.

Every wait is bounded (a hang fails the test); no assertion depends on how fast anything ran.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from flowfabric.server.api.watches import SignalWatches, parse_stream_id
from flowfabric.server.app import FlowFabricServer
from flowfabric.server.config import Config
from flowfabric.server.engine.events import RESYNC, EventHub
from flowfabric.server.valkey.errors import FlowFabricError
from flowfabric.server.valkey.ids import ExecutionId
from flowfabric.server.valkey.keys import ExecKeys, PartitionKeys, WaitpointKeys, signal_key
from flowfabric.server.valkey.keys import signal_payload_key as payload_key
from flowfabric.server.valkey.store import Store
from flowfabric.v1 import execution_pb2 as epb
from flowfabric.v1 import signal_pb2
from flowfabric.v1 import signal_pb2 as spb
from flowfabric.v1 import types_pb2 as t
from flowfabric.v1 import worker_pb2 as wpb
from tests.api.test_lifecycle import claim_one, create
from tests.api.util import error_info, expect_error
from tests.conftest import API_TOKEN, HMAC_SECRET, Api

WAIT_S = 10.0  # bound on any single wait: a hang fails, nothing is timed


# -- synthetic records and events -------------------------------------------------------------


def new_eid(partition: int = 3) -> ExecutionId:
    return ExecutionId(partition, str(uuid.uuid4()))


class Synth:
    """Writes stored records and publishes events the way the functions do."""

    def __init__(self, store: Store, eid: ExecutionId) -> None:
        self.store = store
        self.eid = eid
        self.clock = 1_700_000_000_000
        self.p = PartitionKeys(eid.tag)

    async def execution(self, public_state: str = "suspended") -> None:
        phase = "terminal" if public_state in ("completed", "cancelled") else public_state
        await self.store.call(
            "HSET", ExecKeys(self.eid).core, "execution_id", str(self.eid),
            "public_state", public_state, "lifecycle_phase", phase,
        )  # fmt: skip

    async def signal(
        self, waitpoint_id: str, name: str = "s", payload: bytes = b"", *,
        accepted_at: int | None = None, publish: bool = True, eid: ExecutionId | None = None,
    ) -> tuple[str, str, int]:  # fmt: skip
        """Store one accepted signal (hash, payload, stream entry, zset member); publish it."""
        eid = eid or self.eid
        if accepted_at is None:
            self.clock += 1
            accepted_at = self.clock
        sid = str(uuid.uuid4())
        tag = eid.tag
        fields = {
            "signal_id": sid, "target_execution_id": str(eid),
            "target_waitpoint_id": waitpoint_id, "target_scope": "waitpoint",
            "signal_name": name, "signal_category": "custom", "source_type": "test",
            "source_identity": "t", "correlation_id": "", "idempotency_key": "",
            "created_at": str(accepted_at), "accepted_at": str(accepted_at),
            "matched_waitpoint_id": waitpoint_id, "payload_encoding": "json",
            "observed_effect": "appended_to_waitpoint",
        }  # fmt: skip
        stream_id = text(
            await self.store.call(
                "XADD", WaitpointKeys(tag, waitpoint_id).stream, f"{accepted_at}-*",
                "signal_id", sid, "signal_name", name, "signal_category", "custom",
                "source_type", "test", "source_identity", "t", "matched", "0",
                "accepted_at", str(accepted_at),
            )
        )  # fmt: skip
        fields["stream_id"] = stream_id  # the functions store it with the signal
        await self.store.call("HSET", signal_key(tag, sid), *_flat(fields))
        if payload:
            await self.store.call("SET", payload_key(tag, sid), payload)
        await self.store.call("ZADD", ExecKeys(eid).signals, str(accepted_at), sid)
        if publish:
            await self.publish_signal(waitpoint_id, sid, name, stream_id, accepted_at, eid=eid)
        return sid, stream_id, accepted_at

    async def publish_signal(
        self, waitpoint_id: str, sid: str, name: str, stream_id: str, accepted_at: int,
        eid: ExecutionId | None = None,
    ) -> None:  # fmt: skip
        await self.spublish(
            self.p.signal_events, type="signal_accepted", execution_id=str(eid or self.eid),
            waitpoint_id=waitpoint_id, at=accepted_at, signal_id=sid, signal_name=name,
            signal_category="custom", source_type="test", source_identity="t",
            correlation_id="", observed_effect="appended_to_waitpoint", stream_id=stream_id,
            accepted_at=accepted_at,
        )  # fmt: skip

    async def waitpoint(
        self, state: str, *, names: tuple[str, ...] = (), token: str = "k1:" + "ab" * 20,
        close_reason: str = "", publish: bool = True,
    ) -> str:  # fmt: skip
        wp = str(uuid.uuid4())
        await self.set_waitpoint(wp, state, names=names, token=token, close_reason=close_reason)
        await self.store.call("SADD", ExecKeys(self.eid).waitpoints, wp)
        if publish:
            await self.opened(wp, state)
        return wp

    async def set_waitpoint(
        self, wp: str, state: str, *, names: tuple[str, ...] = (), token: str = "",
        close_reason: str = "",
    ) -> None:  # fmt: skip
        self.clock += 1
        wk = WaitpointKeys(self.eid.tag, wp)
        fields = {
            "waitpoint_id": wp, "execution_id": str(self.eid), "attempt_index": "0",
            "state": state, "created_at": "1000", "activated_at":
            str(self.clock) if state == "active" else "", "close_reason": close_reason,
            "closed_at": str(self.clock) if close_reason else "", "waitpoint_key": f"wpk:{wp}",
        }  # fmt: skip
        if token:
            fields["waitpoint_token"] = token
        await self.store.call("HSET", wk.waitpoint, *_flat(fields))
        if names:
            cond = {"total_matchers": str(len(names))}
            cond |= {f"matcher:{i}:name": n for i, n in enumerate(names)}
            await self.store.call("HSET", wk.condition, *_flat(cond))

    async def opened(self, wp: str, state: str) -> None:
        await self.spublish(
            self.p.signal_events, type="waitpoint_opened", execution_id=str(self.eid),
            waitpoint_id=wp, at=self.clock, state=state,
        )  # fmt: skip

    async def closed(self, wp: str, reason: str) -> None:
        await self.set_waitpoint(wp, "closed", close_reason=reason, token="k1:" + "ab" * 20)
        await self.spublish(
            self.p.signal_events, type="waitpoint_closed", execution_id=str(self.eid),
            waitpoint_id=wp, at=self.clock, close_reason=reason,
        )  # fmt: skip

    async def terminal(self, public_state: str = "completed") -> None:
        await self.execution(public_state)
        await self.spublish(
            self.p.exec_events, type="state_changed", execution_id=str(self.eid),
            public_state=public_state, at=self.clock,
        )  # fmt: skip

    async def spublish(self, channel: str, **event: Any) -> None:
        await self.store.call("SPUBLISH", channel, json.dumps(event))


def _flat(fields: dict[str, str]) -> list[str]:
    return [x for kv in fields.items() for x in kv]


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@pytest.fixture
async def hub(store: Store) -> AsyncIterator[EventHub]:
    hub = EventHub(store)
    yield hub
    await hub.stop()


async def take(stream: AsyncIterator[Any], n: int = 1) -> list[Any]:
    """The next `n` messages (bounded wait)."""
    out = []
    async with asyncio.timeout(WAIT_S):
        for _ in range(n):
            out.append(await anext(stream))
    return out


async def ends(stream: AsyncIterator[Any]) -> list[Any]:
    """Everything until the stream ends (bounded wait)."""
    out = []
    async with asyncio.timeout(WAIT_S):
        async for message in stream:
            out.append(message)
    return out


class Probe:
    """A listener of its own on a channel: proves an event reached this process's listeners."""

    def __init__(self, hub: EventHub, channel: str) -> None:
        self.hub, self.channel = hub, channel
        self.events: list[dict[str, Any]] = []
        self.changed = asyncio.Event()

    def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        self.changed.set()

    async def until(self, predicate: Any) -> None:
        async with asyncio.timeout(WAIT_S):
            while not predicate(self.events):
                self.changed.clear()
                await self.changed.wait()


async def close(stream: AsyncIterator[Any]) -> None:
    """Close a watch the way a cancelled RPC does (its listeners go away)."""
    assert isinstance(stream, AsyncGenerator)
    await stream.aclose()


def ids(messages: list[signal_pb2.WatchSignalsResponse]) -> list[str]:
    return [m.signal.signal_id for m in messages]


# -- WatchSignals, direct ---------------------------------------------------------------------


async def test_cursor_grammar() -> None:
    assert parse_stream_id("", "f") == (0, 0)
    assert parse_stream_id("5", "f") == (5, 0)
    assert parse_stream_id("5-7", "f") == (5, 7)
    for bad in ("-", "+", "start", "end", "5-", "-5", "a-1", " 5", "1-2-3", str(1 << 64)):
        with pytest.raises(FlowFabricError) as caught:
            parse_stream_id(bad, "after_stream_id")
        assert caught.value.code == "invalid_input"
        assert caught.value.metadata == {"field": "after_stream_id"}


async def test_bad_input_and_unknown_execution(store: Store, hub: EventHub) -> None:
    w = SignalWatches(store, hub)
    eid = new_eid()
    cases = [
        (w.signals(eid, "not-a-uuid", "", 0), "invalid_input"),
        (w.signals(eid, str(uuid.uuid4()), "1-x", 0), "invalid_input"),
        (w.signals(eid, "", "", -1), "invalid_input"),
        (w.signals(eid, "", "", 0), "execution_not_found"),
        (w.waitpoints(eid), "execution_not_found"),
    ]
    for stream, code in cases:
        with pytest.raises(FlowFabricError) as caught:
            await take(stream)
        assert caught.value.code == code


async def test_waitpoint_of_another_execution_is_not_watchable(store: Store, hub: EventHub) -> None:
    a, b = Synth(store, new_eid()), Synth(store, new_eid())
    await a.execution()
    await b.execution()
    wp = await b.waitpoint("active")
    await b.signal(wp, payload=b"secret of b")
    with pytest.raises(FlowFabricError) as caught:
        await take(SignalWatches(store, hub).signals(a.eid, wp, "", 0))
    assert caught.value.code == "waitpoint_not_found"


async def test_waitpoint_replay_then_live_once_each_in_order(store: Store, hub: EventHub) -> None:
    s = Synth(store, new_eid())
    await s.execution()
    wp, other = str(uuid.uuid4()), str(uuid.uuid4())
    stored = [await s.signal(wp, f"n{i}", f"p{i}".encode()) for i in range(3)]
    await s.signal(other, "elsewhere")
    stream = SignalWatches(store, hub).signals(s.eid, wp, "", 0)
    first = await take(stream, 3)
    assert ids(first) == [x[0] for x in stored]
    assert [m.signal.stream_id for m in first] == [x[1] for x in stored]
    assert [m.signal.payload for m in first] == [b"p0", b"p1", b"p2"]
    assert first[0].signal.signal_name == "n0"
    assert first[0].signal.waitpoint_id == wp
    assert first[0].signal.execution_id == str(s.eid)
    # a repeated event of a delivered signal, a foreign one, then two new ones
    await s.publish_signal(wp, stored[1][0], "n1", stored[1][1], stored[1][2])
    await s.signal(other, "elsewhere again")
    await s.signal(wp, "ignored", eid=new_eid())  # another execution, same partition
    fresh = [await s.signal(wp, f"m{i}") for i in range(2)]
    assert ids(await take(stream, 2)) == [x[0] for x in fresh]
    await close(stream)


async def test_stream_cursor_is_exclusive(store: Store, hub: EventHub) -> None:
    s = Synth(store, new_eid())
    await s.execution()
    wp = str(uuid.uuid4())
    stored = [await s.signal(wp, publish=False) for _ in range(4)]
    stream = SignalWatches(store, hub).signals(s.eid, wp, stored[1][1], 0)
    assert ids(await take(stream, 2)) == [x[0] for x in stored[2:]]
    await close(stream)
    ms_only = str(parse_stream_id(stored[0][1], "x")[0])  # `<ms>` = `<ms>-0`: after it
    stream = SignalWatches(store, hub).signals(s.eid, wp, ms_only, 0)
    assert ids(await take(stream, 3)) == [x[0] for x in stored[1:]]
    await close(stream)


async def test_execution_replay_orders_by_accepted_at_then_stream_id(
    store: Store, hub: EventHub
) -> None:
    s = Synth(store, new_eid())
    await s.execution()
    wp1, wp2 = str(uuid.uuid4()), str(uuid.uuid4())
    # zset order is (score, member): same-millisecond signals must come by stream id instead
    early = await s.signal(wp1, accepted_at=4000, publish=False)
    same = [await s.signal(w, accepted_at=5000, publish=False) for w in (wp1, wp2, wp1)]
    later = await s.signal(wp2, accepted_at=6000, publish=False)
    stored = [early, *same, later]
    stream = SignalWatches(store, hub).signals(s.eid, "", "", 0)
    got = await take(stream, 5)
    assert ids(got) == [
        x[0] for x in sorted(stored, key=lambda x: (x[2], parse_stream_id(x[1], "x"), x[0]))
    ]
    assert [m.signal.stream_id for m in got] == [
        dict((x[0], x[1]) for x in stored)[i] for i in ids(got)
    ]
    await close(stream)
    # after_accepted_at is exclusive
    stream = SignalWatches(store, hub).signals(s.eid, "", "", 5000)
    assert ids(await take(stream)) == [later[0]]
    await close(stream)


async def test_execution_replay_pages_keep_same_millisecond_groups_whole(
    store: Store, hub: EventHub
) -> None:
    s = Synth(store, new_eid())
    await s.execution()
    wp = str(uuid.uuid4())
    # 250 signals in 3 milliseconds: the pages (100) split groups, the order must not break
    stored = [await s.signal(wp, accepted_at=7000 + i // 90, publish=False) for i in range(250)]
    stream = SignalWatches(store, hub).signals(s.eid, "", "", 0)
    got = await take(stream, 250)
    assert ids(got) == [x[0] for x in stored]
    await close(stream)


async def test_execution_cursor_with_stream_id_tie_break(store: Store, hub: EventHub) -> None:
    s = Synth(store, new_eid())
    await s.execution()
    wp = str(uuid.uuid4())
    stored = [await s.signal(wp, accepted_at=9000, publish=False) for _ in range(3)]
    stream = SignalWatches(store, hub).signals(s.eid, "", stored[0][1], 9000)
    assert ids(await take(stream, 2)) == [x[0] for x in stored[1:]]
    await close(stream)


@pytest.mark.parametrize("by_waitpoint", [True, False])
async def test_signal_in_history_and_live_is_delivered_once(
    store: Store, hub: EventHub, by_waitpoint: bool
) -> None:
    s = Synth(store, new_eid())
    await s.execution()
    wp = str(uuid.uuid4())
    first = await s.signal(wp, publish=False)
    stream = SignalWatches(store, hub).signals(s.eid, wp if by_waitpoint else "", "", 0)
    assert ids(await take(stream)) == [first[0]]
    a = await s.signal(wp, publish=False)  # stored while live; its event comes later
    await s.publish_signal(wp, first[0], "s", first[1], first[2])  # a stale repeat
    await s.publish_signal(wp, a[0], "s", a[1], a[2])
    await s.publish_signal(wp, a[0], "s", a[1], a[2])
    b = await s.signal(wp)
    assert ids(await take(stream, 2)) == [a[0], b[0]]
    await close(stream)


@pytest.mark.parametrize("by_waitpoint", [True, False])
async def test_resync_rereads_history_lost_while_disconnected(
    store: Store, hub: EventHub, by_waitpoint: bool
) -> None:
    s = Synth(store, new_eid())
    await s.execution()
    wp = str(uuid.uuid4())
    a = await s.signal(wp)
    stream = SignalWatches(store, hub).signals(s.eid, wp if by_waitpoint else "", "", 0)
    assert ids(await take(stream)) == [a[0]]
    lost = [await s.signal(wp, publish=False) for _ in range(2)]  # their events were lost
    hub.publish_local(s.p.signal_events, RESYNC | {"channel": s.p.signal_events})
    assert ids(await take(stream, 2)) == [x[0] for x in lost]
    b = await s.signal(wp)
    assert ids(await take(stream)) == [b[0]]
    await close(stream)


async def test_ends_after_terminal_with_everything_stored(store: Store, hub: EventHub) -> None:
    s = Synth(store, new_eid())
    await s.execution()
    wp = str(uuid.uuid4())
    a = await s.signal(wp)
    streams = [SignalWatches(store, hub).signals(s.eid, w, "", 0) for w in (wp, "")]
    for stream in streams:
        assert ids(await take(stream)) == [a[0]]
    unannounced = await s.signal(wp, publish=False)  # its event never arrives
    await s.terminal("cancelled")
    for stream in streams:
        assert ids(await ends(stream)) == [unannounced[0]]
    # already terminal: replays, then ends at once
    assert ids(await ends(SignalWatches(store, hub).signals(s.eid, wp, "", 0))) == [
        a[0], unannounced[0],
    ]  # fmt: skip


async def test_slow_watcher_ends_resource_exhausted_others_continue(
    store: Store, hub: EventHub
) -> None:
    s = Synth(store, new_eid())
    await s.execution()
    wp = str(uuid.uuid4())
    a = await s.signal(wp)
    slow = SignalWatches(store, hub, queue_limit=3).signals(s.eid, wp, "", 0)
    fast = SignalWatches(store, hub, queue_limit=3).signals(s.eid, "", "", 0)
    assert ids(await take(slow)) == ids(await take(fast)) == [a[0]]
    probe = Probe(hub, s.p.signal_events)
    async with hub.listen(s.p.signal_events, probe):
        sent = []
        for _ in range(6):
            sent.append((await s.signal(wp))[0])
            # the fast watcher keeps up; the slow one does not read at all
            assert ids(await take(fast)) == [sent[-1]]
        await probe.until(lambda evs: [e.get("signal_id") for e in evs][-1:] == sent[-1:])
    with pytest.raises(FlowFabricError) as caught:
        await take(slow, 6)
    assert caught.value.code == "concurrency_limit"
    assert caught.value.spec.status.name == "RESOURCE_EXHAUSTED"
    assert caught.value.metadata == {"pool": "watch_queue", "max": "3"}
    await close(fast)


async def test_shutdown_ends_live_watches_shutting_down(store: Store, hub: EventHub) -> None:
    s = Synth(store, new_eid())
    await s.execution()
    wp = await s.waitpoint("active")
    a = await s.signal(wp)
    watches = SignalWatches(store, hub)
    sig, wps = watches.signals(s.eid, "", "", 0), watches.waitpoints(s.eid)
    assert ids(await take(sig)) == [a[0]]
    assert (await take(wps))[0].opened.waitpoint.waitpoint_id == wp
    pending = [asyncio.ensure_future(take(x)) for x in (sig, wps)]
    watches.shutdown()
    for task in pending:
        with pytest.raises(FlowFabricError) as caught:
            await task
        assert caught.value.code == "shutting_down"


async def test_client_cancel_removes_the_listeners(store: Store, hub: EventHub) -> None:
    s = Synth(store, new_eid())
    await s.execution()
    wp = str(uuid.uuid4())
    await s.signal(wp)
    stream = SignalWatches(store, hub).signals(s.eid, wp, "", 0)
    await take(stream)
    task = asyncio.ensure_future(take(stream))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await close(stream)
    assert not hub._listeners[s.p.signal_events]
    assert not hub._listeners[s.p.exec_events]


# -- WatchWaitpoints, direct ------------------------------------------------------------------


async def test_waitpoints_open_ones_with_token_then_live(store: Store, hub: EventHub) -> None:
    s = Synth(store, new_eid())
    await s.execution("active")
    pend = await s.waitpoint("pending", token="k1:" + "11" * 20)
    act = await s.waitpoint("active", names=("approve", "", "deny"), token="k1:" + "22" * 20)
    await s.waitpoint("closed", close_reason="resumed")
    stream = SignalWatches(store, hub).waitpoints(s.eid)
    got = await take(stream, 2)
    assert sorted(m.opened.waitpoint.waitpoint_id for m in got) == sorted([pend, act])
    by_id = {m.opened.waitpoint.waitpoint_id: m for m in got}
    assert by_id[pend].opened.waitpoint.waitpoint_token == "k1:" + "11" * 20
    assert by_id[pend].opened.waitpoint.state == "pending"
    assert by_id[act].opened.waitpoint.required_signal_names == ["approve", "deny"]
    assert by_id[act].at == by_id[act].opened.waitpoint.activated_at > 0
    # live: a new one (token from the hash), activation of the pending one, closures
    fresh = await s.waitpoint("pending", token="k1:" + "33" * 20)
    [m] = await take(stream)
    assert (m.opened.waitpoint.waitpoint_id, m.opened.waitpoint.waitpoint_token) == (
        fresh, "k1:" + "33" * 20,
    )  # fmt: skip
    assert m.at == s.clock
    await s.set_waitpoint(pend, "active", token="k1:" + "11" * 20)
    await s.opened(pend, "active")
    await s.opened(pend, "active")  # a repeat shows nothing new
    await s.closed(act, "resumed")
    await s.closed(act, "resumed")
    got = await take(stream, 2)
    assert got[0].WhichOneof("event") == "opened"
    assert (got[0].opened.waitpoint.waitpoint_id, got[0].opened.waitpoint.state) == (
        pend, "active",
    )  # fmt: skip
    assert got[1].WhichOneof("event") == "closed"
    assert (got[1].closed.waitpoint_id, got[1].closed.close_reason) == (act, "resumed")
    # terminal: the closures written by the terminal call are read back, then the end
    await s.set_waitpoint(pend, "closed", close_reason="cancelled", token="k1:" + "11" * 20)
    await s.terminal("cancelled")
    tail = await ends(stream)
    assert [(m.WhichOneof("event"), m.closed.waitpoint_id) for m in tail] == [("closed", pend)]
    assert tail[0].closed.close_reason == "cancelled"
    assert tail[0].at == s.clock


async def test_waitpoints_resync_and_overflow_reread(store: Store, hub: EventHub) -> None:
    s = Synth(store, new_eid())
    await s.execution("active")
    wp = await s.waitpoint("pending")
    stream = SignalWatches(store, hub, queue_limit=2).waitpoints(s.eid)
    assert (await take(stream))[0].opened.waitpoint.waitpoint_id == wp
    # lost events: a re-read shows the closure and the new waitpoint
    await s.set_waitpoint(wp, "expired", close_reason="never_committed", token="k1:" + "ab" * 20)
    new = await s.waitpoint("pending", publish=False)
    hub.publish_local(s.p.exec_events, RESYNC | {"channel": s.p.exec_events})
    got = await take(stream, 2)
    assert {(m.WhichOneof("event"), m.closed.waitpoint_id or m.opened.waitpoint.waitpoint_id)
            for m in got} == {("closed", wp), ("opened", new)}  # fmt: skip
    # more events than the queue holds: coalesced into one re-read, nothing lost, no error
    probe = Probe(hub, s.p.signal_events)
    async with hub.listen(s.p.signal_events, probe):
        many = [await s.waitpoint("pending") for _ in range(5)]
        await probe.until(lambda evs: len(evs) >= 5)
    got = await take(stream, 5)
    assert sorted(m.opened.waitpoint.waitpoint_id for m in got) == sorted(many)
    await close(stream)


# -- end to end through gRPC on the real functions -------------------------------------------

C = grpc.StatusCode
CONDITION = json.dumps(
    {
        "condition_type": "signal_set",
        "required_signal_names": ["done"],
        "signal_match_mode": "any",
        "minimum_signal_count": 1,
    }
)


@dataclass
class Suspended:
    eid: str
    waitpoint_id: str
    token: str


async def suspend(api: Api, lease: t.LeaseHandle, **kw: Any) -> wpb.SuspendResponse:
    kw.setdefault("reason_code", "waiting_for_signal")
    kw.setdefault("requested_by", "worker")
    kw.setdefault("resume_condition_json", CONDITION)
    kw.setdefault("resume_policy_json", "{}")
    return await api.worker.Suspend(  # type: ignore[no-any-return]
        wpb.SuspendRequest(lease=lease, **kw), metadata=api.metadata
    )


async def suspended(api: Api) -> Suspended:
    """A claimed execution suspended on `done`; other signal names are accepted as no_op."""
    await create(api)
    lease = (await claim_one(api)).lease
    reply = await suspend(api, lease)
    assert reply.WhichOneof("outcome") == "suspended", reply
    return Suspended(lease.execution_id, reply.suspended.waitpoint_id,
                     reply.suspended.waitpoint_token)  # fmt: skip


async def deliver(api: Api, s: Suspended, name: str = "tick", payload: bytes = b"") -> str:
    reply = await api.signal.DeliverSignal(
        spb.DeliverSignalRequest(
            execution_id=s.eid, waitpoint_id=s.waitpoint_id, signal_name=name,
            signal_category="custom", source_type="test", source_identity="t",
            payload=payload, waitpoint_token=s.token,
        ),
        metadata=api.metadata,
    )  # fmt: skip
    assert reply.WhichOneof("outcome") == "accepted", reply
    return str(reply.accepted.signal_id)


async def cancel(api: Api, eid: str) -> None:
    await api.execution.CancelExecution(
        epb.CancelExecutionRequest(execution_id=eid, reason="test"), metadata=api.metadata
    )


def watch_signals(api: Api, eid: str, waitpoint_id: str = "", **kw: Any) -> Any:
    return api.signal.WatchSignals(
        spb.WatchSignalsRequest(execution_id=eid, waitpoint_id=waitpoint_id, **kw),
        metadata=api.metadata,
    )


def watch_waitpoints(api: Api, eid: str) -> Any:
    return api.signal.WatchWaitpoints(
        spb.WatchWaitpointsRequest(execution_id=eid), metadata=api.metadata
    )


async def read(call: Any, n: int) -> list[Any]:
    """The next `n` messages of a gRPC stream (bounded wait)."""
    out: list[Any] = []
    async with asyncio.timeout(WAIT_S):
        for _ in range(n):
            msg = await call.read()
            assert msg is not grpc.aio.EOF, f"stream ended after {len(out)} of {n}"
            out.append(msg)
    return out


async def rest(call: Any) -> list[Any]:
    """Every remaining message until the stream ends OK (bounded wait)."""
    out: list[Any] = []
    async with asyncio.timeout(WAIT_S):
        while (msg := await call.read()) is not grpc.aio.EOF:
            out.append(msg)
    assert await call.code() == C.OK
    return out


async def test_three_watchers_each_receive_100_signals_once_in_order(api: Api) -> None:
    s = await suspended(api)
    first = await deliver(api, s, payload=b"p0")
    calls = [watch_signals(api, s.eid, s.waitpoint_id), watch_signals(api, s.eid, s.waitpoint_id),
             watch_signals(api, s.eid)]  # fmt: skip
    for call in calls:  # each is live: its replay is done
        assert ids(await read(call, 1)) == [first]

    async def send() -> list[str]:
        return [await deliver(api, s, payload=f"p{i}".encode()) for i in range(1, 100)]

    sent, *received = await asyncio.gather(send(), *(read(call, 99) for call in calls))
    for got in received:
        assert ids(got) == sent
        assert [m.signal.payload for m in got] == [f"p{i}".encode() for i in range(1, 100)]
        assert all(m.signal.observed_effect == "no_op" and m.signal.stream_id for m in got)
        stream_ids = [parse_stream_id(m.signal.stream_id, "x") for m in got]
        assert stream_ids == sorted(stream_ids) and len(set(stream_ids)) == 99
    await cancel(api, s.eid)
    for call in calls:
        assert await rest(call) == []


async def test_joining_midway_or_resuming_misses_none_duplicates_none(api: Api) -> None:
    s = await suspended(api)
    sent = [await deliver(api, s) for _ in range(50)]
    late = [watch_signals(api, s.eid, s.waitpoint_id), watch_signals(api, s.eid)]

    async def send() -> list[str]:
        return [await deliver(api, s) for _ in range(50)]

    more, *received = await asyncio.gather(send(), *(read(call, 100) for call in late))
    sent += more
    for got in received:
        assert ids(got) == sent
    # resume from a cursor: by stream id on the waitpoint, by accepted_at on the execution
    cursor = received[0][29].signal
    resumed = watch_signals(api, s.eid, s.waitpoint_id, after_stream_id=cursor.stream_id)
    assert ids(await read(resumed, 70)) == sent[30:]
    by_time = watch_signals(api, s.eid, after_accepted_at=cursor.accepted_at)
    got = await read(by_time, 1)
    assert got[0].signal.accepted_at > cursor.accepted_at
    assert got[0].signal.signal_id in sent[30:]
    done = await deliver(api, s, "done")  # satisfies the condition: the execution resumes
    for call in (*late, resumed):
        assert ids(await read(call, 1)) == [done]
    await cancel(api, s.eid)
    for call in (*late, resumed):
        assert await rest(call) == []
    by_time.cancel()


async def test_slow_watcher_resource_exhausted_does_not_stall_others(api: Api) -> None:
    watches = api.server.signal_watches
    assert watches is not None
    limit, watches.queue_limit = watches.queue_limit, 5
    try:
        s = await suspended(api)
        first = await deliver(api, s)
        slow, fast = watch_signals(api, s.eid, s.waitpoint_id), watch_signals(api, s.eid)
        for call in (slow, fast):
            assert ids(await read(call, 1)) == [first]
        # the slow client stops reading; the payloads exceed every transport buffer on the
        # way, so its server-side watcher blocks and its queue overflows
        big = b"x" * 65_536

        async def send() -> list[str]:
            return [await deliver(api, s, payload=big) for _ in range(300)]

        sent, got = await asyncio.gather(send(), read(fast, 300))
        assert ids(got) == sent
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async with asyncio.timeout(WAIT_S):
                while (msg := await slow.read()) is not grpc.aio.EOF:
                    assert msg.signal.signal_id in sent
        assert caught.value.code() == C.RESOURCE_EXHAUSTED
        info = error_info(caught.value)
        assert (info.reason, info.metadata["pool"], info.metadata["max"]) == (
            "concurrency_limit", "watch_queue", "5",
        )  # fmt: skip
        await cancel(api, s.eid)
        assert await rest(fast) == []
    finally:
        watches.queue_limit = limit


async def test_watch_waitpoints_opened_with_token_then_closed(api: Api) -> None:
    await create(api)
    lease = (await claim_one(api)).lease
    eid = lease.execution_id
    call = watch_waitpoints(api, eid)
    created = await api.worker.CreatePendingWaitpoint(
        wpb.CreatePendingWaitpointRequest(lease=lease, expires_in_ms=60_000),
        metadata=api.metadata,
    )
    wp, token = created.created.waitpoint_id, created.created.waitpoint_token
    [opened] = await read(call, 1)
    info = opened.opened.waitpoint
    assert (info.waitpoint_id, info.state, info.waitpoint_token) == (wp, "pending", token)
    assert opened.at > 0
    reply = await suspend(api, lease, waitpoint_id=wp, use_pending_waitpoint=True)
    assert reply.WhichOneof("outcome") == "suspended", reply
    [active] = await read(call, 1)
    info = active.opened.waitpoint
    assert (info.waitpoint_id, info.state, info.waitpoint_token) == (wp, "active", token)
    assert list(info.required_signal_names) == ["done"]
    await deliver(api, Suspended(eid, wp, token), "done")
    [closed] = await read(call, 1)
    assert closed.WhichOneof("event") == "closed"
    assert (closed.closed.waitpoint_id, closed.closed.close_reason) == (wp, "resumed")
    # a watcher joining now sees nothing open; both end when the execution is terminal
    late = watch_waitpoints(api, eid)
    await cancel(api, eid)
    assert await rest(call) == []
    assert await rest(late) == []


async def test_watch_waitpoints_replays_open_and_shows_cancel_closure(api: Api) -> None:
    s = await suspended(api)
    call = watch_waitpoints(api, s.eid)
    [opened] = await read(call, 1)
    assert (opened.opened.waitpoint.waitpoint_id, opened.opened.waitpoint.waitpoint_token) == (
        s.waitpoint_id, s.token,
    )  # fmt: skip
    await cancel(api, s.eid)
    [closed] = await rest(call)
    assert closed.closed.waitpoint_id == s.waitpoint_id
    assert closed.closed.close_reason


async def test_watches_errors(api: Api) -> None:
    missing = f"{{fp:0}}:{uuid.uuid4()}"
    await expect_error(rest(watch_signals(api, missing)), C.NOT_FOUND, "execution_not_found")
    await expect_error(rest(watch_waitpoints(api, missing)), C.NOT_FOUND, "execution_not_found")
    s = await suspended(api)
    for kw in ({"after_stream_id": "+"}, {"after_stream_id": "1-"}, {"waitpoint_id": "x"}):
        await expect_error(rest(watch_signals(api, s.eid, **kw)), C.INVALID_ARGUMENT,
                           "invalid_input")  # fmt: skip


async def test_shutdown_ends_watches_unavailable(small_api: Api) -> None:
    api = small_api
    s = await suspended(api)
    first = await deliver(api, s)
    sig, wps = watch_signals(api, s.eid), watch_waitpoints(api, s.eid)
    assert ids(await read(sig, 1)) == [first]
    assert len(await read(wps, 1)) == 1
    stop = asyncio.create_task(api.server.stop())
    for call in (sig, wps):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await rest(call)
        assert caught.value.code() == C.UNAVAILABLE
        assert error_info(caught.value).reason == "shutting_down"
    await stop


@pytest.fixture
async def small_api(valkey_url: str, store: Store) -> AsyncIterator[Api]:
    """A server of its own (it is stopped by the test)."""
    config = Config(
        valkey_url=valkey_url, listen_addr="127.0.0.1:0", api_token=API_TOKEN,
        waitpoint_hmac_secret=HMAC_SECRET, shutdown_grace_s=1.0, boot_retry_s=5.0,
    )  # fmt: skip
    server = FlowFabricServer(config, run_scanners=False)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    yield Api(channel, store, server)
    await channel.close()
    await server.stop()
