"""Flow background work (docs/flows.md#scanners): the member-cancel dispatcher and the three
flow scanners, run by the lifecycle `ScannerSet`.

| scanner | index (member → score), batch | function |
|---|---|---|
| dependency_reconciler | `deps_pending` (upstream eid → time left), 50 | `ff_resolve_outgoing` |
| dependency_reconciler_blocked | `blocked:dependencies`, paged, 100 | `ff_reconcile_dependencies` |
| cancel_reconciler | `cancel_backlog` (flow id → due time), 50 | `ff_cancel_flow_members` |
| flow_projector | `flow_index` (SSCAN) | `ff_project_flow` |

Resolution happens inside the call that ends an upstream; what such a call leaves past its
per-call bound it announces, and `FollowUpResolver` finishes it at once. The dependency
reconciler is the backstop: it finishes what a follow-up did not, resolves edges a lost call never
resolved, and releases members created blocked that never got an edge (after two of its
intervals, so a builder adding edges is not overtaken). Several replicas may run every scanner:
each function re-validates inside its atomic call, so a member handled twice is a no-op the
second time, and the blocked pager's cursor is per process (a replica only repeats work).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from flowfabric.server.config import Config
from flowfabric.server.engine.aio import TaskSet
from flowfabric.server.engine.probe import partitions_with_work
from flowfabric.server.engine.scanners import Scanner
from flowfabric.server.valkey.codec import text
from flowfabric.server.valkey.errors import FlowFabricError
from flowfabric.server.valkey.functions import Functions
from flowfabric.server.valkey.functions.flow import (
    CANCEL_BATCH,
    CancelFailed,
    Outgoing,
    Projected,
    Reconciled,
)
from flowfabric.server.valkey.ids import ExecutionId, parse_execution_id
from flowfabric.server.valkey.keys import FlowKeys, PartitionKeys
from flowfabric.server.valkey.store import Store

log = logging.getLogger("flowfabric.scanners")
T = TypeVar("T")

DEPENDENCY_RECONCILER_BATCH = 50
BLOCKED_PAGE = 100
CANCEL_RECONCILER_BATCH = 50
# Members one cancel-reconciler visit takes from a flow's backlog.
CANCEL_MEMBERS_PER_VISIT = 500
# A member whose cancel raised this many times is dropped from the backlog, logged (bounded
# retries: docs/flows.md#cancelling-a-flow).
CANCEL_MAX_ATTEMPTS = 3
TRANSPORT = frozenset({"backend_unavailable", "backend_timeout"})
# Back-off between tries of a call that met a transport fault.
TRANSPORT_BACKOFF_S = (0.1, 0.5)
PROJECTOR_SCAN = 100


def cancel_grace_ms(config: Config) -> int:
    """How long the cancel reconciler leaves a fresh backlog to the server dispatching it."""
    return 2 * config.interval_ms("FF_CANCEL_RECONCILER_INTERVAL_S")


async def _retrying(step: Callable[[], Awaitable[T]]) -> T:
    """`step()`, tried again after a transport fault (100 ms, then 500 ms)."""
    for pause in TRANSPORT_BACKOFF_S:
        try:
            return await step()
        except FlowFabricError as exc:
            if exc.code not in TRANSPORT:
                raise
        await asyncio.sleep(pause)
    return await step()


class FlowCanceller:
    """Cancels the members a flow owes a cancel (its `pending_cancels`), in batches of one
    function call each; a batch that raises is retried member by member, and a member that
    keeps failing is counted and, past CANCEL_MAX_ATTEMPTS, dropped with a log line.

    Used inline by CancelFlow with `wait`, in the background by CancelFlow without it, and by
    the cancel reconciler. The backlog is durable, so a server dying mid-drain loses nothing.
    """

    def __init__(self, store: Store, fn: Functions) -> None:
        self.store, self.fn = store, fn
        self._tasks: set[asyncio.Task[None]] = set()

    async def owed(self, tag: str, fid: str, limit: int | None = None) -> list[str]:
        key = FlowKeys(tag, fid).pending_cancels
        if limit is None:
            raw = await self.store.call("SMEMBERS", key)
        else:
            raw = await self.store.call("SRANDMEMBER", key, limit)
        return sorted(text(m) for m in raw or ())

    async def drain(self, tag: str, fid: str, ids: Sequence[str]) -> list[str]:
        """Cancel `ids` (members owed a cancel); returns those whose cancel failed."""
        failed: list[str] = []
        for start in range(0, len(ids), CANCEL_BATCH):
            chunk = list(ids[start : start + CANCEL_BATCH])
            try:
                await _retrying(self._batch(tag, fid, chunk))
            except FlowFabricError as exc:
                if exc.code in TRANSPORT:
                    raise
                for member in chunk:
                    if not await self._one(tag, fid, member):
                        failed.append(member)
        return failed

    def _batch(self, tag: str, fid: str, ids: list[str]) -> Callable[[], Awaitable[object]]:
        return lambda: self.fn.flow.cancel_flow_members(tag, fid, ids)

    async def _one(self, tag: str, fid: str, member: str) -> bool:
        try:
            await _retrying(self._batch(tag, fid, [member]))
            return True
        except FlowFabricError as exc:
            if exc.code in TRANSPORT:
                raise
            reply = await self.fn.flow.cancel_member_failed(tag, fid, member, CANCEL_MAX_ATTEMPTS)
            if isinstance(reply, CancelFailed) and reply.outcome == "gave_up":
                log.error(
                    "cancel of %s (flow %s) failed %d times (%s); dropped from the backlog",
                    member, fid, reply.attempts, exc.code,
                )  # fmt: skip
            else:
                log.warning("cancel of %s (flow %s) failed: %s", member, fid, exc.code)
            return False

    def schedule(self, tag: str, fid: str) -> None:
        """Drain the flow's backlog in the background."""
        task = asyncio.create_task(self._background(tag, fid), name=f"flow-cancel-{fid}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _background(self, tag: str, fid: str) -> None:
        try:
            await self.drain(tag, fid, await self.owed(tag, fid))
        except FlowFabricError as exc:  # the backlog covers it: the reconciler retries
            log.warning("background cancel of flow %s stopped: %s", fid, exc.code)

    async def stop(self, grace: float = 15.0) -> None:
        """Give background drains `grace` seconds, then abort them (the backlog keeps the rest)."""
        if not self._tasks:
            return
        _done, pending = await asyncio.wait(list(self._tasks), timeout=grace)
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError):
                await task


