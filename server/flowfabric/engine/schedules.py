"""Schedules: the spec, and the scanner that fires due slots (docs/schedules.md).

`ScheduleEngine.tick(now_ms)` is one scanner cycle with an explicit clock, so tests drive time.
Every slot is claimed through `ff_claim_schedule_slot` (exactly once across replicas), its
execution created through `ff_create_execution` with the slot's idempotency key, then
acknowledged (docs/schedules.md#exactly-once).
"""

from __future__ import annotations

import base64
import json
import logging
import uuid
from dataclasses import asdict, dataclass, field

import grpc

from flowfabric.server.engine.cron import Cron, Interval, InvalidTimeZone, Timetable, upcoming
from flowfabric.server.valkey.codec import text
from flowfabric.server.valkey.errors import FlowFabricError
from flowfabric.server.valkey.functions import Fence, Functions
from flowfabric.server.valkey.functions.execution import Duplicate, NewExecution
from flowfabric.server.valkey.ids import (
    SCHEDULE_PARTITIONS,
    ExecutionId,
    mint_execution_id,
    parse_execution_id,
    schedule_partition,
    solo_partition,
    validate_lane,
)
from flowfabric.server.valkey.keys import ExecKeys, ScheduleKeys
from flowfabric.server.valkey.store import Store, server_time_ms

log = logging.getLogger("flowfabric.schedules")

OVERLAP = ("skip", "allow", "cancel_previous")
CATCH_UP = ("none", "last", "all")
MIN_INTERVAL_MS = 1_000
MAX_INTERVAL_MS = 366 * 24 * 3600_000
# catch-up `all` fires at most this many missed slots per schedule per downtime
MAX_CATCH_UP = 100
# a slot fired within this long of its time is on time, not a missed one (catch-up `none`)
ON_TIME_MS = 60_000
DUE_BATCH = 50
SCAN_INTERVAL_MS = 1_000
TERMINAL = frozenset({"completed", "failed", "cancelled", "expired", "skipped"})


@dataclass(frozen=True)
class Template:
    """The execution each slot submits."""

    execution_kind: str
    lane_id: str = "default"
    namespace: str = "default"
    input_payload: bytes = b""
    priority: int = 0
    policy_json: str = ""
    payload_encoding: str = ""


@dataclass(frozen=True)
class ScheduleSpec:
    """Exactly one of `cron` / `interval_ms`. `catch_up_window_ms` bounds catch-up `all`."""

    template: Template
    cron: str = ""
    time_zone: str = ""
    interval_ms: int = 0
    anchor_ms: int = 0
    overlap: str = "skip"
    catch_up: str = "none"
    catch_up_window_ms: int = 24 * 3600_000
    extra: dict[str, str] = field(default_factory=dict)

    def timetable(self) -> Timetable:
        if self.cron:
            return Cron.parse(self.cron, self.time_zone)
        return Interval(self.interval_ms, self.anchor_ms)

    def to_json(self) -> str:
        d = asdict(self)
        d["template"]["input_payload"] = base64.b64encode(self.template.input_payload).decode()
        return json.dumps(d, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str) -> ScheduleSpec:
        d = json.loads(raw)
        t = d.pop("template")
        t["input_payload"] = base64.b64decode(t["input_payload"])
        return cls(template=Template(**t), **d)


def _bad(code: str, fld: str, detail: str) -> FlowFabricError:
    return FlowFabricError(code, [detail], message=detail, metadata={"field": fld})


def validate_template(t: Template) -> None:
    if not t.execution_kind:
        raise _bad("invalid_schedule", "template.execution_kind", "execution_kind is required")
    try:
        validate_lane(t.lane_id, "template.lane_id")
    except FlowFabricError as exc:
        raise _bad("invalid_schedule", "template.lane_id", str(exc)) from exc
    if t.policy_json:
        try:
            ok = isinstance(json.loads(t.policy_json), dict)
        except ValueError:
            ok = False
        if not ok:
            raise _bad("invalid_policy_json", "template.policy_json", "not a JSON object")


