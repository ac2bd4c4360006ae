"""Bulk cancel / replay by filter as durable server-side jobs (docs/lanes.md#bulk-actions).

A job is a hash `ff:bulk:<id>` (filter, action, state, counts, cursor) plus the running set
`ff:idx:bulk:running`. Every server runs `BulkRunner` as a whole-pass scanner job; a server
works on a job only while it holds the job's lease (`SET ff:bulk:<id>:lease NX PX`), renewed
after every page, so one server processes a job at a time and another takes over once a dead
holder's lease runs out.

The matches are enumerated from the lane index sets (`ff:idx:{p}:lane:<lane>:<set>`) of the
partitions whose registry names the lane, in a fixed order of (partition, lane, set), and
within a set by (score, member). Each item goes through the single cancel or replay Function,
so each stays atomic and fenced; the cursor (the last (source, score, member) seen) and the
counts are written after every page. An item acted on leaves the set the job reads (a
cancelled one moves to `terminal`, a replayed one out of it), so a page redone after a kill
finds nothing left to do, and redoing one anyway is a harmless refusal counted as skipped.
Only executions created before the job started match, and a `terminal` set is read up to the
job's start only, so work replayed by the job and finished again is never replayed twice.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from flowfabric.server.valkey import flow_reads, lane_reads
from flowfabric.server.valkey.codec import text
from flowfabric.server.valkey.errors import FlowFabricError, InvalidInput
from flowfabric.server.valkey.functions import Fence, Functions
from flowfabric.server.valkey.functions.execution import Replayed
from flowfabric.server.valkey.ids import parse_execution_id
from flowfabric.server.valkey.keys import (
    BULK_INDEX,
    BULK_RUNNING,
    BulkKeys,
    ExecKeys,
    PartitionKeys,
)
from flowfabric.server.valkey.store import Store, server_time_ms

__all__ = ["ACTIONS", "BulkFilter", "BulkJobs", "BulkRunner", "Job"]

log = logging.getLogger("flowfabric.bulk")
audit = logging.getLogger("audit")

ACTIONS = ("cancel", "replay")
CANCEL_STATES = ("waiting", "delayed", "rate_limited", "waiting_children", "active", "suspended")
REPLAY_STATES = ("completed", "failed", "cancelled", "expired", "skipped")
# the lane index sets a public state's executions sit in (docs/architecture.md#public-state)
STATE_SETS: dict[str, tuple[str, ...]] = {
    "waiting": ("eligible", "blocked:route", "blocked:operator"),
    "delayed": ("delayed",),
    "rate_limited": ("blocked:budget", "blocked:quota"),
    "waiting_children": ("blocked:dependencies",),
    "active": ("active",),
    "suspended": ("suspended",),
    **dict.fromkeys(REPLAY_STATES, ("terminal",)),
}
# an item the action no longer applies to: a harmless no-op, counted as skipped
SKIP_CODES = frozenset({"execution_not_found", "execution_not_active", "execution_not_terminal"})
REQUEST_TTL_S = 7 * 24 * 3600
RUNNER_INTERVAL_MS = 1000  # one SMEMBERS a second per idle server


@dataclass(frozen=True)
class BulkFilter:
    lane_id: str = ""
    states: tuple[str, ...] = ()
    execution_kind: str = ""
    tags: Mapping[str, str] = field(default_factory=dict)
    older_than_ms: int = 0

    def empty(self) -> bool:
        return not (
            self.lane_id or self.states or self.execution_kind or self.tags or self.older_than_ms
        )

    def to_json(self) -> str:
        row = asdict(self)
        row["states"], row["tags"] = list(self.states), dict(self.tags)
        return json.dumps(row, sort_keys=True)

    @classmethod
    def from_json(cls, raw: str) -> BulkFilter:
        row = json.loads(raw)
        return cls(
            row.get("lane_id", ""), tuple(row.get("states", ())), row.get("execution_kind", ""),
            dict(row.get("tags", {})), int(row.get("older_than_ms", 0)),
        )  # fmt: skip


def check(action: str, flt: BulkFilter) -> None:
    """INVALID_ARGUMENT for an empty filter or a state the action cannot apply to."""
    if action not in ACTIONS:
        raise InvalidInput("action", "action must be cancel or replay")
    if flt.empty():
        raise InvalidInput("filter", "an empty filter matches everything: name at least one field")
    allowed = CANCEL_STATES if action == "cancel" else REPLAY_STATES
    for state in flt.states:
        if state not in allowed:
            raise InvalidInput(
                "filter.states", f"{action} applies to {', '.join(allowed)}; not to {state}"
            )


@dataclass
class Job:
    bulk_id: str
    action: str
    filter: BulkFilter
    state: str = "running"
    total: int = 0
    done: int = 0
    skipped: int = 0
    failed: int = 0
    last_error: str = ""
    reason: str = ""
    created_at: int = 0
    updated_at: int = 0
    finished_at: int = 0
    cursor: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, str]:
        out = {k: str(v) for k, v in asdict(self).items() if k not in ("filter", "cursor")}
        out["filter"] = self.filter.to_json()
        out["cursor"] = json.dumps(self.cursor)
        return out

    @classmethod
    def from_row(cls, row: Mapping[str, str]) -> Job:
        ints = {k: int(row.get(k, "0") or 0) for k in (
            "total", "done", "skipped", "failed", "created_at", "updated_at", "finished_at",
        )}  # fmt: skip
        return cls(
            bulk_id=row["bulk_id"], action=row["action"],
            filter=BulkFilter.from_json(row["filter"]), state=row.get("state", "running"),
            last_error=row.get("last_error", ""), reason=row.get("reason", ""),
            cursor=json.loads(row.get("cursor") or "{}"), **ints,
        )  # fmt: skip


Source = tuple[int, str, str]  # (partition, lane, index set)


class BulkJobs:
    """Matching, counting and one page of work; shared by the servicer and the runner."""

    def __init__(self, store: Store, fn: Functions, partitions: int, page_size: int = 100) -> None:
        self.store, self.fn, self.partitions, self.page_size = store, fn, partitions, page_size

    # -- records ------------------------------------------------------------------------------

    async def read(self, bulk_id: str) -> Job | None:
        row = await self.store.call("HGETALL", BulkKeys(bulk_id).job)
        if not row:
            return None
        return Job.from_row({text(k): text(v) for k, v in row.items()})

    async def list_jobs(self, offset: int, count: int) -> tuple[list[Job], bool]:
        """Jobs newest first; (page, more after it)."""
        ids = await self.store.call("ZREVRANGE", BULK_INDEX, offset, offset + count)
        jobs = [j for i in ids[:count] if (j := await self.read(text(i))) is not None]
        return jobs, len(ids) > count

    async def start(
        self, action: str, flt: BulkFilter, reason: str, request_id: str
    ) -> tuple[Job, bool]:
        """A new running job with its total counted now; (job, duplicate) — the same
        `request_id` again answers the first job."""
        check(action, flt)
        existing = await self.store.call("GET", BulkKeys.request(request_id))
        if existing and (job := await self.read(text(existing))) is not None:
            return job, True
        now = await server_time_ms(self.store)
        job = Job(str(uuid.uuid4()), action, flt, reason=reason, created_at=now, updated_at=now)
        job.total = await self.count(job)
        ok = await self.store.call(
            "SET", BulkKeys.request(request_id), job.bulk_id, "NX", "EX", REQUEST_TTL_S
        )
        if not ok:  # a concurrent start with the same request id won
            winner = await self.store.call("GET", BulkKeys.request(request_id))
            first = await self.read(text(winner))
            if first is not None:
                return first, True
        await hset(self.store, BulkKeys(job.bulk_id).job, job.row())
        await self.store.call("ZADD", BULK_INDEX, now, job.bulk_id)
        await self.store.call("SADD", BULK_RUNNING, job.bulk_id)
        return job, False

    async def dry_run(self, action: str, flt: BulkFilter) -> int:
        check(action, flt)
        now = await server_time_ms(self.store)
        return await self.count(Job("", action, flt, created_at=now))

    async def cancel(self, bulk_id: str) -> Job | None:
        """Stop a running job after its current page (the runner re-reads the state)."""
        job = await self.read(bulk_id)
        if job is None or job.state != "running":
            return job
        now = await server_time_ms(self.store)
        await hset(self.store, BulkKeys(bulk_id).job, {
            "state": "cancelled", "finished_at": str(now), "updated_at": str(now),
        })  # fmt: skip
        await self.store.call("SREM", BULK_RUNNING, bulk_id)
        return await self.read(bulk_id)

    # -- matching -----------------------------------------------------------------------------

    def _sets(self, job: Job) -> tuple[str, ...]:
        states = job.filter.states or (CANCEL_STATES if job.action == "cancel" else REPLAY_STATES)
        wanted = {s for st in states for s in STATE_SETS[st]}
        return tuple(s for s in lane_reads.LANE_STATES if s in wanted)

    async def sources(self, job: Job) -> list[Source]:
        """Every (partition, lane, set) the job reads, in its fixed order."""
        by_part = await lane_reads.lanes_by_partition(self.store, range(self.partitions))
        sets = self._sets(job)
        out: list[Source] = []
        for p in sorted(by_part):
            lanes = by_part[p] & {job.filter.lane_id} if job.filter.lane_id else by_part[p]
            out += [(p, lane, s) for lane in sorted(lanes) for s in sorted(sets)]
        if not out:
            return out
        # one round trip drops the empty sets, so a page read is spent only where work is
        pipe = self.store.pipeline()
        for p, lane, s in out:
            pipe.zcard(PartitionKeys.of(p).lane(lane, s))
        sizes = await self.store.run_pipeline(pipe)
        return [src for src, n in zip(out, sizes, strict=True) if int(n)]

    async def _fetch(
        self, job: Job, src: Source, after: tuple[str, str] | None, n: int
    ) -> list[tuple[str, float]]:
        """Up to `n` members of `src` after (score, member), in (score, member) order."""
        key = PartitionKeys.of(src[0]).lane(src[1], src[2])
        top: str | int = job.created_at if src[2] == "terminal" else "+inf"
        out: list[tuple[str, float]] = []
        low = "-inf"
        if after is not None:
            score, member = after
            pipe = self.store.pipeline()
            pipe.zrangebyscore(key, score, score, withscores=True)
            (tied,) = await self.store.run_pipeline(pipe)
            out = [(text(m), float(s)) for m, s in tied if text(m) > member][:n]
            low = f"({score}"
        if len(out) < n:
            pipe = self.store.pipeline()
            pipe.zrangebyscore(key, low, top, start=0, num=n - len(out), withscores=True)
            (rows,) = await self.store.run_pipeline(pipe)
            out += [(text(m), float(s)) for m, s in rows]
        return out

    async def _matches(self, job: Job, members: Sequence[str]) -> list[str]:
        """The members that match the job's filter now (one pipeline of core reads)."""
        flt = job.filter
        states = set(flt.states or (CANCEL_STATES if job.action == "cancel" else REPLAY_STATES))
        pipe = self.store.pipeline()
        eids = []
        for raw in members:
            try:
                eid = parse_execution_id(raw, self.partitions)
            except FlowFabricError:
                continue
            eids.append(eid)
            pipe.hmget(ExecKeys(eid).core, ["public_state", "execution_kind", "created_at"])
            if flt.tags:
                pipe.hgetall(ExecKeys(eid).tags)
        if not eids:
            return []
        rows = await self.store.run_pipeline(pipe)
        width = 2 if flt.tags else 1
        cutoff = job.created_at - flt.older_than_ms
        out = []
        for i, eid in enumerate(eids):
            state, kind, created = (text(v) for v in rows[i * width])
            if state not in states or not created.isdigit() or int(created) > cutoff:
                continue
            if flt.execution_kind and kind != flt.execution_kind:
                continue
            if flt.tags:
                tags = {text(k): text(v) for k, v in rows[i * width + 1].items()}
                if any(tags.get(k) != v for k, v in flt.tags.items()):
                    continue
            out.append(str(eid))
        return out

    async def page(self, job: Job, sources: Sequence[Source]) -> tuple[list[str], bool]:
        """The next page's matches, advancing `job.cursor`; (matches, finished)."""
        cur = job.cursor
        if cur.get("finished"):  # a takeover after the last page, before the state was written
            return [], True
        at = tuple(cur["source"]) if cur.get("source") else None
        for src in sources:
            if at is not None and src < at:
                continue
            after = (cur["score"], cur["member"]) if at == src and cur.get("member") else None
            got = await self._fetch(job, src, after, self.page_size)
            if not got:
                at = None  # the next source from its start
                continue
            member, score = got[-1]
            job.cursor = {"source": list(src), "score": repr(score), "member": member}
            return await self._matches(job, [m for m, _ in got]), False
        job.cursor = {"source": None, "finished": True}
        return [], True

    async def count(self, job: Job) -> int:
        """How many executions match now (reads only)."""
        probe = Job("", job.action, job.filter, created_at=job.created_at)
        sources = await self.sources(probe)
        n = 0
        while True:
            matched, finished = await self.page(probe, sources)
            n += len(matched)
            if finished:
                return n

    # -- the action ---------------------------------------------------------------------------

    async def apply(self, job: Job, eid_text: str) -> str:
        """The action on one execution: "done", "skipped" or the refusal's code."""
        eid = parse_execution_id(eid_text, self.partitions)
        try:
            if job.action == "cancel":
                reason = f"bulk cancel {job.bulk_id}" + (f": {job.reason}" if job.reason else "")
                reply = await self.fn.execution.cancel_execution(
                    eid, reason, "operator_override", Fence()
                )
                return "skipped" if isinstance(reply, Replayed) else "done"
            inbound = await flow_reads.replay_inbound_edges(self.store, eid)
            await self.fn.execution.replay_execution(eid, inbound)
            return "done"
        except FlowFabricError as exc:
            return "skipped" if exc.code in SKIP_CODES else exc.code


