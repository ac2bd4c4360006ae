"""Class C reads of lanes (docs/architecture.md#lane-reads): which lanes exist, and each lane's
depth by state summed over the partitions that hold its executions. No FCALL.

A lane's executions live on every partition whose lanes registry (`ff:idx:{p}:lanes`) names it:
its solo partition(s) and the partitions of flows with members in it. Depth reads only those
partitions, in one pipeline per read (redis-py routes a cluster pipeline per node), so a scrape
or a dashboard refresh costs `partitions x lanes-on-them` ZCARDs, not `all partitions x all
lanes`. The counts are exact for one read but not a snapshot across partitions: each ZCARD runs
on its own.

This module is the one place lane depth is computed; metrics, the dashboard and `ListLanes`
all read through it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from flowfabric.server.valkey.codec import text
from flowfabric.server.valkey.keys import PartitionKeys
from flowfabric.server.valkey.store import Store

# The per-lane index sets of docs/architecture.md#key-schema, in display order.
LANE_STATES: tuple[str, ...] = (
    "eligible", "delayed", "active", "suspended",
    "blocked:dependencies", "blocked:budget", "blocked:quota", "blocked:route",
    "blocked:operator", "terminal",
)  # fmt: skip
BLOCKED_REASONS: tuple[str, ...] = tuple(
    s.removeprefix("blocked:") for s in LANE_STATES if s.startswith("blocked:")
)
# An eligible score is `-priority * 10^12 + eligible_since_ms` (lua/include/state.lua).
_PRIORITY_STEP = 1_000_000_000_000


@dataclass
class LaneDepth:
    """One lane: members per state (every LANE_STATES key present), the partitions read, and
    the eligible-since time of the execution at the head of its queue on each partition (the
    oldest of those heads is `head_eligible_since_ms`, None when nothing is eligible)."""

    lane: str
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(LANE_STATES, 0))
    partitions: list[int] = field(default_factory=list)
    head_eligible_since_ms: int | None = None

    @property
    def blocked(self) -> int:
        return sum(self.counts[f"blocked:{r}"] for r in BLOCKED_REASONS)

    def head_age_ms(self, now_ms: int) -> int:
        """How long the head of the queue has been eligible (0 when nothing is eligible)."""
        if self.head_eligible_since_ms is None:
            return 0
        return max(now_ms - self.head_eligible_since_ms, 0)


def eligible_since(score: float, now_ms: int) -> int:
    """The eligible-since time encoded in an eligible score (the priority is recovered as the
    multiple of 10^12 nearest to `now - score`; exact while an entry is under ~15 years old)."""
    s = int(score)
    priority = round((now_ms - s) / _PRIORITY_STEP)
    return s + priority * _PRIORITY_STEP


async def lanes_by_partition(store: Store, partitions: Sequence[int]) -> dict[int, set[str]]:
    """Each partition's lane registry."""
    pipe = store.pipeline()
    for p in partitions:
        pipe.smembers(PartitionKeys.of(p).lanes)
    rows = await store.run_pipeline(pipe)
    out: dict[int, set[str]] = {}
    for p, members in zip(partitions, rows, strict=True):
        out[p] = {text(m) for m in members}
    return out


async def known_lanes(store: Store, partitions: Sequence[int]) -> set[str]:
    """Every lane any partition's registry names."""
    by_part = await lanes_by_partition(store, partitions)
    return set().union(*by_part.values()) if by_part else set()


async def lane_depths(
    store: Store,
    partitions: Sequence[int],
    *,
    lanes: Iterable[str] | None = None,
    now_ms: int | None = None,
) -> dict[str, LaneDepth]:
    """Depth by state of `lanes` (default: every known lane), keyed by lane id. A lane asked
    for but named by no registry answers all zeros. Two round trips: the registries, then one
    pipeline of ZCARDs and queue heads."""
    by_part = await lanes_by_partition(store, partitions)
    wanted = set(lanes) if lanes is not None else set().union(*by_part.values())
    out = {lane: LaneDepth(lane) for lane in sorted(wanted)}
    plan: list[tuple[str, int]] = []
    pipe = store.pipeline()
    for p, present in by_part.items():
        keys = PartitionKeys.of(p)
        for lane in sorted(present & wanted):
            plan.append((lane, p))
            for state in LANE_STATES:
                pipe.zcard(keys.lane(lane, state))
            pipe.zrange(keys.lane(lane, "eligible"), 0, 0, withscores=True)
    if not plan:
        return out
    if now_ms is None:
        now_ms = await store.time_ms()
    rows = await store.run_pipeline(pipe)
    width = len(LANE_STATES) + 1
    for i, (lane, p) in enumerate(plan):
        row = rows[i * width : (i + 1) * width]
        depth = out[lane]
        depth.partitions.append(p)
        for state, n in zip(LANE_STATES, row, strict=False):
            depth.counts[state] += int(n)
        head = row[-1]
        if head:
            since = eligible_since(float(head[0][1]), now_ms)
            if depth.head_eligible_since_ms is None or since < depth.head_eligible_since_ms:
                depth.head_eligible_since_ms = since
    return out
