"""The client's LaneService part: lane control and bulk actions (docs/lanes.md).

`bulk_cancel` / `bulk_replay` mint the request id before the first attempt, so a retry after
UNAVAILABLE answers the job the first attempt started instead of starting a second one.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass, field

from flowfabric._transport import Connected, pages
from flowfabric.v1 import lane_pb2, types_pb2

_CONTROL = {1: "active", 2: "paused", 3: "draining"}
_JOB_STATE = {1: "running", 2: "completed", 3: "cancelled"}
_ACTION = {1: "cancel", 2: "replay"}
#: the public state names a bulk filter takes (as `flowfabric list --state` does)
BULK_STATES = (
    "waiting", "delayed", "rate_limited", "waiting_children", "active", "suspended",
    "completed", "failed", "cancelled", "expired", "skipped",
)  # fmt: skip


def _state_enum(name: str) -> int:
    if name not in BULK_STATES:
        raise ValueError(f"unknown state {name!r}; one of {', '.join(BULK_STATES)}")
    return types_pb2.PublicState.Value("PUBLIC_STATE_" + name.upper())


@dataclass(frozen=True)
class Lane:
    """A lane: control state (`active`, `paused`, `draining`) and depth by index set."""

    lane_id: str
    control: str
    reason: str
    control_changed_at: int
    depth: Mapping[str, int]
    head_age_ms: int
    drained: bool

    @classmethod
    def from_proto(cls, m: lane_pb2.Lane) -> Lane:
        return cls(
            lane_id=m.lane_id, control=_CONTROL.get(m.control, "active"), reason=m.reason,
            control_changed_at=m.control_changed_at, depth=dict(m.depth),
            head_age_ms=m.head_age_ms, drained=m.drained,
        )  # fmt: skip


@dataclass(frozen=True)
class BulkAction:
    """A bulk job: `state` is `running`, `completed` or `cancelled`; `total` the matches
    counted at start; `done + skipped + failed` how far it got."""

    bulk_action_id: str
    action: str
    state: str
    total: int
    done: int
    skipped: int
    failed: int
    last_error: str
    reason: str
    created_at: int
    finished_at: int
    filter: Mapping[str, object] = field(default_factory=dict)

    @property
    def processed(self) -> int:
        return self.done + self.skipped + self.failed

    @property
    def finished(self) -> bool:
        return self.state != "running"

    @classmethod
    def from_proto(cls, m: lane_pb2.BulkAction) -> BulkAction:
        f = m.filter
        flt: dict[str, object] = {
            "lane": f.lane_id, "kind": f.execution_kind, "tags": dict(f.tags),
            "older_than_ms": f.older_than_ms,
            "states": [types_pb2.PublicState.Name(s).removeprefix("PUBLIC_STATE_").lower()
                       for s in f.states],
        }  # fmt: skip
        return cls(
            bulk_action_id=m.bulk_action_id, action=_ACTION.get(m.action, ""),
            state=_JOB_STATE.get(m.state, ""), total=m.total, done=m.done, skipped=m.skipped,
            failed=m.failed, last_error=m.last_error, reason=m.reason, created_at=m.created_at,
            finished_at=m.finished_at, filter={k: v for k, v in flt.items() if v},
        )  # fmt: skip


def bulk_filter(
    lane: str = "", states: Sequence[str] = (), kind: str = "",
    tags: Mapping[str, str] | None = None, older_than_ms: int = 0,
) -> lane_pb2.BulkFilter:  # fmt: skip
    return lane_pb2.BulkFilter(
        lane_id=lane, states=[_state_enum(s) for s in states], execution_kind=kind,  # type: ignore[misc]
        tags=dict(tags or {}), older_than_ms=older_than_ms,
    )  # fmt: skip


class LanesMixin(Connected):
    """Lanes and bulk actions (LaneService; operator-only: the admin token when the server
    has one)."""

    async def pause_lane(self, lane: str, *, reason: str = "") -> Lane:
        """Stop handing out the lane's work; everything in it stays (docs/lanes.md)."""
        t = self._transport
        reply = await t.unary(
            t.lanes.PauseLane, lane_pb2.PauseLaneRequest(lane_id=lane, reason=reason)
        )
        return Lane.from_proto(reply.lane)

    async def resume_lane(self, lane: str) -> Lane:
        t = self._transport
        reply = await t.unary(t.lanes.ResumeLane, lane_pb2.ResumeLaneRequest(lane_id=lane))
        return Lane.from_proto(reply.lane)

    async def drain_lane(self, lane: str, *, reason: str = "") -> Lane:
        """Refuse new creates (`lane_draining`) while workers finish what is there;
        `lane(...).drained` once all of it is terminal."""
        t = self._transport
        reply = await t.unary(
            t.lanes.DrainLane, lane_pb2.DrainLaneRequest(lane_id=lane, reason=reason)
        )
        return Lane.from_proto(reply.lane)

    async def lane(self, lane: str) -> Lane:
        t = self._transport
        reply = await t.unary(t.lanes.GetLane, lane_pb2.GetLaneRequest(lane_id=lane))
        return Lane.from_proto(reply.lane)

    async def lanes(self) -> list[Lane]:
        t = self._transport
        reply = await t.unary(t.lanes.ListLanes, lane_pb2.ListLanesRequest())
        return [Lane.from_proto(m) for m in reply.lanes]

    async def _bulk(
        self, action: int, filter: lane_pb2.BulkFilter, dry_run: bool, reason: str
    ) -> BulkAction | int:
        t = self._transport
        request = lane_pb2.StartBulkActionRequest(
            filter=filter, action=action, dry_run=dry_run, reason=reason,  # type: ignore[arg-type]
            request_id="" if dry_run else str(uuid.uuid4()),
        )  # fmt: skip
        reply = await t.unary(t.lanes.StartBulkAction, request)
        return reply.matched if dry_run else BulkAction.from_proto(reply.bulk_action)

    async def bulk_cancel(
        self, *, lane: str = "", states: Sequence[str] = (), kind: str = "",
        tags: Mapping[str, str] | None = None, older_than_ms: int = 0, reason: str = "",
        dry_run: bool = False,
    ) -> BulkAction | int:  # fmt: skip
        """Start a durable bulk cancel of the matching executions (the job), or count them
        (`dry_run`: an int). At least one filter field is required.

        Raises:
            InvalidArgument: an empty filter, a terminal state, a malformed lane or tag.
        """
        flt = bulk_filter(lane, states, kind, tags, older_than_ms)
        return await self._bulk(1, flt, dry_run, reason)

    async def bulk_replay(
        self, *, lane: str = "", states: Sequence[str] = (), kind: str = "",
        tags: Mapping[str, str] | None = None, older_than_ms: int = 0, reason: str = "",
        dry_run: bool = False,
    ) -> BulkAction | int:  # fmt: skip
        """As `bulk_cancel`, replaying terminal executions."""
        flt = bulk_filter(lane, states, kind, tags, older_than_ms)
        return await self._bulk(2, flt, dry_run, reason)

    async def bulk_action(self, bulk_action_id: str) -> BulkAction:
        """Raises NotFound (`bulk_action_not_found`)."""
        t = self._transport
        reply = await t.unary(
            t.lanes.GetBulkAction, lane_pb2.GetBulkActionRequest(bulk_action_id=bulk_action_id)
        )
        return BulkAction.from_proto(reply.bulk_action)

    async def bulk_actions(self, *, page_size: int = 100) -> AsyncGenerator[BulkAction, None]:
        """Every bulk job, newest first."""
        t = self._transport

        async def fetch(token: str) -> lane_pb2.ListBulkActionsResponse:
            request = lane_pb2.ListBulkActionsRequest(page_size=page_size, page_token=token)
            return await t.unary(t.lanes.ListBulkActions, request)

        async for page in pages(fetch):
            for m in page.bulk_actions:
                yield BulkAction.from_proto(m)

    async def cancel_bulk_action(self, bulk_action_id: str) -> BulkAction:
        """Stop a running job after its current page."""
        t = self._transport
        reply = await t.unary(
            t.lanes.CancelBulkAction,
            lane_pb2.CancelBulkActionRequest(bulk_action_id=bulk_action_id),
        )
        return BulkAction.from_proto(reply.bulk_action)