def validate(spec: ScheduleSpec) -> Timetable:
    """The spec's timetable; FlowFabricError (INVALID_ARGUMENT) naming the field otherwise."""
    if bool(spec.cron) == bool(spec.interval_ms):
        raise _bad("invalid_schedule", "cron", "set exactly one of cron and interval")
    if spec.interval_ms and not MIN_INTERVAL_MS <= spec.interval_ms <= MAX_INTERVAL_MS:
        raise _bad("invalid_schedule", "interval", "interval must be 1 s .. 366 days")
    if spec.interval_ms and spec.time_zone:
        raise _bad("invalid_schedule", "time_zone", "time_zone applies to cron only")
    if spec.overlap not in OVERLAP:
        raise _bad("invalid_schedule", "overlap", f"overlap must be one of {', '.join(OVERLAP)}")
    if spec.catch_up not in CATCH_UP:
        raise _bad("invalid_schedule", "catch_up", f"catch_up must be one of {', '.join(CATCH_UP)}")
    if spec.catch_up_window_ms < 0:
        raise _bad("invalid_schedule", "catch_up_window", "catch_up_window must be >= 0")
    validate_template(spec.template)
    try:
        return spec.timetable()
    except InvalidTimeZone as exc:
        raise _bad("invalid_time_zone", "time_zone", str(exc)) from exc
    except ValueError as exc:
        where = str(exc).split(":", 1)[0]
        raise _bad("invalid_cron", f"cron.{where}", str(exc)) from exc


def keys_of(schedule_id: str) -> ScheduleKeys:
    return ScheduleKeys.of(schedule_partition(schedule_id), schedule_id)


@dataclass(frozen=True)
class Fired:
    """What one tick did for one schedule."""

    schedule_id: str
    slot_ms: int
    outcome: str  # created | duplicate | skipped | rejected
    execution_id: str = ""


