"""The client's value types: public states, submit and list answers, times and payloads."""

from __future__ import annotations

import builtins
import enum
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from flowfabric.v1 import execution_pb2, types_pb2

Time = datetime | timedelta | int
"""An absolute time: a datetime, a delay from now (timedelta), or ms since the Unix epoch."""
Payload = bytes | str | Mapping[str, Any] | Sequence[Any]
"""bytes are sent verbatim; str as UTF-8; mappings and lists as JSON."""


class ExecutionState(enum.IntEnum):
    """The public state of an execution (`flowfabric.v1.PublicState`)."""

    UNSPECIFIED = types_pb2.PUBLIC_STATE_UNSPECIFIED
    WAITING = types_pb2.PUBLIC_STATE_WAITING
    DELAYED = types_pb2.PUBLIC_STATE_DELAYED
    RATE_LIMITED = types_pb2.PUBLIC_STATE_RATE_LIMITED
    WAITING_CHILDREN = types_pb2.PUBLIC_STATE_WAITING_CHILDREN
    ACTIVE = types_pb2.PUBLIC_STATE_ACTIVE
    SUSPENDED = types_pb2.PUBLIC_STATE_SUSPENDED
    COMPLETED = types_pb2.PUBLIC_STATE_COMPLETED
    FAILED = types_pb2.PUBLIC_STATE_FAILED
    CANCELLED = types_pb2.PUBLIC_STATE_CANCELLED
    EXPIRED = types_pb2.PUBLIC_STATE_EXPIRED
    SKIPPED = types_pb2.PUBLIC_STATE_SKIPPED

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATES


#: The terminal public states (the one set `ExecutionState.is_terminal` and the CLI use).
TERMINAL_STATES = frozenset(
    {
        ExecutionState.COMPLETED,
        ExecutionState.FAILED,
        ExecutionState.CANCELLED,
        ExecutionState.EXPIRED,
        ExecutionState.SKIPPED,
    }
)
INDEXES = {
    "eligible": execution_pb2.EXECUTION_INDEX_ELIGIBLE,
    "delayed": execution_pb2.EXECUTION_INDEX_DELAYED,
    "terminal": execution_pb2.EXECUTION_INDEX_TERMINAL,
    "suspended": execution_pb2.EXECUTION_INDEX_SUSPENDED,
    "active": execution_pb2.EXECUTION_INDEX_ACTIVE,
}


@dataclass(frozen=True)
class Submitted:
    """The answer to `Client.submit`.

    Attributes:
        execution_id: The (server-minted or given) execution id.
        duplicate: True if the id or idempotency key named an existing execution.
        state: The state written (WAITING or DELAYED), or the existing one for a duplicate.
    """

    execution_id: str
    duplicate: bool
    state: ExecutionState


@dataclass(frozen=True)
class Page:
    """One page of `Client.list`; `next_page_token` is empty on the last page."""

    executions: builtins.list[types_pb2.ExecutionSummary]
    next_page_token: str


def to_ms(value: Time) -> int:
    """Milliseconds since the Unix epoch."""
    if isinstance(value, datetime):
        return int(value.timestamp() * 1000)
    if isinstance(value, timedelta):
        return int(time.time() * 1000 + value.total_seconds() * 1000)
    return int(value)


def encode_payload(value: Payload | None) -> tuple[bytes | None, str | None]:
    """(bytes, encoding): bytes verbatim (no encoding), str as `utf8`, the rest as `json`."""
    if value is None:
        return None, None
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value), None
    if isinstance(value, str):
        return value.encode(), "utf8"
    return json.dumps(value, separators=(",", ":")).encode(), "json"