class FollowUpResolver:
    """Finishes, at once, the outgoing edges a terminal call left past its per-call bound
    (docs/flows.md#wide-fan-out). The call announces the upstream on `ff:ready:{p}`; this
    resolves it again, call after call, until nothing of it is pending. Every server hears the
    announcement, and each call re-validates, so a second resolver only finds less to do. The
    dependency reconciler stays the backstop: the upstream is on `deps_pending` until done."""

    #: Follow-up calls for one upstream, one announcement.
    MAX_CALLS = 64
    #: Upstreams resolved at once by one server.
    CONCURRENCY = 4

    def __init__(self, fn: Functions, partitions: int) -> None:
        self.fn, self.partitions = fn, partitions
        self._active: set[str] = set()
        self._tasks = TaskSet(self.CONCURRENCY)

    def schedule(self, partition: int, member: str) -> None:
        if member in self._active:
            return  # the running follow-up calls until nothing is pending
        try:
            eid = parse_execution_id(member, self.partitions)
        except FlowFabricError:
            return
        self._active.add(member)
        self._tasks.spawn(lambda: self._resolve(member, eid), f"deps-follow-up-{member}")

    async def _resolve(self, member: str, eid: ExecutionId) -> None:
        total = Outgoing(0, 0, 0, 0)
        try:
            for _ in range(self.MAX_CALLS):
                reply = await _retrying(lambda: self.fn.flow.resolve_outgoing(eid))
                if not isinstance(reply, Outgoing):
                    break
                total = Outgoing(
                    total.resolved + reply.resolved, total.released + reply.released,
                    total.skipped + reply.skipped, reply.pending,
                )  # fmt: skip
                if not reply.pending or not reply.resolved:
                    break
        except FlowFabricError as exc:  # deps_pending keeps it: the reconciler retries
            log.warning("follow-up resolution of %s stopped: %s", member, exc.code)
        finally:
            self._active.discard(member)
        if total.resolved:
            log.info(
                "dependency resolution of %s went past the per-call bound; a follow-up resolved "
                "%d more edge(s) (%d released, %d skipped, %d upstream(s) still pending)",
                member, total.resolved, total.released, total.skipped, total.pending,
            )  # fmt: skip

    async def stop(self) -> None:
        await self._tasks.stop()


