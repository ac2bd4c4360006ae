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


# -- flows --------------------------------------------------------------------------------------


class FlowState(enum.StrEnum):
    """The state of a flow (`FlowSnapshot.public_flow_state`), kept current by its members'
    own transitions (docs/flows.md#flow-state)."""

    OPEN = "open"
    RUNNING = "running"
    BLOCKED = "blocked"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    #: A state this SDK does not know (a newer server); see `FlowInfo.snapshot`.
    UNKNOWN = "unknown"

    @classmethod
    def parse(cls, value: str) -> FlowState:
        try:
            return cls(value)
        except ValueError:
            return cls.UNKNOWN

    @property
    def is_terminal(self) -> bool:
        """Completed, failed or cancelled. A replay can reopen a completed or failed flow."""
        return self in (FlowState.COMPLETED, FlowState.FAILED, FlowState.CANCELLED)


@dataclass(frozen=True)
class FlowFailure:
    """One member failure the flow recorded (the first five are kept).

    Attributes:
        execution_id: The member.
        state: FAILED, EXPIRED or CANCELLED.
        reason: The failure (or cancellation) reason the member recorded.
        at: When, in ms since the Unix epoch.
    """

    execution_id: str
    state: ExecutionState
    reason: str
    at: int


_FAILURE_STATES = {s.name.lower(): s for s in ExecutionState}


@dataclass(frozen=True)
class FlowInfo:
    """A flow as `Client.describe_flow` reads it.

    Attributes:
        flow_id: The flow.
        state: Its state; `state.is_terminal` once completed, failed or cancelled.
        counts: Members by public state (`completed`, `failed`, `skipped`, `waiting`,
            `waiting_children`, `active`, ...); states with no member are left out.
        failures: The first member failures, oldest first.
        graph_revision: Bumped by every structural change (members plus edges after a submit).
        node_count: Members.
        edge_count: Edges.
        snapshot: The server's record as sent (kind, namespace, times, tags, cancel fields).
    """

    flow_id: str
    state: FlowState
    counts: Mapping[str, int]
    failures: tuple[FlowFailure, ...]
    graph_revision: int
    node_count: int
    edge_count: int
    snapshot: types_pb2.FlowSnapshot

    @property
    def done(self) -> int:
        """Members in a terminal state."""
        terminal = {s.name.lower() for s in TERMINAL_STATES}
        return sum(n for state, n in self.counts.items() if state in terminal)

    @classmethod
    def from_proto(
        cls,
        snapshot: types_pb2.FlowSnapshot,
        members_by_state: Mapping[str, int],
        failures: Sequence[Any] = (),
    ) -> FlowInfo:
        """From DescribeFlow's (or WatchFlow's) record, counts and failures."""
        return cls(
            flow_id=snapshot.flow_id,
            state=FlowState.parse(snapshot.public_flow_state),
            counts=dict(members_by_state),
            failures=tuple(
                FlowFailure(
                    f.execution_id,
                    _FAILURE_STATES.get(f.public_state, ExecutionState.UNSPECIFIED),
                    f.reason,
                    f.at,
                )
                for f in failures
            ),
            graph_revision=snapshot.graph_revision,
            node_count=snapshot.node_count,
            edge_count=snapshot.edge_count,
            snapshot=snapshot,
        )


@dataclass(frozen=True)
class SubmittedFlow:
    """The answer to a flow's `submit()`: the flow id and each member's execution id.

    Index it with the handle `FlowBuilder.add` returned (or the member's key):
    `flow[fetch]` is the execution id of member `fetch`.

    Attributes:
        flow_id: The flow.
        members: Member key → execution id, in the order they were added.
        states: Member key → the state it was created in (WAITING, or WAITING_CHILDREN for a
            member with upstreams); empty for a duplicate.
        graph_revision: Members plus edges.
        duplicate: True if the flow id named an existing flow (nothing was written; `members`
            are those the first submit named).
    """

    flow_id: str
    members: Mapping[str, str]
    states: Mapping[str, ExecutionState]
    graph_revision: int
    duplicate: bool

    def __getitem__(self, member: Any) -> str:
        key = getattr(member, "key", member)
        return self.members[key]

    @property
    def execution_ids(self) -> builtins.list[str]:
        return builtins.list(self.members.values())


@dataclass(frozen=True)
class FlowCancellation:
    """The answer to `Client.cancel_flow`.

    Attributes:
        outcome: `cancelled` (the flow and every member cancel are done), `scheduled` (member
            cancels run in the background) or `partial` (some member cancels failed; they are
            retried in the background, or retry them with `Client.cancel`).
        policy: The cancellation policy applied (the stored one on a repeat).
        members: The flow's members (capped at 1000 on a repeat).
        failed: With `partial`: the members whose cancel failed.
    """

    outcome: str
    policy: str
    members: tuple[str, ...]
    failed: tuple[str, ...] = ()


@dataclass(frozen=True)
class FlowReplay:
    """The answer to `Client.replay_flow`.

    Attributes:
        execution_ids: The members returned to run (empty: nothing to replay, every member
            completed or is still running).
        reopened_edges: Edges reopened (back to unsatisfied).
        state: The flow's state after the replay.
    """

    execution_ids: tuple[str, ...]
    reopened_edges: int
    state: FlowState
