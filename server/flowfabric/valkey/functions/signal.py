"""`lua/signal.lua`: signal delivery and buffering, and the waitpoint HMAC keystore.

`hmac_secret` (the configured FF_WAITPOINT_HMAC_SECRET) lets the calls that mint or validate
tokens repair a keystore lost with the keyspace: on `hmac_secret_not_initialized` the boot
install is re-run on that partition and the call retried once (`Keystore.call`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

from flowfabric.server.valkey.codec import Reply
from flowfabric.server.valkey.errors import FlowFabricError
from flowfabric.server.valkey.functions.core import (
    Decl,
    KeyCtx,
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
from flowfabric.server.valkey.ids import ExecutionId
from flowfabric.server.valkey.keys import signal_key
from flowfabric.server.valkey.store import Store

log = logging.getLogger("flowfabric.functions")
R = TypeVar("R")
INITIAL_KID = "k1"


@dataclass(frozen=True)
class Signal:
    """One signal for `ff_deliver_signal` / `ff_buffer_signal_for_pending_waitpoint`;
    `None`/"" fields take the function's defaults."""

    waitpoint_id: str
    signal_id: str
    signal_name: str
    waitpoint_token: str
    signal_category: str = ""
    source_type: str = ""
    source_identity: str = ""
    payload: bytes = b""
    payload_encoding: str = ""
    correlation_id: str = ""
    idempotency_key: str = ""
    target_scope: str = ""
    created_at: int | None = None
    dedup_ttl_ms: int | None = None
    resume_delay_ms: int | None = None
    max_signals_per_execution: int | None = None
    signal_maxlen: int | None = None


@dataclass(frozen=True)
class Accepted:
    signal_id: str
    effect: str
    stream_id: str = ""
    accepted_at: int | None = None


@dataclass(frozen=True)
class Duplicate:
    existing_signal_id: str


@dataclass(frozen=True)
class Rotated:
    """`rotated <previous_kid or ""> <new_kid> <gc_count>` or `noop <kid>`."""

    outcome: str
    previous_kid: str = ""
    new_kid: str = ""
    gc_count: int | None = None


@dataclass(frozen=True)
class Kids:
    current_kid: str
    verifying: tuple[tuple[str, int], ...]


def _rotated(reply: Reply) -> Rotated:
    if reply.str(0) == "noop":
        return Rotated("noop", new_kid=reply.str(1))
    return record(Rotated)(reply)


def _kids(reply: Reply) -> Kids:
    n = reply.int(1)
    return Kids(reply.str(0), tuple((reply.str(2 + 2 * i), reply.int(3 + 2 * i)) for i in range(n)))


def _dedup(c: KeyCtx) -> str:
    return c.wp.dedup(c.idempotency_key) if c.idempotency_key else c.part.noop


SIGNAL_KEYS = (
    ek("core"), key("wp.waitpoint", lambda c: c.wp.waitpoint), pk("hmac_keystore"),
    ek("signals"), key("signal hash", lambda c: signal_key(c.part.tag, c.signal_id)),
    key("dedup key or noop", _dedup), ek("suspension_current"), pk("suspension_timeout"),
)  # fmt: skip
SIGNAL_ARGV = (
    arg("execution_id"), arg("waitpoint_id"), arg("signal_id"), arg("signal_name"),
    arg("signal_category"), arg("source_type"), arg("source_identity"), arg("payload", "bytes"),
    arg("payload_encoding"), arg("correlation_id"), arg("idempotency_key"), arg("target_scope"),
    opt("created_at"), opt("dedup_ttl_ms"), opt("resume_delay_ms"),
    opt("max_signals_per_execution"), opt("signal_maxlen"), arg("waitpoint_token"),
)  # fmt: skip
DELIVER: Decl[Accepted | Duplicate] = Decl(
    "ff_deliver_signal", SIGNAL_KEYS, SIGNAL_ARGV,
    {"OK": record(Accepted), "DUPLICATE": record(Duplicate)},
)  # fmt: skip
BUFFER: Decl[Accepted | Duplicate] = Decl(
    "ff_buffer_signal_for_pending_waitpoint", SIGNAL_KEYS, SIGNAL_ARGV,
    {"OK": record(Accepted), "DUPLICATE": record(Duplicate)},
)  # fmt: skip
ROTATE: Decl[Rotated] = Decl(
    "ff_rotate_waitpoint_hmac_secret",
    (pk("hmac_keystore"),),
    (arg("new_kid"), arg("new_secret_hex"), arg("grace_ms", "int")),
    ok(_rotated),
)
LIST_KIDS: Decl[Kids] = Decl(
    "ff_list_waitpoint_hmac_kids", (pk("hmac_keystore"),), (), ok(_kids), read_only=True
)
INSTALL: Decl[Outcome] = Decl(
    "ff_install_waitpoint_hmac_secret",
    (pk("hmac_keystore"),),
    (arg("kid"), arg("secret_hex")),
    ok(record(Outcome)),
)

