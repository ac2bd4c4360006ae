"""The node-wide probe (docs/architecture.md#scanners): which of many partitions hold work in one
index, asked with one `ff_probe_due` call per Valkey node (at most PROBE_PARTITIONS_PER_CALL
partitions a call) instead of one read per partition.

The scanners use it for every cycle and the claim cycle for its window probe and reclaim
discovery. A node that cannot answer (a slot moving between nodes, so a built key is not local)
is asked the old way, one read per partition in a pipeline, so an answer is never lost.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Literal

from flowfabric.server.valkey.codec import text
from flowfabric.server.valkey.errors import FlowFabricError
from flowfabric.server.valkey.keys import PartitionKeys
from flowfabric.server.valkey.store import Store

log = logging.getLogger("flowfabric.probe")

# Partitions one ff_probe_due call looks at: bounds how long one call holds Valkey.
PROBE_PARTITIONS_PER_CALL = 128

Test = Literal["any", "due"]


@functools.cache
def _tag(partition: int) -> str:
    return PartitionKeys.of(partition).tag


def lane_index(lane: str, which: str) -> str:
    """The `index` argument of `probe` for the lane set `PartitionKeys.lane(lane, which)`."""
    pk = PartitionKeys.of(0)
    return pk.lane(lane, which).removeprefix(pk.index(""))


def node_groups(store: Store, parts: Sequence[int]) -> list[list[int]]:
    """`parts` grouped by the node that owns them (standalone: one group), each group in the
    order of `parts` and cut into calls of at most PROBE_PARTITIONS_PER_CALL."""
    groups: dict[str, list[int]] = {}
    if store.cluster:
        client = store.cluster_client
        for p in parts:
            node = client.get_node_from_key(PartitionKeys.of(p).noop)
            groups.setdefault("" if node is None else str(node.name), []).append(p)
    else:
        groups[""] = list(parts)
    n = PROBE_PARTITIONS_PER_CALL
    return [g[i : i + n] for g in groups.values() for i in range(0, len(g), n)]


async def probe(
    store: Store,
    parts: Sequence[int],
    index: str,
    *,
    test: Test,
    upper: int = 0,
    lanes: Sequence[str] | None = None,
) -> tuple[list[tuple[int, str]], list[int]]:
    """((partition, lane) of each index with work, in the order of `parts`; the partitions no
    node answered for). `index` is `PartitionKeys.index(index)`, or with `lanes` (per lane) a
    lane set probed for those lanes and every lane of each partition's registry; `test` `due`
    counts members scored at most `upper`, `any` any member."""
    head: list[str | bytes | int] = [test, upper, index, "1" if lanes is not None else ""]
    tail = list(lanes or ())
    found: list[tuple[int, str]] = []
    unprobed: list[int] = []
    for group in node_groups(store, parts):
        tags = [_tag(p) for p in group]
        try:
            rows = await store.fcall(
                "ff_probe_due",
                [PartitionKeys.of(group[0]).noop],
                [*head, len(tags), *tags, *tail],
                read_only=True,
            )
        except FlowFabricError as exc:
            log.debug("probe of %s failed (%s); reading directly", index, exc.code)
            unprobed += group
            continue
        found += [(group[int(rows[i]) - 1], text(rows[i + 1])) for i in range(0, len(rows) - 1, 2)]
    rank = {p: i for i, p in enumerate(parts)}
    found.sort(key=lambda hit: rank[hit[0]])
    return found, sorted(unprobed, key=rank.__getitem__)


async def partitions_with_work(
    store: Store, parts: Sequence[int], index: str, *, test: Test, upper: int = 0
) -> list[int]:
    """The partitions of `parts` (in order) whose `PartitionKeys.index(index)` holds work; the
    ones the probe could not answer for are read directly."""
    found, unprobed = await probe(store, parts, index, test=test, upper=upper)
    if not unprobed:
        return [p for p, _ in found]
    pipe = store.pipeline()
    for p in unprobed:
        key = PartitionKeys.of(p).index(index)
        if test == "any":
            pipe.exists(key)
        else:
            pipe.zrangebyscore(key, "-inf", upper, start=0, num=1)
    rows = await store.run_pipeline(pipe)
    hits = {p for p, _ in found} | {p for p, row in zip(unprobed, rows, strict=True) if row}
    return [p for p in parts if p in hits]