class ScheduleEngine:
    """Also a whole-pass scanner job (`ScannerSet.cycles`): `run_cycle` ticks at Valkey's time."""

    name = "schedules"

    def __init__(
        self, store: Store, fn: Functions, partitions: int, interval_ms: int = SCAN_INTERVAL_MS
    ) -> None:
        self.store, self.fn, self.partitions = store, fn, partitions
        self.interval_ms = interval_ms

    async def run_cycle(self) -> int:
        return len(await self.tick(await server_time_ms(self.store)))

    # -- definition --------------------------------------------------------------------------

    async def create(self, spec: ScheduleSpec, now_ms: int, schedule_id: str = "") -> str:
        """The schedule id; `schedule_exists` when that id holds another spec."""
        tt = validate(spec)
        sid = schedule_id or str(uuid.uuid4())
        first = tt.next_after(now_ms - 1)
        await self.fn.schedule.create(keys_of(sid), spec.to_json(), first, now=now_ms)
        return sid

    async def read(self, schedule_id: str) -> dict[str, str] | None:
        row = await self.store.call("HGETALL", keys_of(schedule_id).definition)
        if not row:
            return None
        return {text(k): text(v) for k, v in row.items()}

    async def upcoming(self, schedule_id: str, n: int) -> list[int]:
        row = await self.read(schedule_id)
        if row is None:
            raise FlowFabricError("schedule_not_found", message=f"no schedule {schedule_id}")
        tt = ScheduleSpec.from_json(row["spec"]).timetable()
        return upcoming(tt, int(row["cursor"]) - 1, n)

    async def pause(self, schedule_id: str) -> str:
        return (await self.fn.schedule.set_state(keys_of(schedule_id), "pause")).outcome

    async def resume(self, schedule_id: str, now_ms: int) -> str:
        """Slots missed while paused never fire: the cursor moves to the first slot from now."""
        row = await self.read(schedule_id)
        if row is None:
            raise FlowFabricError("schedule_not_found", message=f"no schedule {schedule_id}")
        tt = ScheduleSpec.from_json(row["spec"]).timetable()
        nxt = tt.next_after(now_ms - 1)
        k = keys_of(schedule_id)
        return (await self.fn.schedule.set_state(k, "resume", next_fire_at=nxt)).outcome

    async def delete(self, schedule_id: str) -> str:
        return (await self.fn.schedule.set_state(keys_of(schedule_id), "delete")).outcome

    async def trigger(self, schedule_id: str, request_id: str) -> Fired:
        """Fire now, outside the timetable; the same request_id again is a duplicate."""
        row = await self.read(schedule_id)
        if row is None:
            raise FlowFabricError("schedule_not_found", message=f"no schedule {schedule_id}")
        spec = ScheduleSpec.from_json(row["spec"])
        eid, created = await self._create(
            spec.template, f"sched:{schedule_id}:trigger:{request_id}"
        )
        return Fired(schedule_id, 0, "created" if created else "duplicate", eid)

    # -- the scanner -------------------------------------------------------------------------

    async def tick(self, now_ms: int) -> list[Fired]:
        """One cycle: every schedule whose cursor is at or before now_ms."""
        out: list[Fired] = []
        # every partition's due index in one pipeline: an idle tick is one round trip
        # (docs/architecture.md#scanners)
        pipe = self.store.pipeline()
        for part in range(SCHEDULE_PARTITIONS):
            pipe.zrangebyscore(ScheduleKeys.of(part).due, "-inf", now_ms, start=0, num=DUE_BATCH)
        for due in await self.store.run_pipeline(pipe):
            for raw in due:
                try:
                    out += await self._run(text(raw), now_ms)
                except FlowFabricError as exc:
                    log.debug("schedule %s: %s", text(raw), exc.code)
        return out

    async def _create(self, t: Template, idem: str) -> tuple[str, bool]:
        # the same partition every time, so the idempotency key dedups a retried create
        eid = mint_execution_id(solo_partition(t.lane_id, self.partitions))
        reply = await self.fn.execution.create_execution(
            NewExecution(
                execution_id=eid, namespace=t.namespace, lane_id=t.lane_id,
                execution_kind=t.execution_kind, input_payload=t.input_payload,
                priority=t.priority, creator_identity="schedule", policy_json=t.policy_json,
                payload_encoding=t.payload_encoding, idempotency_key=idem,
            )
        )  # fmt: skip
        if isinstance(reply, Duplicate):
            return reply.existing_id, False
        return reply.execution_id, True

    async def _settle(self, sid: str, spec: ScheduleSpec, slot: int) -> Fired:
        """Create (or find) the execution of a claimed slot and acknowledge it. A create the
        engine refuses for its input (a template the schedule's validation let through, e.g.
        an unknown policy field) settles the slot as `rejected:<code>` instead of retrying it
        forever (docs/schedules.md#exactly-once)."""
        try:
            eid, created = await self._create(spec.template, f"sched:{sid}:{slot}")
        except FlowFabricError as exc:
            if exc.spec.klass != "terminal" or exc.spec.status != grpc.StatusCode.INVALID_ARGUMENT:
                raise
            await self.fn.schedule.ack(keys_of(sid), slot, f"rejected:{exc.code}")
            return Fired(sid, slot, "rejected")
        await self.fn.schedule.ack(keys_of(sid), slot, eid)
        return Fired(sid, slot, "created" if created else "duplicate", eid)

    async def _previous_running(self, row: dict[str, str]) -> ExecutionId | None:
        last = row.get("last_execution_id", "")
        if not last.startswith("{"):  # none yet, or a rejected create
            return None
        eid = parse_execution_id(last, self.partitions, "last_execution_id")
        state = await self.store.call("HGET", ExecKeys(eid).core, "public_state")
        return None if state is None or text(state) in TERMINAL else eid

    async def _run(self, sid: str, now: int) -> list[Fired]:
        k = keys_of(sid)
        out: list[Fired] = []
        for _ in range(MAX_CATCH_UP + 2):
            row = await self.read(sid)
            if row is None or row.get("state") != "active":
                return out
            spec = ScheduleSpec.from_json(row["spec"])
            if row.get("pending_slot"):  # a claim whose create or ack was lost
                out.append(await self._settle(sid, spec, int(row["pending_slot"])))
                continue
            cursor = int(row["cursor"])
            if cursor > now:
                return out
            tt = spec.timetable()
            latest = tt.last_at_or_before(now)
            assert latest is not None and latest >= cursor
            slot = cursor
            if spec.catch_up in ("none", "last") and latest > cursor:
                await self.fn.schedule.claim(k, cursor, latest, skip=True, now=now)
                out.append(Fired(sid, cursor, "skipped"))
                slot = latest
            elif spec.catch_up == "all" and now - cursor > spec.catch_up_window_ms:
                first = tt.next_after(now - spec.catch_up_window_ms - 1)
                await self.fn.schedule.claim(k, cursor, first, skip=True, now=now)
                out.append(Fired(sid, cursor, "skipped"))
                continue
            nxt = tt.next_after(slot)
            late = spec.catch_up == "none" and now - slot > ON_TIME_MS
            running = None if spec.overlap == "allow" else await self._previous_running(row)
            if late or (running is not None and spec.overlap == "skip"):
                r = await self.fn.schedule.claim(k, slot, nxt, skip=True, now=now)
                if r.outcome == "skipped":
                    out.append(Fired(sid, slot, "skipped"))
                continue
            if running is not None:  # cancel_previous
                await self._cancel(running)
            r = await self.fn.schedule.claim(k, slot, nxt, now=now)
            if r.outcome == "fire":
                out.append(await self._settle(sid, spec, slot))
            elif r.outcome != "pending":
                return out
        return out

    async def _cancel(self, eid: ExecutionId) -> None:
        try:
            await self.fn.execution.cancel_execution(
                eid, "superseded by the next schedule slot", "operator_override", Fence()
            )
        except FlowFabricError as exc:  # it ended meanwhile
            log.debug("cancel previous %s: %s", eid, exc.code)