class BlockedPager:
    """The dependency reconciler over `blocked:dependencies` (W10 of the reference: it re-read
    the first 50 each pass, starving the rest): each pass takes the next page of each lane's
    index, wrapping at its end."""

    def __init__(self, fn: Functions, partitions: int, min_age_ms: int, wake: Callable[[], None]):
        self.fn, self.partitions, self.min_age_ms, self.wake = fn, partitions, min_age_ms, wake

    async def action(self, member: str, now: int, lane: str | None) -> None:
        eid = parse_execution_id(member, self.partitions)
        reply = await self.fn.flow.reconcile_dependencies(eid, self.min_age_ms)
        if isinstance(reply, Reconciled) and (reply.resolved or reply.effect):
            log.info(
                "dependency reconciler: %s resolved %d edge(s) late; %s",
                member, reply.resolved, reply.effect or "still waiting",
            )  # fmt: skip
            if reply.effect == "released":
                self.wake()


class FlowProjector:
    """Visits every flow of `flow_index` (SSCAN) and has `ff_project_flow` recount its members
    and repair the flow's counters (a backstop: the counters are kept by the members' own
    transitions; the projector never judges from a sample)."""

    def __init__(self, store: Store, fn: Functions, partitions: int, interval_ms: int) -> None:
        self.store, self.fn, self.partitions, self.interval_ms = store, fn, partitions, interval_ms
        self.name = "flow_projector"

    async def run_cycle(self) -> int:
        repaired = 0
        # only the partitions that hold flows (one ff_probe_due per node: engine/probe.py)
        index = PartitionKeys.of(0).flow_index.removeprefix(PartitionKeys.of(0).index(""))
        for part in await partitions_with_work(
            self.store, range(self.partitions), index, test="any"
        ):
            pk = PartitionKeys.of(part)
            cursor = 0
            while True:
                cursor, members = await self.store.call(
                    "SSCAN", pk.flow_index, cursor, "COUNT", PROJECTOR_SCAN
                )
                for raw in members:
                    try:
                        reply = await self.fn.flow.project_flow(pk.tag, text(raw))
                    except FlowFabricError as exc:
                        if exc.code in TRANSPORT:
                            raise
                        log.debug("project %s: %s", text(raw), exc.code)
                        continue
                    if isinstance(reply, Projected) and reply.repaired:
                        repaired += 1
                        log.warning("flow projector repaired the counters of flow %s", text(raw))
                cursor = int(cursor)
                if cursor == 0:
                    break
        return repaired


def flow_scanners(
    config: Config,
    fn: Functions,
    canceller: FlowCanceller | None = None,
    on_eligible: Callable[[], None] | None = None,
) -> list[Scanner]:
    parts = config.flow_partitions
    interval = config.interval_ms("FF_DEPENDENCY_RECONCILER_INTERVAL_S")

    def wake() -> None:
        if on_eligible is not None:
            on_eligible()

    async def resolve(member: str, now: int, lane: str | None) -> None:
        reply = await fn.flow.resolve_outgoing(parse_execution_id(member, parts))
        if isinstance(reply, Outgoing) and reply.resolved:
            log.info(
                "dependency reconciler: %s had edges left past the per-call bound; resolved %d "
                "more (%d released, %d skipped, %d still pending)",
                member, reply.resolved, reply.released, reply.skipped, reply.pending,
            )  # fmt: skip
            if reply.released:
                wake()

    blocked = BlockedPager(fn, parts, 2 * interval, wake)
    scanners = [
        Scanner(
            "dependency_reconciler", interval, lambda p, _: p.deps_pending, resolve,
            batch=DEPENDENCY_RECONCILER_BATCH,
        ),
        Scanner(
            "dependency_reconciler_blocked", interval,
            lambda p, lane: p.lane(lane or "", "blocked:dependencies"), blocked.action,
            per_lane=True, batch=BLOCKED_PAGE, paged=True,
        ),
    ]  # fmt: skip
    if canceller is not None:

        async def cancel(member: str, now: int, tag: str | None) -> None:
            assert tag is not None
            ids = await canceller.owed(tag, member, CANCEL_MEMBERS_PER_VISIT)
            if not ids:
                # nothing owed: the function drops the flow from the backlog
                await fn.flow.cancel_flow_members(tag, member, [""])
                return
            failed = await canceller.drain(tag, member, ids)
            log.info(
                "cancel reconciler: flow %s: %d member cancel(s) run, %d failed",
                member, len(ids) - len(failed), len(failed),
            )  # fmt: skip

        scanners.append(
            Scanner(
                "cancel_reconciler", config.interval_ms("FF_CANCEL_RECONCILER_INTERVAL_S"),
                lambda p, _: p.cancel_backlog, cancel, batch=CANCEL_RECONCILER_BATCH,
                by_partition=True,
            )
        )  # fmt: skip
    return scanners