DECLS = (DELIVER, BUFFER, ROTATE, LIST_KIDS, INSTALL)


class Keystore:
    """The waitpoint HMAC keystore (one call per partition) and the repair-and-retry of the
    token-minting and -validating calls."""

    def __init__(self, store: Store, hmac_secret: str | None = None) -> None:
        self.store = store
        self.hmac_secret = hmac_secret

    async def install(self, tag: str, kid: str, secret_hex: str) -> Outcome:
        """`installed|repaired|unchanged|mismatch`."""
        values = {"kid": kid, "secret_hex": secret_hex}
        return await call(self.store, INSTALL, KeyCtx(tag=tag), values)

    async def rotate(self, tag: str, new_kid: str, new_secret_hex: str, grace_ms: int) -> Rotated:
        values = {"new_kid": new_kid, "new_secret_hex": new_secret_hex, "grace_ms": grace_ms}
        return await call(self.store, ROTATE, KeyCtx(tag=tag), values)

    async def list_kids(self, tag: str) -> Kids:
        return await call(self.store, LIST_KIDS, KeyCtx(tag=tag), {})

    async def call(self, decl: Decl[R], ctx: KeyCtx, values: Mapping[str, object]) -> R:
        try:
            return await call(self.store, decl, ctx, values)
        except FlowFabricError as exc:
            if exc.code != "hmac_secret_not_initialized" or not self.hmac_secret:
                raise
        tag = ctx.part.tag
        outcome = await self.install(tag, INITIAL_KID, self.hmac_secret)
        log.critical(
            "keyspace reset detected: the waitpoint HMAC keystore of %s was missing; boot "
            "install re-run (%s)", tag, outcome.outcome,
        )  # fmt: skip
        return await call(self.store, decl, ctx, values)


def signal_call(eid: ExecutionId, s: Signal) -> tuple[KeyCtx, dict[str, object]]:
    ctx = exec_ctx(
        eid, waitpoint_id=s.waitpoint_id, signal_id=s.signal_id, idempotency_key=s.idempotency_key
    )
    return ctx, {
        "execution_id": str(eid), "waitpoint_id": s.waitpoint_id, "signal_id": s.signal_id,
        "signal_name": s.signal_name, "signal_category": s.signal_category,
        "source_type": s.source_type, "source_identity": s.source_identity,
        "payload": s.payload, "payload_encoding": s.payload_encoding,
        "correlation_id": s.correlation_id, "idempotency_key": s.idempotency_key,
        "target_scope": s.target_scope, "created_at": s.created_at,
        "dedup_ttl_ms": s.dedup_ttl_ms, "resume_delay_ms": s.resume_delay_ms,
        "max_signals_per_execution": s.max_signals_per_execution,
        "signal_maxlen": s.signal_maxlen, "waitpoint_token": s.waitpoint_token,
    }  # fmt: skip


class SignalFunctions:
    def __init__(self, store: Store, keystore: Keystore) -> None:
        self.store = store
        self.keystore = keystore

    async def deliver_signal(self, eid: ExecutionId, s: Signal) -> Accepted | Duplicate:
        ctx, values = signal_call(eid, s)
        return await self.keystore.call(DELIVER, ctx, values)

    async def buffer_signal_for_pending_waitpoint(
        self, eid: ExecutionId, s: Signal
    ) -> Accepted | Duplicate:
        """As `deliver_signal`; the effect is `buffered_for_pending_waitpoint`."""
        ctx, values = signal_call(eid, s)
        return await self.keystore.call(BUFFER, ctx, values)

    async def install_waitpoint_hmac_secret(self, tag: str, kid: str, secret_hex: str) -> Outcome:
        return await self.keystore.install(tag, kid, secret_hex)

    async def rotate_waitpoint_hmac_secret(
        self, tag: str, new_kid: str, new_secret_hex: str, grace_ms: int
    ) -> Rotated:
        return await self.keystore.rotate(tag, new_kid, new_secret_hex, grace_ms)

    async def list_waitpoint_hmac_kids(self, tag: str) -> Kids:
        return await self.keystore.list_kids(tag)