class BulkRunner:
    """The whole-pass scanner job that works on running bulk jobs (`ScannerSet.cycles`)."""

    name = "bulk_actions"

    def __init__(
        self, jobs: BulkJobs, *, lease_ms: int = 5000, page_pause_ms: int = 0,
        interval_ms: int = RUNNER_INTERVAL_MS,
    ) -> None:  # fmt: skip
        self.jobs, self.store = jobs, jobs.store
        self.lease_ms, self.page_pause_ms, self.interval_ms = lease_ms, page_pause_ms, interval_ms
        self.owner = uuid.uuid4().hex
        self.on_created: Any = None  # the scheduler's local wake after a replay

    async def run_cycle(self) -> int:
        n = 0
        for raw in sorted(await self.store.call("SMEMBERS", BULK_RUNNING)):
            bulk_id = text(raw)
            lease = BulkKeys(bulk_id).lease
            if not await self.store.call("SET", lease, self.owner, "NX", "PX", self.lease_ms):
                continue  # another server holds it
            try:
                n += await self._run(bulk_id)
            finally:
                if text(await self.store.call("GET", lease)) == self.owner:
                    await self.store.call("DEL", lease)
        return n

    async def _holds(self, bulk_id: str) -> bool:
        lease = BulkKeys(bulk_id).lease
        if text(await self.store.call("GET", lease)) != self.owner:
            return False
        await self.store.call("PEXPIRE", lease, self.lease_ms)
        return True

    async def _run(self, bulk_id: str) -> int:
        job = await self.jobs.read(bulk_id)
        if job is None or job.state != "running":
            await self.store.call("SREM", BULK_RUNNING, bulk_id)
            return 0
        if job.cursor:
            log.info("bulk %s: resuming at %s", bulk_id, job.cursor)
        sources = await self.jobs.sources(job)
        acted = 0
        while True:
            matched, finished = await self.jobs.page(job, sources)
            for eid in matched:
                outcome = await self.jobs.apply(job, eid)
                if outcome in ("done", "skipped"):
                    setattr(job, outcome, getattr(job, outcome) + 1)
                else:
                    job.failed += 1
                    job.last_error = outcome
            acted += len(matched)
            if matched and job.action == "replay" and self.on_created is not None:
                self.on_created()
            now = await server_time_ms(self.store)
            state = text(await self.store.call("HGET", BulkKeys(bulk_id).job, "state"))
            if not await self._holds(bulk_id):
                return acted  # another server took over: its progress is the record
            if state != "running":  # cancelled meanwhile: this page's counts still recorded
                await self._save(job, now)
                await self.store.call("SREM", BULK_RUNNING, bulk_id)
                return acted
            if finished:
                job.state, job.finished_at = "completed", now
                await self._save(job, now)
                await self.store.call("SREM", BULK_RUNNING, bulk_id)
                audit.info(
                    "bulk_action_finished bulk_action_id=%s action=%s done=%d skipped=%d "
                    "failed=%d outcome=completed", bulk_id, job.action, job.done, job.skipped,
                    job.failed,
                )  # fmt: skip
                return acted
            await self._save(job, now)
            if self.page_pause_ms:
                await asyncio.sleep(self.page_pause_ms / 1000)

    async def _save(self, job: Job, now: int) -> None:
        row = {
            "done": str(job.done), "skipped": str(job.skipped), "failed": str(job.failed),
            "last_error": job.last_error, "cursor": json.dumps(job.cursor),
            "updated_at": str(now),
        }  # fmt: skip
        if job.state != "running":
            row |= {"state": job.state, "finished_at": str(job.finished_at)}
        await hset(self.store, BulkKeys(job.bulk_id).job, row)


async def hset(store: Store, key: str, row: Mapping[str, str]) -> None:
    await store.call("HSET", key, *(x for kv in row.items() for x in kv))
