"""Lane control (docs/lanes.md#lane-control): pause, resume and drain a lane.

A lane's control state lives in one global hash (`ff:config:lane_control`, lane -> JSON
`{"state", "reason", "at"}`); a lane missing from it is active. The claim Functions touch the
keys of one hash tag only, and a lane's work spans many partitions, so the state is not
checked inside them: the scheduler asks `LaneControls.claimable` before every claim pass
(ClaimNext, StreamWork, the claims riding on completions) and before a grant
(ClaimForWorker), and CreateExecution(s) ask `check_intake`. The answers come from a
per-process copy of the hash, re-read when older than `CACHE_TTL_S` and at once after a change
through this process. So a change made through another server is honoured by this one within
`CACHE_TTL_S` (plus a call already in flight): that is the staleness bound.

Paused: no claim hands out the lane's work; eligible, delayed and running work stays where it
is (running work finishes, releases and retries land back in the lane and wait), and creates
are accepted. Draining (a queue's drain: let it empty): creates into the lane are refused
(`lane_draining`), claims keep handing out what is there, and the lane reports `drained` once
all of it is terminal. Resume returns to active and wakes local waiters.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from flowfabric.server.valkey.codec import text
from flowfabric.server.valkey.errors import FlowFabricError
from flowfabric.server.valkey.keys import LANE_CONTROL
from flowfabric.server.valkey.store import Store, server_time_ms

__all__ = ["CACHE_TTL_S", "CONTROL_STATES", "LaneControls", "LaneState"]

CACHE_TTL_S = 1.0
CONTROL_STATES = ("active", "paused", "draining")
REASON_MAX = 256


@dataclass(frozen=True)
class LaneState:
    state: str = "active"
    reason: str = ""
    at: int = 0  # when it last changed (Valkey ms); 0 = never


_ACTIVE = LaneState()


def _decode(raw: object) -> LaneState:
    try:
        row = json.loads(text(raw))
        state = str(row.get("state", "active"))
        return LaneState(
            state if state in CONTROL_STATES else "active",
            str(row.get("reason", "")),
            int(row.get("at", 0)),
        )
    except (ValueError, TypeError, AttributeError):
        return LaneState()


class LaneControls:
    """The lane control states, with the per-process copy the claim paths read."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._states: dict[str, LaneState] = {}
        self._read_at = float("-inf")
        self._refresh: asyncio.Task[None] | None = None
        self._on_resume: list[Callable[[str], None]] = []

    def on_resume(self, callback: Callable[[str], None]) -> None:
        """Call `callback(lane)` after this process resumes a lane (wakes waiting claims)."""
        self._on_resume.append(callback)

    async def all(self) -> dict[str, LaneState]:
        """Every lane with a stored control state (read now, not from the copy)."""
        rows = await self.store.call("HGETALL", LANE_CONTROL)
        states = {text(k): _decode(v) for k, v in (rows or {}).items()}
        self._states, self._read_at = states, time.monotonic()
        return states

    async def get(self, lane: str) -> LaneState:
        raw = await self.store.call("HGET", LANE_CONTROL, lane)
        return _decode(raw) if raw else LaneState()

    async def set(self, lane: str, state: str, reason: str = "") -> LaneState:
        """Store `state` for `lane` (idempotent; "active" removes the entry)."""
        assert state in CONTROL_STATES
        if state == "active":
            await self.store.call("HDEL", LANE_CONTROL, lane)
            out = LaneState()
        else:
            current = await self.get(lane)
            if current.state == state and current.reason == reason:
                return current
            now = await server_time_ms(self.store)
            out = LaneState(state, reason, now)
            value = json.dumps({"state": state, "reason": reason, "at": now})
            await self.store.call("HSET", LANE_CONTROL, lane, value)
        self._read_at = float("-inf")  # this process sees its own change at once
        if state == "active":
            for callback in self._on_resume:
                callback(lane)
        return out

    async def claimable(self, lanes: Sequence[str]) -> list[str]:
        """The lanes of `lanes` whose work may be handed out now, in order (docs/lanes.md)."""
        if time.monotonic() - self._read_at > CACHE_TTL_S:
            await self._reread()
        if not self._states:
            return list(lanes)
        return [lane for lane in lanes if self._states.get(lane, _ACTIVE).state != "paused"]

    async def check_intake(self, lane: str) -> None:
        """FAILED_PRECONDITION `lane_draining` when `lane` refuses new creates."""
        if time.monotonic() - self._read_at > CACHE_TTL_S:
            await self._reread()
        if self._states.get(lane, _ACTIVE).state == "draining":
            raise FlowFabricError(
                "lane_draining", message=f"lane {lane} is draining: it takes no new work",
                metadata={"lane_id": lane},
            )  # fmt: skip

    async def _reread(self) -> None:
        """One read for every claim pass that finds the copy stale (single-flight)."""
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.ensure_future(self._read())
        await asyncio.shield(self._refresh)

    async def _read(self) -> None:
        await self.all()
