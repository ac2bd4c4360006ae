"""`lua/suspension.lua`: pending waitpoints, suspend, resume, close, expire, and the read-only
reads of resume signals and waitpoints."""

from __future__ import annotations

import json
from dataclasses import dataclass

from flowfabric.server.valkey.codec import Reply, hash_to_dict, text
from flowfabric.server.valkey.errors import FlowFabricError
from flowfabric.server.valkey.functions.core import (
    Decl,
    Fence,
    Outcome,
    arg,
    call,
    ek,
    exec_ctx,
    key,
    ok,
    opt,
    pk,
    record,
)
from flowfabric.server.valkey.functions.signal import Keystore
from flowfabric.server.valkey.ids import ExecutionId
from flowfabric.server.valkey.store import Store


@dataclass(frozen=True)
class Suspension:
    """What `ff_suspend_execution` needs besides the fence."""

    suspension_id: str
    waitpoint_id: str
    waitpoint_key: str
    reason_code: str
    requested_by: str
    resume_condition_json: str
    resume_policy_json: str
    continuation_metadata_pointer: str = ""
    timeout_at: int | None = None
    use_pending_waitpoint: bool = False
    timeout_behavior: str = ""
    timeout_in_ms: int | None = None  # composed with TIME inside the function; not with timeout_at


@dataclass(frozen=True)
class PendingWaitpoint:
    waitpoint_id: str
    waitpoint_key: str
    waitpoint_token: str
    expires_at: int


@dataclass(frozen=True)
class Suspended:
    """OK: suspended. ALREADY_SATISFIED (`already_satisfied`): the pending waitpoint's buffered
    signals satisfied the condition, `matched_signal_ids` in matcher order; the lease is kept."""

    suspension_id: str
    waitpoint_id: str
    waitpoint_key: str
    waitpoint_token: str
    matched_signal_ids: tuple[str, ...] = ()
    already_satisfied: bool = False


@dataclass(frozen=True)
class PublicState:
    public_state: str


@dataclass(frozen=True)
class SuspensionExpired:
    """OK `behavior public_state` (ALREADY_SATISFIED `reason` decodes as `Outcome`)."""

    behavior: str
    public_state: str


@dataclass(frozen=True)
class ResumeSignal:
    fields: dict[str, str]
    payload: bytes


@dataclass(frozen=True)
class WaitpointRow:
    """One row of `ff_list_waitpoints` (carries the token: never log it)."""

    waitpoint_id: str
    waitpoint_key: str
    state: str
    waitpoint_token: str
    created_at: str
    activated_at: str
    expires_at: str
    required_signal_names: list[str]

    def as_fields(self) -> dict[str, str]:
        return {
            "waitpoint_id": self.waitpoint_id, "waitpoint_key": self.waitpoint_key,
            "state": self.state, "waitpoint_token": self.waitpoint_token,
            "created_at": self.created_at, "activated_at": self.activated_at,
            "expires_at": self.expires_at,
        }  # fmt: skip

    def __repr__(self) -> str:
        return f"WaitpointRow({self.waitpoint_id}, {self.state}, token=<REDACTED>)"


