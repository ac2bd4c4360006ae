"""Signals and waitpoints as the SDK hands them out, and the resume-condition rules.

A waitpoint token is a credential: it is a field of `Waitpoint` and `PendingWaitpoint` but never
part of their `repr`, so logging one of them does not leak it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal

from flowfabric.v1 import signal_pb2, types_pb2

Duration = timedelta | float | int
"""A length of time: a timedelta, or a number of seconds."""

MATCH_MODES = ("any", "all")
TIMEOUT_BEHAVIORS = ("fail", "cancel", "expire", "auto_resume", "escalate")


def duration_ms(value: Duration, what: str) -> int:
    """Whole milliseconds of a duration (>= 0)."""
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if seconds < 0:
        raise ValueError(f"{what} must not be negative")
    return round(seconds * 1000)


def redact(token: str) -> str:
    """How a token may appear in output meant for logs: `<kid>:<REDACTED:len=40>`."""
    kid, sep, digest = token.partition(":")
    return f"{kid}:<REDACTED:len={len(digest)}>" if sep and kid else "<REDACTED:malformed>"


@dataclass(frozen=True)
class Signal:
    """An accepted signal, with its payload.

    Attributes:
        signal_id: The signal's id.
        name: The signal name (matched against resume conditions).
        payload: Raw payload bytes, verbatim (b"" when it had none).
        payload_encoding: The sender's label (default `json`).
        category: Free-form category (e.g. `approval`, `callback`).
        source_type: Who sent it (e.g. `user`, `webhook`).
        source_identity: Which one of them.
        correlation_id: The sender's correlation id, if any.
        execution_id: The target execution.
        waitpoint_id: The target waitpoint.
        effect: What accepting it did: `appended_to_waitpoint`, `resume_condition_satisfied`,
            `no_op` or `buffered_for_pending_waitpoint`.
        created_at: The sender's timestamp (ms; acceptance time when not given).
        accepted_at: Server time of acceptance (ms).
        stream_id: Its entry in the waitpoint's signal stream (a `watch_signals` cursor).
    """

    signal_id: str
    name: str
    payload: bytes = field(repr=False)
    payload_encoding: str = "json"
    category: str = ""
    source_type: str = ""
    source_identity: str = ""
    correlation_id: str | None = None
    execution_id: str = ""
    waitpoint_id: str = ""
    effect: str = ""
    created_at: int = 0
    accepted_at: int = 0
    stream_id: str = ""

    @classmethod
    def from_proto(cls, record: types_pb2.SignalRecord) -> Signal:
        return cls(
            signal_id=record.signal_id,
            name=record.signal_name,
            payload=bytes(record.payload),
            payload_encoding=record.payload_encoding or "json",
            category=record.signal_category,
            source_type=record.source_type,
            source_identity=record.source_identity,
            correlation_id=record.correlation_id if record.HasField("correlation_id") else None,
            execution_id=record.execution_id,
            waitpoint_id=record.waitpoint_id,
            effect=record.observed_effect,
            created_at=record.created_at,
            accepted_at=record.accepted_at,
            stream_id=record.stream_id,
        )

    def json(self) -> Any:
        """The payload decoded as JSON (None for an empty payload)."""
        return json.loads(self.payload) if self.payload else None

    def text(self) -> str:
        """The payload as UTF-8 text."""
        return self.payload.decode()


@dataclass(frozen=True)
class Waitpoint:
    """An open waitpoint of an execution, with the token a sender must present.

    Attributes:
        id: The waitpoint id (signals target it).
        key: Its opaque label.
        state: `pending` (created ahead of a suspension; signals are buffered) or `active`.
        token: `<kid>:<40 hex>`; a credential (not in `repr`).
        signal_names: Names the resume condition waits for; empty = any signal (`active`) or
            not yet known (`pending`).
        created_at: Creation time (ms).
        activated_at: When a suspension activated it (ms); None while pending.
        expires_at: Pending expiry or suspension timeout (ms); None when there is none.
    """

    id: str
    key: str
    state: str
    token: str = field(repr=False)
    signal_names: tuple[str, ...] = ()
    created_at: int = 0
    activated_at: int | None = None
    expires_at: int | None = None

    @classmethod
    def from_proto(cls, info: types_pb2.PendingWaitpointInfo) -> Waitpoint:
        return cls(
            id=info.waitpoint_id,
            key=info.waitpoint_key,
            state=info.state,
            token=info.waitpoint_token,
            signal_names=tuple(info.required_signal_names),
            created_at=info.created_at,
            activated_at=info.activated_at if info.HasField("activated_at") else None,
            expires_at=info.expires_at if info.HasField("expires_at") else None,
        )

    def accepts(self, name: str) -> bool:
        """Whether a signal called `name` may match (always true when no names are known)."""
        return not self.signal_names or name in self.signal_names


@dataclass(frozen=True)
class WaitpointEvent:
    """One message of `Client.watch_waitpoints`.

    Attributes:
        kind: `opened` (the waitpoint is open, `waitpoint` holds it with its token) or
            `closed` (`close_reason` says why: `resumed`, `operator_resume`, `timed_out_fail`,
            `proactive_close`, `never_committed`, ...).
        waitpoint_id: The waitpoint.
        at: Server time of the change (ms).
        waitpoint: The opened waitpoint; None for `closed`.
        close_reason: Why it closed; empty for `opened`.
    """

    kind: Literal["opened", "closed"]
    waitpoint_id: str
    at: int
    waitpoint: Waitpoint | None = None
    close_reason: str = ""

    @classmethod
    def from_proto(cls, message: signal_pb2.WatchWaitpointsResponse) -> WaitpointEvent:
        if message.WhichOneof("event") == "opened":
            wp = Waitpoint.from_proto(message.opened.waitpoint)
            return cls("opened", wp.id, message.at, waitpoint=wp)
        closed = message.closed
        return cls("closed", closed.waitpoint_id, message.at, close_reason=closed.close_reason)


@dataclass(frozen=True)
class SignalDelivery:
    """The answer to `Client.deliver_signal`.

    Attributes:
        signal_id: The new signal's id, or for a duplicate the first signal's.
        effect: `appended_to_waitpoint` (matched, condition not yet met),
            `resume_condition_satisfied` (the execution resumed), `no_op` (matched nothing),
            `buffered_for_pending_waitpoint` (evaluated when the waitpoint activates), or
            `duplicate`.
        duplicate: The idempotency key matched an earlier signal; nothing was written.
    """

    signal_id: str
    effect: str
    duplicate: bool = False

    @property
    def resumed(self) -> bool:
        """True when this signal met the resume condition."""
        return self.effect == "resume_condition_satisfied"

    @property
    def buffered(self) -> bool:
        """True when the waitpoint was still pending. Tentative: re-send with the same
        idempotency key if the execution does not suspend or resume in time."""
        return self.effect == "buffered_for_pending_waitpoint"


@dataclass(frozen=True)
class SecretRotation:
    """The answer to `Client.rotate_waitpoint_secret`.

    Attributes:
        new_kid: The kid now signing new tokens.
        rotated: Partitions signing with it (no-op repeats included).
        failed: Partitions that failed; retry the same rotation to converge.
    """

    new_kid: str
    rotated: int
    failed: tuple[int, ...] = ()

    @property
    def complete(self) -> bool:
        return not self.failed


@dataclass(frozen=True)
class WaitpointKids:
    """One partition's waitpoint HMAC keystore, without secrets.

    Attributes:
        partition: The flow partition read.
        current_kid: The kid signing new tokens; None if uninitialised.
        verifying: Older kids whose tokens still validate → the end of their grace (ms).
    """

    partition: int
    current_kid: str | None
    verifying: dict[str, int]


def choose_waitpoints(waitpoints: Iterable[Waitpoint], name: str | None) -> list[Waitpoint]:
    """The open waitpoints a signal `name` should go to, best first narrowed: those that may
    take it (all, without a name); then active over pending; then naming it over wildcards.
    One left = the answer; none or several = ask the caller."""
    candidates = [wp for wp in waitpoints if name is None or wp.accepts(name)]
    for better in (
        lambda wp: wp.state == "active",
        lambda wp: name is not None and name in wp.signal_names,
    ):
        if len(candidates) > 1 and any(better(wp) for wp in candidates):
            candidates = [wp for wp in candidates if better(wp)]
    return candidates


# -- resume conditions ----------------------------------------------------------------------


@dataclass(frozen=True)
class ResumeCondition:
    """What `TaskContext.suspend` waits for (see docs/suspension.md): one matcher per name, in
    order (an empty name is a wildcard; no names = any one signal)."""

    names: tuple[str, ...]
    mode: str
    min_count: int
    condition_type: str = "signal_set"

    @classmethod
    def build(
        cls, signals: str | Sequence[str] | None, mode: str | None, min_count: int | None
    ) -> ResumeCondition:
        names = (signals,) if isinstance(signals, str) else tuple(signals or ())
        if mode is None:
            mode = "all" if len(names) > 1 else "any"
        if mode not in MATCH_MODES:
            raise ValueError(f"mode must be one of {MATCH_MODES}, got {mode!r}")
        matchers = max(len(names), 1)
        count = 1 if min_count is None else min_count
        if not 1 <= count <= matchers:
            raise ValueError(f"min_count must be 1..{matchers} (one per signal name)")
        return cls(names, mode, count)

    def to_json(self) -> str:
        return json.dumps(
            {
                "condition_type": self.condition_type,
                "required_signal_names": list(self.names),
                "signal_match_mode": self.mode,
                "minimum_signal_count": self.min_count,
            },
            separators=(",", ":"),
        )
