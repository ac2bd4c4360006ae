"""Where flow work became claimable (docs/lifecycle.md#work-off-the-lane-partition).

A flow's members live on the flow's partition, not on their lane's own partition, so neither
the long poll's listener (the lanes' own partitions) nor the rotating probe window is sure to
see a member the moment it is released. The functions say so instead: whenever a flow member
becomes eligible (created eligible, released by its last upstream, promoted after a delay,
replayed), the call publishes `{"type": "ready", "lane": ...}` on `ff:ready:{fp:N}`; when a
terminal call leaves outgoing edges past its per-call bound, it publishes
`{"type": "deps_pending", "execution_id": ...}` there too; when work that passed
admission (a quota policy or budgets attached) gives up its lease, `{"type":
"admission_released", "execution_id": ..., "quota_policy_id": ..., "concurrency_key": ...,
"budget_ids": "<id>,<id>"}` (docs/budgets.md#releasing-admissions).

Every server listens to the ready channel of every partition (one sharded subscription per
partition on the hub's per-node connections). A ready event records a hint, (lane, partition),
and wakes the long polls waiting on that lane; the claim pass tries hinted partitions right
after the lane's own, and drops a hint once a claim there comes back short. Each hint carries a
sequence number, so a claim that started before a newer release cannot drop the newer hint.
Pub/sub is at-most-once: a lost event costs the probe window or the 1 s backstop, never work.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flowfabric.server.engine.events import EventHub
from flowfabric.server.valkey.keys import PartitionKeys

log = logging.getLogger("flowfabric.ready")

#: Lanes whose hints are kept; the least recently hinted lane is forgotten past this.
MAX_HINTED_LANES = 4096

OnReady = Callable[[str | None], None]
OnPending = Callable[[int, str], None]


@dataclass(frozen=True)
class Released:
    """An `admission_released` announcement: what admission holds for `execution_id` is to be
    given back (its quota slot, its budget reservations)."""

    execution_id: str
    quota_policy_id: str = ""
    concurrency_key: str = ""
    budget_ids: tuple[str, ...] = ()
    #: The epoch of the lease that ended: a budget releases only the admission made for that
    #: lease (docs/budgets.md#reservations). "" from older announcements: release whatever.
    lease_epoch: str = ""


OnReleased = Callable[[Released], None]


class ReadyHints:
    """Hints of (lane, partition) with claimable flow work, fed by the ready channels."""

    def __init__(self, hub: EventHub | None, partitions: int) -> None:
        self.hub = hub
        self.partitions = partitions
        self._hints: OrderedDict[str, dict[int, int]] = OrderedDict()
        self._seq = itertools.count(1)
        self._on_ready: list[OnReady] = []
        self._on_pending: list[OnPending] = []
        self._on_released: list[OnReleased] = []
        self._stack: contextlib.AsyncExitStack | None = None

    def on_ready(self, callback: OnReady) -> None:
        """`callback(lane)` after a hint for `lane`; `callback(None)` after a resync."""
        self._on_ready.append(callback)

    def on_pending(self, callback: OnPending) -> None:
        """`callback(partition, execution_id)` when a terminal call left edges unresolved."""
        self._on_pending.append(callback)

    def on_released(self, callback: OnReleased) -> None:
        """`callback(Released)` when work that passed admission ended its lease."""
        self._on_released.append(callback)

    async def start(self) -> None:
        """Listen to every partition's ready channel (subscribed in the background)."""
        if self.hub is None or self._stack is not None:
            return
        stack = contextlib.AsyncExitStack()
        for p in range(self.partitions):
            await stack.enter_async_context(
                self.hub.listen(PartitionKeys.of(p).ready, self._listener(p))
            )
        self._stack = stack

    async def stop(self) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()

    def _listener(self, partition: int) -> Callable[[dict[str, Any]], None]:
        def deliver(event: dict[str, Any]) -> None:
            kind = event.get("type")
            if kind == "ready" and isinstance(event.get("lane"), str):
                self.add(event["lane"], partition)
            elif kind == "deps_pending" and isinstance(event.get("execution_id"), str):
                for pending in self._on_pending:
                    pending(partition, event["execution_id"])
            elif kind == "admission_released" and isinstance(event.get("execution_id"), str):
                released = Released(
                    event["execution_id"],
                    _field(event, "quota_policy_id"),
                    _field(event, "concurrency_key"),
                    tuple(b for b in _field(event, "budget_ids").split(",") if b),
                    _field(event, "lease_epoch"),
                )
                for on_released in self._on_released:
                    on_released(released)
            elif kind == "resync":
                for ready in self._on_ready:
                    ready(None)

        return deliver

    def add(self, lane: str, partition: int) -> None:
        """Record that `lane` has claimable work on `partition`, and wake its waiters."""
        self.note(lane, partition)
        for ready in self._on_ready:
            ready(lane)

    def note(self, lane: str, partition: int) -> None:
        """Record that `lane` may have claimable work on `partition` (no wake-up)."""
        parts = self._hints.get(lane)
        if parts is None:
            parts = self._hints[lane] = {}
            while len(self._hints) > MAX_HINTED_LANES:
                self._hints.popitem(last=False)
        else:
            self._hints.move_to_end(lane)
        parts[partition] = next(self._seq)

    def of_lane(self, lane: str) -> list[tuple[int, int]]:
        """The hinted (partition, sequence) pairs of `lane`, oldest hint first."""
        parts = self._hints.get(lane)
        if not parts:
            return []
        return sorted(parts.items(), key=lambda item: item[1])

    def drained(self, lane: str, partition: int, seq: int) -> None:
        """A claim on `partition` that started after hint `seq` came back short: drop the hint,
        unless a newer one arrived meanwhile."""
        parts = self._hints.get(lane)
        if parts is not None and parts.get(partition) == seq:
            del parts[partition]
            if not parts:
                del self._hints[lane]


def _field(event: dict[str, Any], name: str) -> str:
    """A string field of an announcement; anything else reads as absent."""
    value = event.get(name)
    return value if isinstance(value, str) else ""