def _bytes(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    return text(value).encode() if value else b""


def _resume_signals(reply: Reply) -> tuple[ResumeSignal, ...]:
    n = reply.int(0)
    rest = list(reply.values[1:])
    if len(rest) == n and all(isinstance(r, list) and len(r) == 2 for r in rest):
        pairs = [(r[0], r[1]) for r in rest]  # nested {fields, payload}
    elif len(rest) == 2 * n:
        pairs = [(rest[2 * i], rest[2 * i + 1]) for i in range(n)]
    else:
        raise FlowFabricError(
            "protocol_error", message=f"ff_read_resume_signals: {n} signals, {len(rest)} values"
        )
    return tuple(ResumeSignal(hash_to_dict(f), _bytes(p)) for f, p in pairs)


def _waitpoints(reply: Reply) -> tuple[WaitpointRow, ...]:
    rows = []
    for item in reply.values[1 : 1 + reply.int(0)]:
        v = [text(x) for x in item]
        if len(v) < 8:
            raise FlowFabricError(
                "protocol_error", message=f"ff_list_waitpoints: short row of {len(v)}"
            )
        try:
            names = [str(n) for n in json.loads(v[7] or "[]") if n]
        except (ValueError, TypeError):
            names = []
        rows.append(WaitpointRow(v[0], v[1], v[2], v[3], v[4], v[5], v[6], names))
    return tuple(rows)


def _satisfied(reply: Reply) -> Suspended:
    s = record(Suspended)(reply)
    return Suspended(s.suspension_id, s.waitpoint_id, s.waitpoint_key, s.waitpoint_token,
                     s.matched_signal_ids, already_satisfied=True)  # fmt: skip


WAITPOINT = key("wp.waitpoint", lambda c: c.wp.waitpoint)
FENCE = (arg("lease_id"), opt("lease_epoch"), arg("attempt_id"))

CREATE_PENDING: Decl[PendingWaitpoint] = Decl(
    "ff_create_pending_waitpoint",
    (ek("core"), WAITPOINT, pk("pending_waitpoint_expiry"), pk("hmac_keystore"),
     ek("waitpoints")),
    (arg("execution_id"), *FENCE, arg("attempt_index", "int"), arg("waitpoint_id"),
     arg("waitpoint_key"), arg("expires_in_ms", "int")),
    ok(record(PendingWaitpoint)),
)  # fmt: skip
SUSPEND: Decl[Suspended] = Decl(
    "ff_suspend_execution",
    (ek("core"), ek("suspension_current"), WAITPOINT, pk("hmac_keystore"), ek("lease_current"),
     ek("lease_history"), pk("lease_expiry"), pk("attempt_timeout"), pk("suspension_timeout"),
     pk("pending_waitpoint_expiry"), ek("waitpoints"), ek("signals")),
    (arg("execution_id"), *FENCE, arg("attempt_index", "int"), arg("suspension_id"),
     arg("waitpoint_id"), arg("waitpoint_key"), arg("reason_code"), arg("requested_by"),
     arg("resume_condition_json"), arg("resume_policy_json"),
     arg("continuation_metadata_pointer"), opt("timeout_at"),
     arg("use_pending_waitpoint", "bool"), arg("timeout_behavior"), opt("timeout_in_ms")),
    {"OK": record(Suspended), "ALREADY_SATISFIED": _satisfied},
)  # fmt: skip
RESUME: Decl[PublicState] = Decl(
    "ff_resume_execution",
    (ek("core"), ek("suspension_current"), pk("suspension_timeout")),
    (arg("execution_id"), arg("trigger_type"), opt("resume_delay_ms")),
    ok(record(PublicState)),
)
CLOSE_WAITPOINT: Decl[Outcome] = Decl(
    "ff_close_waitpoint",
    (ek("core"), WAITPOINT, pk("pending_waitpoint_expiry")),
    (arg("execution_id"), arg("waitpoint_id"), arg("reason")),
    ok(record(Outcome)),
)
EXPIRE_SUSPENSION: Decl[SuspensionExpired | Outcome] = Decl(
    "ff_expire_suspension",
    (ek("core"), ek("suspension_current"), pk("suspension_timeout"), pk("attempt_timeout"),
     pk("execution_deadline")),
    (arg("execution_id"),),
    {"OK": record(SuspensionExpired), "ALREADY_SATISFIED": record(Outcome)},
)  # fmt: skip
READ_RESUME_SIGNALS: Decl[tuple[ResumeSignal, ...]] = Decl(
    "ff_read_resume_signals",
    (ek("core"), ek("suspension_current")),
    (arg("execution_id"), arg("attempt_index", "int")),
    ok(_resume_signals),
    read_only=True,
)
LIST_WAITPOINTS: Decl[tuple[WaitpointRow, ...]] = Decl(
    "ff_list_waitpoints",
    (ek("core"), ek("waitpoints")),
    (arg("execution_id"),),
    ok(_waitpoints),
    read_only=True,
)

DECLS = (
    CREATE_PENDING, SUSPEND, RESUME, CLOSE_WAITPOINT, EXPIRE_SUSPENSION, READ_RESUME_SIGNALS,
    LIST_WAITPOINTS,
)  # fmt: skip


class SuspensionFunctions:
    def __init__(self, store: Store, keystore: Keystore) -> None:
        self.store = store
        self.keystore = keystore

    async def create_pending_waitpoint(
        self, eid: ExecutionId, fence: Fence, attempt_index: int, waitpoint_id: str,
        waitpoint_key: str, expires_in_ms: int,
    ) -> PendingWaitpoint:  # fmt: skip
        return await self.keystore.call(CREATE_PENDING, exec_ctx(eid, waitpoint_id=waitpoint_id), {
            "execution_id": str(eid), **fence.values(), "attempt_index": attempt_index,
            "waitpoint_id": waitpoint_id, "waitpoint_key": waitpoint_key,
            "expires_in_ms": expires_in_ms,
        })  # fmt: skip

    async def suspend_execution(
        self, eid: ExecutionId, fence: Fence, attempt_index: int, s: Suspension
    ) -> Suspended:
        return await self.keystore.call(SUSPEND, exec_ctx(eid, waitpoint_id=s.waitpoint_id), {
            "execution_id": str(eid), **fence.values(), "attempt_index": attempt_index,
            "suspension_id": s.suspension_id, "waitpoint_id": s.waitpoint_id,
            "waitpoint_key": s.waitpoint_key, "reason_code": s.reason_code,
            "requested_by": s.requested_by, "resume_condition_json": s.resume_condition_json,
            "resume_policy_json": s.resume_policy_json,
            "continuation_metadata_pointer": s.continuation_metadata_pointer,
            "timeout_at": s.timeout_at, "use_pending_waitpoint": s.use_pending_waitpoint,
            "timeout_behavior": s.timeout_behavior, "timeout_in_ms": s.timeout_in_ms,
        })  # fmt: skip

    async def resume_execution(
        self, eid: ExecutionId, trigger_type: str, resume_delay_ms: int = 0
    ) -> PublicState:
        """`waiting` | `delayed`."""
        return await call(self.store, RESUME, exec_ctx(eid), {
            "execution_id": str(eid), "trigger_type": trigger_type,
            "resume_delay_ms": resume_delay_ms or None,
        })  # fmt: skip

    async def close_waitpoint(self, eid: ExecutionId, waitpoint_id: str, reason: str) -> Outcome:
        """`closed` or `already_closed`."""
        values = {"execution_id": str(eid), "waitpoint_id": waitpoint_id, "reason": reason}
        return await call(self.store, CLOSE_WAITPOINT, exec_ctx(eid, waitpoint_id=waitpoint_id),
                          values)  # fmt: skip

    async def expire_suspension(self, eid: ExecutionId) -> SuspensionExpired | Outcome:
        return await call(self.store, EXPIRE_SUSPENSION, exec_ctx(eid), {"execution_id": str(eid)})

    async def read_resume_signals(
        self, eid: ExecutionId, attempt_index: int
    ) -> tuple[ResumeSignal, ...]:
        """The signals that satisfied the suspension `attempt_index` resumed from, in matcher
        order."""
        values = {"execution_id": str(eid), "attempt_index": attempt_index}
        return await call(self.store, READ_RESUME_SIGNALS, exec_ctx(eid), values)

    async def list_waitpoints(self, eid: ExecutionId) -> tuple[WaitpointRow, ...]:
        """The execution's `pending`/`active` waitpoints with tokens, ordered by id."""
        return await call(self.store, LIST_WAITPOINTS, exec_ctx(eid), {"execution_id": str(eid)})
