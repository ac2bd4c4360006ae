"""Background scanners (docs/architecture.md#scanners): find due work in per-partition sorted sets.

Each cycle first asks every node, in `ff_probe_due` calls of up to 128 partitions, which of its
partitions (and lanes) hold work; then it takes the due members of those indexes only with
`ZRANGEBYSCORE <index> -inf <now> LIMIT 0 <batch>` (pipelined), and calls one idempotent
function per member. An idle cycle is thus a TIME and a few probe calls, not a read of every
partition's index and lane registry. Several server processes may run the same scanners
against one Valkey: every function re-validates inside its atomic call, so a member handled
twice is a no-op the second time. A member failing 3 times in a row is skipped for 10 cycles.
Never SCAN.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from flowfabric.server.engine.probe import probe
from flowfabric.server.valkey.codec import text
from flowfabric.server.valkey.durability import acknowledges_nobody
from flowfabric.server.valkey.errors import FlowFabricError
from flowfabric.server.valkey.keys import PartitionKeys
from flowfabric.server.valkey.store import Store, server_time_ms

__all__ = ["server_time_ms"]  # re-exported: the TIME read lives in the valkey layer

log = logging.getLogger("flowfabric.scanners")

PARTITIONS_PER_ROUND = 32
FAILURES_BEFORE_SKIP = 3
SKIP_CYCLES = 10
CRASH_RESTART_S = 5.0
# A scanner is stalled when it has made no progress for this many of its intervals (at
# least STALL_MIN_S): health turns NOT_SERVING while a critical one is.
STALL_INTERVALS = 5
STALL_MIN_S = 1.0
CRITICAL_SCANNERS = ("lease_expiry", "delayed_promoter", "unblock")

# (partition keys, lane or None) -> index key
IndexFn = Callable[[PartitionKeys, str | None], str]
# (member, now_ms, lane or None) -> anything; raises on failure
ActionFn = Callable[[str, int, str | None], Awaitable[object]]


@dataclass
class Scanner:
    """One scanner: an index per partition (or per partition and lane) and an action."""

    name: str
    interval_ms: int
    index: IndexFn
    action: ActionFn
    per_lane: bool = False
    batch: int = 50
    # Members due at score <= now - age_ms; "+inf" reads the whole index (unblock).
    age_ms: int = 0
    whole_index: bool = False
    # The action's third argument is the partition's tag instead of a lane (indexes whose
    # members carry no partition, e.g. pending-waitpoint expiry: waitpoint ids).
    by_partition: bool = False
    # Page through the whole index by rank, a `batch` per key per cycle, resuming where the
    # last cycle stopped (indexes whose members are not "due", e.g. blocked:dependencies).
    paged: bool = False
    _offsets: dict[str, int] = field(default_factory=dict)
    _failures: dict[str, int] = field(default_factory=dict)
    _skip_until: dict[str, int] = field(default_factory=dict)
    cycles: int = 0
    # monotonic time of the last finished round of partitions, member or cycle: what the
    # stall check reads (docs/architecture.md#health)
    last_progress: float = field(default_factory=time.monotonic)

    def _skipped(self, member: str) -> bool:
        until = self._skip_until.get(member)
        if until is None:
            return False
        if self.cycles >= until:
            del self._skip_until[member]
            return False
        return True

    def _record(self, member: str, ok: bool) -> None:
        if ok:
            self._failures.pop(member, None)
            return
        count = self._failures.get(member, 0) + 1
        if count >= FAILURES_BEFORE_SKIP:
            self._failures.pop(member, None)
            self._skip_until[member] = self.cycles + SKIP_CYCLES
            log.warning(
                "%s: %s failed %d times; skipping it for %d cycles",
                self.name,
                member,
                count,
                SKIP_CYCLES,
            )
        else:
            self._failures[member] = count


class ScannerSet:
    """Runs every scanner as a supervised asyncio task."""

    def __init__(self, store: Store, partitions: int, lanes: Sequence[str]) -> None:
        self.store = store
        self.partitions = partitions
        self.configured_lanes = tuple(lanes)
        self.scanners: list[Scanner] = []
        self.reconciler: Any = None
        # Whole-pass jobs beside the scanners (run_cycle(), interval_ms, name), e.g. the flow
        # projector.
        self.cycles: list[Any] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        # (name, interval_ms, seconds, ok) after each cycle: the metrics (docs/observability.md)
        self.on_cycle: Callable[[str, int, float, bool], None] = lambda *_: None

    def add(self, scanner: Scanner) -> None:
        self.scanners.append(scanner)

    def stalled(self, names: Sequence[str] = CRITICAL_SCANNERS) -> list[str]:
        """The running scanners among `names` with no progress for STALL_INTERVALS intervals."""
        if not self._tasks or self._stopping.is_set():
            return []
        now = time.monotonic()
        return [
            s.name for s in self.scanners
            if s.name in names
            and now - s.last_progress > max(STALL_INTERVALS * s.interval_ms / 1000, STALL_MIN_S)
        ]  # fmt: skip

    def start(self) -> None:
        for scanner in self.scanners:
            scanner.last_progress = time.monotonic()
        # Scanner transitions acknowledge nobody, so they skip the durability wait; the next
        # acknowledged write on the same node covers them (docs/durability.md#what-waits).
        with acknowledges_nobody():
            for scanner in self.scanners:
                self._tasks.append(
                    asyncio.create_task(self._supervise(scanner), name=f"scanner-{scanner.name}")
                )
            for job in ([self.reconciler] if self.reconciler is not None else []) + self.cycles:
                name = getattr(job, "name", "index_reconciler")
                self._tasks.append(
                    asyncio.create_task(self._supervise_cycle(job), name=f"scanner-{name}")
                )

    async def stop(self, grace: float = 15.0) -> None:
        """Signal every loop to stop, then cancel what is still running after `grace` s."""
        self._stopping.set()
        if not self._tasks:
            return
        _done, pending = await asyncio.wait(self._tasks, timeout=grace)
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                async with asyncio.timeout(1):
                    await task
        self._tasks.clear()

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake at once when the set is stopping."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stopping.wait()

    async def _supervise(self, scanner: Scanner) -> None:
        while not self._stopping.is_set():
            try:
                await self._loop(scanner)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception(
                    "scanner %s crashed; restarting in %.0fs", scanner.name, CRASH_RESTART_S
                )
                await self._pause(CRASH_RESTART_S)

    async def _supervise_cycle(self, job: Any) -> None:
        while not self._stopping.is_set():
            started, ok = time.monotonic(), False
            try:
                await job.run_cycle()
                ok = True
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s cycle failed", getattr(job, "name", "index reconciler"))
            elapsed_ms = (time.monotonic() - started) * 1000
            self.on_cycle(
                getattr(job, "name", "index_reconciler"), job.interval_ms, elapsed_ms / 1000, ok
            )
            await self._pause(max(job.interval_ms - elapsed_ms, 0) / 1000)

    async def _loop(self, scanner: Scanner) -> None:
        while not self._stopping.is_set():
            started, ok = time.monotonic(), False
            try:
                await self.run_cycle(scanner)
                ok = True
            except FlowFabricError as exc:  # Valkey down: retry next tick
                log.warning("scanner %s cycle failed: %s", scanner.name, exc)
            elapsed_ms = (time.monotonic() - started) * 1000
            self.on_cycle(scanner.name, scanner.interval_ms, elapsed_ms / 1000, ok)
            await self._pause(max(scanner.interval_ms - elapsed_ms, 0) / 1000)

    async def lanes_by_partition(self, partitions: Sequence[int]) -> dict[int, list[str]]:
        """Each partition's lane registry (`ff:idx:{p}:lanes`) unioned with FF_LANES."""
        pipe = self.store.pipeline()
        for p in partitions:
            pipe.smembers(PartitionKeys.of(p).lanes)
        rows = await self.store.run_pipeline(pipe)
        out = {}
        for p, members in zip(partitions, rows, strict=True):
            lanes = set(self.configured_lanes) | {text(m) for m in members}
            out[p] = sorted(lanes)
        return out

    async def _read(
        self, scanner: Scanner, keys: list[tuple[str, str | None]], now: int
    ) -> list[Any]:
        """Each key's members for this cycle: the due ones, or (paged) the next page."""
        upper: int | str = "+inf" if scanner.whole_index else now - scanner.age_ms
        pipe = self.store.pipeline()
        for key, _lane in keys:
            if scanner.paged:
                off = scanner._offsets.get(key, 0)
                pipe.zrange(key, off, off + scanner.batch - 1)
            else:
                pipe.zrangebyscore(key, "-inf", upper, start=0, num=scanner.batch)
        rows: list[Any] = await self.store.run_pipeline(pipe)
        if scanner.paged:
            for (key, _lane), members in zip(keys, rows, strict=True):
                full = len(members) == scanner.batch
                scanner._offsets[key] = scanner._offsets.get(key, 0) + scanner.batch if full else 0
        return rows

    async def run_cycle(self, scanner: Scanner) -> int:
        """One pass over every partition; returns how many members were acted on.

        First one `ff_probe_due` per node answers which partitions (and lanes) hold work; only
        those are read and acted on (docs/architecture.md#scanners). Where the probe cannot
        answer (a node mid-resharding, a scanner whose index is not a plain partition or lane
        set) the partitions are read directly, as before."""
        scanner.cycles += 1
        acted = 0
        now = await server_time_ms(self.store)
        keys, unprobed = await self._probe(scanner, now)
        scanner.last_progress = time.monotonic()
        for start in range(0, len(keys), PARTITIONS_PER_ROUND * 4):
            acted += await self._act(scanner, keys[start : start + PARTITIONS_PER_ROUND * 4], now)
        for start in range(0, len(unprobed), PARTITIONS_PER_ROUND):
            batch = unprobed[start : start + PARTITIONS_PER_ROUND]
            acted += await self._act(scanner, await self._partition_keys(scanner, batch), now)
        return acted

    async def _partition_keys(
        self, scanner: Scanner, batch: Sequence[int]
    ) -> list[tuple[str, str | None]]:
        """Every index key of `batch` for the scanner, with its action's third argument."""
        keys: list[tuple[str, str | None]] = []
        if scanner.per_lane:
            lanes = await self.lanes_by_partition(batch)
            for p in batch:
                keys += [(scanner.index(PartitionKeys.of(p), ln), ln) for ln in lanes[p]]
        else:
            keys = [
                (scanner.index(pk, None), pk.tag if scanner.by_partition else None)
                for pk in map(PartitionKeys.of, batch)
            ]
        return keys

    def _key_of(self, scanner: Scanner, partition: int, lane: str) -> tuple[str, str | None]:
        pk = PartitionKeys.of(partition)
        if scanner.per_lane:
            return scanner.index(pk, lane), lane
        return scanner.index(pk, None), pk.tag if scanner.by_partition else None

    async def _probe(
        self, scanner: Scanner, now: int
    ) -> tuple[list[tuple[str, str | None]], list[int]]:
        """(the index keys with work, the partitions the probe could not answer for)."""
        index = probe_index_of(scanner)
        if index is None:
            return [], list(range(self.partitions))
        hits, unprobed = await probe(
            self.store, range(self.partitions), index,
            test="any" if scanner.paged or scanner.whole_index else "due",
            upper=now - scanner.age_ms,
            lanes=self.configured_lanes if scanner.per_lane else None,
        )  # fmt: skip
        found = [self._key_of(scanner, p, lane) for p, lane in hits]
        if scanner.paged:  # an index without work starts again at rank 0 when it has some
            live = {key for key, _ in found}
            scanner._offsets = {k: v for k, v in scanner._offsets.items() if k in live}
        return found, unprobed

    async def _act(self, scanner: Scanner, keys: list[tuple[str, str | None]], now: int) -> int:
        """Read `keys` (one pipeline) and run the action on each member; counts progress."""
        acted = 0
        rows = await self._read(scanner, keys, now) if keys else []
        for (_key, lane), members in zip(keys, rows, strict=True):
            for raw in members:
                member = text(raw)
                if scanner._skipped(member):
                    continue
                acted += 1
                try:
                    await scanner.action(member, now, lane)
                except FlowFabricError as exc:
                    if exc.code in ("backend_unavailable", "backend_timeout"):
                        raise
                    scanner._record(member, ok=False)
                    log.debug("%s: %s -> %s", scanner.name, member, exc.code)
                else:
                    scanner._record(member, ok=True)
                scanner.last_progress = time.monotonic()
        scanner.last_progress = time.monotonic()
        return acted


def probe_index_of(scanner: Scanner) -> str | None:
    """What `ff_probe_due` probes for the scanner: the lane set (`delayed`, `blocked:route`, ...)
    of a per-lane scanner, or the index name (`lease_expiry`, ...) of a per-partition one; None
    when its index is neither `PartitionKeys.lane(lane, <set>)` nor `ff:idx:{p}:<name>` (the
    probe then does not serve it, and the cycle reads every partition directly)."""
    samples = [(PartitionKeys.of(p), lane) for p, lane in ((0, "a"), (1, "b:c"))]
    first, lane = samples[0]
    if scanner.per_lane:
        which = scanner.index(first, lane).removeprefix(first.lane(lane, ""))
        ok = all(scanner.index(pk, ln) == pk.lane(ln, which) for pk, ln in samples)
    else:
        which = scanner.index(first, None).removeprefix(first.index(""))
        ok = all(scanner.index(pk, None) == pk.index(which) for pk, _ in samples)
    return which if ok and which else None
