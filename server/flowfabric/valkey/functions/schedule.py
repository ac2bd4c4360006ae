"""`lua/schedule.lua`: create schedules, claim their slots exactly once, acknowledge the
execution of a claimed slot, pause, resume and delete (docs/schedules.md)."""

from __future__ import annotations

from dataclasses import dataclass

from flowfabric.server.valkey.functions.core import (
    Decl,
    Key,
    KeyCtx,
    arg,
    call,
    key,
    opt,
    record,
)
from flowfabric.server.valkey.keys import ScheduleKeys
from flowfabric.server.valkey.store import Store


@dataclass(frozen=True)
class ScheduleOutcome:
    """`outcome` and its detail. Create: `created` / `exists`. Claim: `fire` (detail = the
    idempotency key), `skipped`, `paused`, `pending` (detail = the pending slot), `already`,
    `not_due` (detail = the cursor). Ack: `acked` / `not_pending`. State: the op, or the state it
    already had."""

    outcome: str
    detail: str = ""


def _s(attr: str) -> Key:
    return key(f"schedule.{attr}", lambda c: str(getattr(c.schedule, attr)))


_BOTH = {"OK": record(ScheduleOutcome), "ALREADY_SATISFIED": record(ScheduleOutcome)}

CREATE: Decl[ScheduleOutcome] = Decl(
    "ff_create_schedule",
    (_s("definition"), _s("due"), _s("all")),
    (arg("schedule_id"), arg("spec"), arg("first_fire_at", "int"), opt("now")),
    _BOTH,
)
CLAIM: Decl[ScheduleOutcome] = Decl(
    "ff_claim_schedule_slot",
    (_s("definition"), _s("due")),
    (arg("schedule_id"), arg("slot_ms", "int"), arg("next_slot_ms", "int"), arg("action"),
     opt("now")),
    _BOTH,
)  # fmt: skip
ACK: Decl[ScheduleOutcome] = Decl(
    "ff_ack_schedule_fire",
    (_s("definition"), _s("due")),
    (arg("schedule_id"), arg("slot_ms", "int"), arg("execution_id")),
    _BOTH,
)
SET_STATE: Decl[ScheduleOutcome] = Decl(
    "ff_set_schedule_state",
    (_s("definition"), _s("due"), _s("all")),
    (arg("schedule_id"), arg("op"), opt("next_fire_at"), opt("now")),
    _BOTH,
)

DECLS = (CREATE, CLAIM, ACK, SET_STATE)


def _ctx(keys: ScheduleKeys) -> KeyCtx:
    return KeyCtx(tag=keys.tag, schedule_id=keys.schedule_id)


class ScheduleFunctions:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def create(
        self, keys: ScheduleKeys, spec: str, first_fire_at: int, now: int | None = None
    ) -> ScheduleOutcome:
        values = {"schedule_id": keys.schedule_id, "spec": spec, "first_fire_at": first_fire_at,
                  "now": now}  # fmt: skip
        return await call(self.store, CREATE, _ctx(keys), values)

    async def claim(
        self, keys: ScheduleKeys, slot_ms: int, next_slot_ms: int, *, skip: bool = False,
        now: int | None = None,
    ) -> ScheduleOutcome:  # fmt: skip
        values = {"schedule_id": keys.schedule_id, "slot_ms": slot_ms,
                  "next_slot_ms": next_slot_ms, "action": "skip" if skip else "fire",
                  "now": now}  # fmt: skip
        return await call(self.store, CLAIM, _ctx(keys), values)

    async def ack(self, keys: ScheduleKeys, slot_ms: int, execution_id: str) -> ScheduleOutcome:
        values = {"schedule_id": keys.schedule_id, "slot_ms": slot_ms,
                  "execution_id": execution_id}  # fmt: skip
        return await call(self.store, ACK, _ctx(keys), values)

    async def set_state(
        self, keys: ScheduleKeys, op: str, next_fire_at: int | None = None,
        now: int | None = None,
    ) -> ScheduleOutcome:  # fmt: skip
        values = {"schedule_id": keys.schedule_id, "op": op, "next_fire_at": next_fire_at,
                  "now": now}  # fmt: skip
        return await call(self.store, SET_STATE, _ctx(keys), values)
