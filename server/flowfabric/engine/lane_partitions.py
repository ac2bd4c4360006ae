"""A lane's partitions: where its solo executions are created and claimed from
(docs/lifecycle.md#lanes-across-a-cluster).

A lane of spread width S owns S partitions. The first is always its home partition,
`solo_partition(lane)` (crc16 % P), so a width of 1 is the one-partition lane. The others are
found by walking the partitions from the home one and taking, in rounds, one partition per
primary that has fewer than the round's count: with S = the number of primaries every partition
of the set is on a different primary. On standalone every partition has the same owner, so the
set is the home partition and the ones after it.

The owner of a partition is the primary serving its hash tag's slot, read from the Cluster
client's slot map (in memory, no I/O) and re-read at most every REFRESH_S. So the set is a pure
function of (lane, P, S, slot map): every server of a deployment with the same FF_LANE_SPREAD
and slot map computes the same set. After a resharding a set may change; executions already on
a partition that left it are still claimed, by the rotating window of the claim cycle.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from flowfabric.server.config import AUTO_SPREAD
from flowfabric.server.valkey.ids import crc16, solo_partition
from flowfabric.server.valkey.store import Store

__all__ = ["LanePartitions", "lane_partition_set"]

log = logging.getLogger("flowfabric.lane_partitions")

REFRESH_S = 5.0
MAX_LANES = 4096  # lanes whose sets are cached; past it the cache starts over


def lane_partition_set(
    lane: str, partitions: int, width: int, owners: Sequence[str] | None
) -> tuple[int, ...]:
    """The lane's partitions, home partition first. `owners[p]`: the primary serving partition
    p (None: one node)."""
    home = solo_partition(lane, partitions)
    width = max(1, min(width, partitions))
    if width == 1:
        return (home,)
    picked: list[int] = [home]
    taken = {home}
    count: dict[str, int] = {}
    count[owners[home] if owners else ""] = 1
    level = 1
    while len(picked) < width:
        for i in range(1, partitions):
            p = (home + i) % partitions
            owner = owners[p] if owners else ""
            if p in taken or count.get(owner, 0) >= level:
                continue
            picked.append(p)
            taken.add(p)
            count[owner] = count.get(owner, 0) + 1
            if len(picked) == width:
                break
        level += 1
    return tuple(picked)


@dataclass
class _Lane:
    parts: tuple[int, ...]
    turns: itertools.count[int] = field(default_factory=itertools.count)


class LanePartitions:
    """Every lane's partition set for this process: creates pick one of it, claims rotate over
    it. `spread`: lane -> width, "" the default, AUTO_SPREAD (or absent) = auto."""

    def __init__(
        self, partitions: int, store: Store | None = None, spread: Mapping[str, int] | None = None
    ) -> None:
        self.partitions = partitions
        self.store = store
        self.spread = dict(spread or {})
        self._owners: tuple[str, ...] | None = None
        self._primaries = 1
        self._read_at = float("-inf")
        self._lanes: dict[str, _Lane] = {}
        self._creates = itertools.count()

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._read_at < REFRESH_S:
            return
        self._read_at = now
        if self.store is None or not self.store.cluster:
            return
        client = self.store.cluster_client
        owners: list[str] = []
        try:
            for p in range(self.partitions):
                node = client.get_node_from_key(f"{{fp:{p}}}")
                owners.append(node.name if node is not None else "")
        except Exception as exc:  # a slot not covered (mid-failover): keep the last map
            log.warning("lane partitions: slot map not readable (%s); keeping the last one", exc)
            return
        found = tuple(owners)
        if found != self._owners:
            self._owners = found
            self._primaries = len(set(found))
            self._lanes.clear()

    def width(self, lane: str) -> int:
        """The lane's spread width: its own setting, else the default; auto = the primaries."""
        self._refresh()
        width = self.spread.get(lane, self.spread.get("", AUTO_SPREAD))
        return self._primaries if width == AUTO_SPREAD else width

    def _lane(self, lane: str) -> _Lane:
        self._refresh()
        entry = self._lanes.get(lane)
        if entry is None:
            if len(self._lanes) >= MAX_LANES:
                self._lanes.clear()
            parts = lane_partition_set(lane, self.partitions, self.width(lane), self._owners)
            entry = self._lanes[lane] = _Lane(parts)
        return entry

    def of(self, lane: str) -> tuple[int, ...]:
        """The lane's partitions, home partition first."""
        return self._lane(lane).parts

    def rotated(self, lane: str) -> list[int]:
        """The lane's partitions starting one further on each call (per process): the order a
        claim tries them in."""
        entry = self._lane(lane)
        shift = next(entry.turns) % len(entry.parts)
        return [*entry.parts[shift:], *entry.parts[:shift]]

    def next_create(self) -> int:
        """A turn for one create request: its items without an idempotency key go to
        `for_create(..., turn)`; one turn per request keeps a batch in one call per lane."""
        return next(self._creates)

    def for_create(self, lane: str, namespace: str, idempotency_key: str, turn: int) -> int:
        """The partition of a new solo execution: by the idempotency key's hash when it has one
        (a retried create reaches the same partition), else round robin by `turn`."""
        parts = self.of(lane)
        if len(parts) == 1:
            return parts[0]
        if idempotency_key:
            return parts[crc16(f"{namespace}\n{idempotency_key}".encode()) % len(parts)]
        return parts[turn % len(parts)]
