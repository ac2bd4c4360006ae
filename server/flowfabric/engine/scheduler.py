"""The claim cycle (docs/lifecycle.md#the-claim-cycle): find work for a worker and lease it.

Per lane (lanes tried in rotating order): the lane's own partitions first (one, or a spread over
the primaries of a cluster, in an order that rotates per call: `engine/lane_partitions.py`,
docs/lifecycle.md#lanes-across-a-cluster), then a window of up to 32 partitions starting at
the worker's FNV-1a offset plus a process-wide cursor that advances every 250 ms, so every
partition is visited and workers spread out. A partition is claimed from
with one `ff_claim_batch` call: it leases up to the wanted number of eligible heads (the checks
and writes of a claim grant plus a claim, or a resumed claim for an interrupted attempt) and
returns what the worker needs (payload, tags, ...), plus the heads whose required capabilities
the worker lacks. The window is probed in one pipeline and only partitions with eligible work
get a claim call.

Admission (`engine/admission.py`) is an ordered list of checks. With only in-slot checks (the
capability route) the batch claim is used and the checks decide what happens to the heads it
reported (a capability mismatch is blocked into `blocked:route`). The batch claim leases only
heads without budgets or a quota; it reports the others (`needs_admission`), and each of those
is asked every check, including the cross-slot budget and quota checks
(`engine/budget_admission.py`, `engine/quota_admission.py`), and claimed alone when admitted
(grant, then claim), releasing the checks' reservations when a claim fails. With a cross-slot
check registered that concerns every head, each partition's eligible heads are read first and
all of them take that path.

When the probed partitions have nothing eligible (and every 16th call), expired or revoked
leases in them are reclaimed (`engine/reclaim.py`), so a crashed worker's execution is handed
to another worker. ClaimForWorker / ClaimFromGrant keep the two-step path (`ff_issue_claim_grant`
then `ff_claim_execution` or `ff_claim_resumed_execution`); a head with budgets or a quota passes
the admission checks before its grant.

Before the window, the partitions where flow work of the lane was announced are claimed from,
after the solo partition or, every other pass, before it (`engine/ready.py`: the functions
publish where a flow member became eligible, and every server listens).

`claim_next` long-polls: it waits for a `waiting` watch event on the lanes' own partitions, a
ready announcement for one of its lanes, or an in-process wake from a create in this server,
and re-scans, with a 1 s backstop for work that appears where nothing announces it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from flowfabric.server.engine.admission import (
    ADMIT,
    CAPABLE_WORKER_DETAIL,
    ROUTE_REASON,
    Admission,
    Block,
    Candidate,
)
from flowfabric.server.engine.budget_admission import claim_pass
from flowfabric.server.engine.claims import (
    NO_MATCH,
    Budget,
    Claimed,
    ClaimRequest,
    claimed_from_reply,
    claimed_from_row,
)
from flowfabric.server.engine.events import EventHub
from flowfabric.server.engine.lane_partitions import LanePartitions
from flowfabric.server.engine.lanes import LaneControls
from flowfabric.server.engine.probe import lane_index, partitions_with_work
from flowfabric.server.engine.ready import ReadyHints
from flowfabric.server.engine.reclaim import Reclaimer
from flowfabric.server.valkey.codec import hash_to_dict, text
from flowfabric.server.valkey.errors import FlowFabricError
from flowfabric.server.valkey.functions import Claimer, Functions
from flowfabric.server.valkey.functions.lease import Granted
from flowfabric.server.valkey.ids import ExecutionId, parse_execution_id
from flowfabric.server.valkey.keys import ExecKeys, PartitionKeys
from flowfabric.server.valkey.store import Store

__all__ = ["CAPABLE_WORKER_DETAIL", "ClaimRequest", "Claimed", "Scheduler", "worker_offset"]

log = logging.getLogger("flowfabric.scheduler")

FNV_BASIS = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
MAX_PARTITIONS_PER_SCAN = 32
ROTATION_WINDOW_MS = 250
WAIT_BACKSTOP_S = 1.0
RECLAIM_EVERY = 16
SCAN_SLACK = 16  # heads a batch claim may examine beyond the ones it wants
ADMISSION_PASSES = 4  # claim_batch passes of one partition while admission blocks every head
CANDIDATE_FIELDS = (
    "required_capabilities", "budget_ids", "quota_policy_id", "concurrency_key",
    "current_lease_epoch",
)  # fmt: skip


def worker_offset(worker_instance_id: str, partitions: int) -> int:
    """Low 16 bits of FNV-1a-64(worker_instance_id), mod P."""
    h = FNV_BASIS
    for b in worker_instance_id.encode():
        h = ((h ^ b) * FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    return (h & 0xFFFF) % partitions


class Scheduler:
    def __init__(
        self,
        functions: Functions,
        store: Store,
        partitions: int,
        hub: EventHub | None,
        hints: ReadyHints | None = None,
        tenant_weights: Mapping[str, int] | None = None,
        lane_parts: LanePartitions | None = None,
    ) -> None:
        self.functions = functions
        # each lane's own partitions (docs/lifecycle.md#lanes-across-a-cluster)
        self.lane_parts = lane_parts if lane_parts is not None else LanePartitions(partitions)
        # namespace weights within a lane, as ff_claim_batch takes them
        # (docs/lifecycle.md#tenant-fairness); "" = equal shares
        self.tenant_weights = (
            json.dumps(dict(sorted(tenant_weights.items()))) if tenant_weights else ""
        )
        self.store = store
        self.partitions = partitions
        self.hub = hub
        self._cursor = 0
        self._window = 0
        self._lane_rotation = itertools.count()
        # waiting claims: their wake event -> their lanes (None: woken by anything)
        self._local_wake: dict[asyncio.Event, frozenset[str] | None] = {}
        self.hints = hints if hints is not None else ReadyHints(None, partitions)
        self.hints.on_ready(self._wake_lane)
        self.admission = Admission(functions)
        # paused lanes hand out nothing (engine/lanes.py, docs/lanes.md)
        self.lane_controls = LaneControls(store)
        self.lane_controls.on_resume(self._wake_lane)
        self.reclaimer = Reclaimer(functions, store, partitions)
        self._lane_calls = 0
        self.closing = asyncio.Event()
        # ids of heads a claim pass of this process is admitting: other passes leave them
        self._admitting: set[str] = set()

    # -- partition choice ---------------------------------------------------------------------

    def probe_order(self, lane: str, worker_instance_id: str) -> list[int]:
        """The lane's own partitions (rotated one further per call), then the window."""
        window = int(time.monotonic() * 1000) // ROTATION_WINDOW_MS
        if window != self._window:
            self._window = window
            self._cursor = (self._cursor + MAX_PARTITIONS_PER_SCAN) % self.partitions
        start = (
            worker_offset(worker_instance_id, self.partitions) + self._cursor
        ) % self.partitions
        count = min(MAX_PARTITIONS_PER_SCAN, self.partitions)
        own = self.lane_parts.rotated(lane)
        window_parts = [(start + i) % self.partitions for i in range(count)]
        return [*own, *(p for p in window_parts if p not in own)]

    # -- one pass -----------------------------------------------------------------------------

    async def claim(self, req: ClaimRequest) -> list[Claimed]:
        """One pass over the worker's lanes; at most `max_tasks` claims, costing at most
        `max_reply_bytes` (docs/lifecycle.md#claim-reply-size)."""
        out: list[Claimed] = []
        budget = Budget(req.max_reply_bytes)
        lanes = await self.lane_controls.claimable(req.lanes)
        if not lanes:
            return out
        shift = next(self._lane_rotation) % len(lanes)
        with claim_pass():  # budget verdicts are read once per claim call
            for lane in lanes[shift:] + lanes[:shift]:
                want = req.max_tasks - len(out)
                if want <= 0 or budget.spent:
                    break
                out += await self._claim_lane(req, lane, want, budget)
        if budget.failure is not None:
            if not out:
                raise budget.failure
            log.warning(
                "an admission check failed (%s); handing over the %d task(s) already leased",
                budget.failure.code, len(out),
            )  # fmt: skip
        return out

    async def _claim_lane(
        self, req: ClaimRequest, lane: str, want: int, budget: Budget
    ) -> list[Claimed]:
        parts = self.probe_order(lane, req.worker_instance_id)
        who = Claimer(req.worker_id, req.worker_instance_id, lane, req.capabilities_csv)
        self._lane_calls += 1
        out: list[Claimed] = []
        # Every batch claim reclaims the due leases of its partition first. The window's
        # partitions are only claimed from when the solo partition falls short, so every
        # RECLAIM_EVERY-th call looks for due leases there first: a backlog on the solo
        # partition cannot starve them (docs/lifecycle.md#lease-expiry-and-reclaim).
        if self._lane_calls % RECLAIM_EVERY == 0:
            out += await self._claim_due(parts[1:], who, req, want, budget)
        # The lane's first own partition of this call, alone and without a probe: when it
        # fills the request (the common case for solo work) the window (which starts with the
        # lane's other own partitions) is never looked at. Where flow
        # work was announced, every other call tries the announced partitions first instead,
        # so a lane whose solo partition is empty does not pay a claim there on every pass,
        # and solo work still gets every other pass.
        if self._lane_calls % 2 and self.hints.of_lane(lane):
            out += await self._claim_hinted(None, who, req, want - len(out), budget)
            out += await self._claim_partition(parts[0], who, req, want - len(out), budget)
        else:
            out += await self._claim_partition(parts[0], who, req, want - len(out), budget)
            if len(out) < want:
                out += await self._claim_hinted(parts[0], who, req, want - len(out), budget)
        if len(out) < want:
            out += await self._claim_window(parts[1:], who, req, want - len(out), budget)
        if not out:  # nothing eligible anywhere: due leases on partitions without eligible work
            out += await self._claim_due(parts[1:], who, req, want, budget)
        return out

    async def _claim_due(
        self, parts: Sequence[int], who: Claimer, req: ClaimRequest, want: int, budget: Budget
    ) -> list[Claimed]:
        """Claim from the partitions of `parts` that hold due leases of the lane."""
        if self.admission.cross_slot:
            return await self.reclaimer.reclaim(parts, who, req, want, budget)
        out: list[Claimed] = []
        for p in await self.reclaimer.due_partitions(parts, who.lane_id):
            if len(out) >= want or budget.spent:
                break
            out += await self._claim_partition(p, who, req, want - len(out), budget)
        return out

    async def _claim_hinted(
        self, solo: int | None, who: Claimer, req: ClaimRequest, want: int, budget: Budget
    ) -> list[Claimed]:
        """Claim from the partitions where flow work of the lane was announced
        (`engine/ready.py`), dropping each hint whose claim comes back short. `solo`: the
        lane's own partition of this call when it was just claimed from."""
        out: list[Claimed] = []
        for p, seq in self.hints.of_lane(who.lane_id):
            if len(out) >= want or budget.spent:
                break
            if p == solo:
                # just claimed from, and came back short; a release there after that claim
                # also wakes the waiter through the partition's state events
                self.hints.drained(who.lane_id, p, seq)
                continue
            asked = want - len(out)
            got = await self._claim_partition(p, who, req, asked, budget)
            out += got
            if len(got) < asked and not budget.spent:
                self.hints.drained(who.lane_id, p, seq)
        return out

    async def _claim_window(
        self, parts: Sequence[int], who: Claimer, req: ClaimRequest, want: int, budget: Budget
    ) -> list[Claimed]:
        """Probe `parts` (one `ff_probe_due` per node: engine/probe.py); claim from those with
        eligible heads, in order."""
        if not parts or want <= 0 or budget.spent:
            return []
        index = lane_index(who.lane_id, "eligible")
        out: list[Claimed] = []
        for p in await partitions_with_work(self.store, parts, index, test="any"):
            if len(out) >= want or budget.spent:
                break
            out += await self._claim_partition(p, who, req, want - len(out), budget)
        return out

    async def _claim_partition(
        self, partition: int, who: Claimer, req: ClaimRequest, want: int, budget: Budget
    ) -> list[Claimed]:
        """Lease up to `want` of the lane's due leases and eligible heads on `partition`."""
        if want <= 0 or budget.spent:
            return []
        if self.admission.cross_slot:
            return await self._claim_admitted(partition, who, req, want, budget)
        out: list[Claimed] = []
        for _ in range(ADMISSION_PASSES):
            blocked = budget.blocked
            out += await self._claim_batch_pass(partition, who, req, want - len(out), budget)
            # a pass whose heads were all blocked by admission leaves the heads behind them
            # unseen: look again, so a claim comes back empty only when nothing is claimable
            if out or budget.blocked == blocked or budget.failure is not None or budget.spent:
                break
        return out

    async def _claim_batch_pass(
        self, partition: int, who: Claimer, req: ClaimRequest, want: int, budget: Budget
    ) -> list[Claimed]:
        ids = [(str(uuid.uuid4()), str(uuid.uuid4())) for _ in range(want)]
        reply = await self.functions.scheduling.claim_batch(
            partition,
            who,
            req.lease_ttl_ms,
            ids,
            want + SCAN_SLACK,
            budget.cap,
            self.tenant_weights,
        )
        budget.spend(reply.reply_bytes)
        out = [claimed_from_row(row, who.lane_id, self.partitions) for row in reply.claimed]
        if reply.needs_admission and budget.failure is None:
            try:
                out += await self._admit_reported(
                    reply.needs_admission, who, req, want - len(out), budget
                )
            except FlowFabricError as exc:
                # fail closed for the head whose state cannot be trusted, not for the rows
                # already leased: they are handed over (see Budget.failure)
                budget.failure = exc
        for raw in reply.mismatched:
            try:
                eid = parse_execution_id(raw, self.partitions)
            except FlowFabricError:
                continue  # unparsable index members are skipped
            verdict = await self.admission.decide(
                Candidate(eid, who.lane_id, capability_mismatch=True), who
            )
            if isinstance(verdict, Block):
                await self.admission.block(eid, verdict)
        return out

    async def _claim_admitted(
        self, partition: int, who: Claimer, req: ClaimRequest, want: int, budget: Budget
    ) -> list[Claimed]:
        """The candidate-first path: read the eligible heads, ask every check, and claim each
        admitted head with a grant and a claim, releasing the reservations if that fails."""
        heads = await self.store.call(
            "ZRANGE", PartitionKeys.of(partition).lane(who.lane_id, "eligible"), 0,
            want + SCAN_SLACK - 1,
        )  # fmt: skip
        eids: list[ExecutionId] = []
        for raw in heads or []:
            try:
                eids.append(parse_execution_id(text(raw), self.partitions))
            except FlowFabricError:
                continue
        return await self._admit_each(eids, who, req, want, budget)

    async def _admit_reported(
        self, raws: Sequence[str], who: Claimer, req: ClaimRequest, want: int, budget: Budget
    ) -> list[Claimed]:
        """The heads `ff_claim_batch` left for admission (budgets or a quota attached): each is
        asked every check and claimed alone when admitted (docs/lifecycle.md#admission)."""
        eids: list[ExecutionId] = []
        for raw in raws:
            try:
                eids.append(parse_execution_id(raw, self.partitions))
            except FlowFabricError:
                continue
        return await self._admit_each(eids, who, req, want, budget)

    async def _admit_each(
        self, eids: Sequence[ExecutionId], who: Claimer, req: ClaimRequest, want: int,
        budget: Budget,
    ) -> list[Claimed]:  # fmt: skip
        """Ask every check for each of `eids` in order, block the refused ones, and lease the
        admitted ones of the partition in one `ff_claim_admitted` call, releasing the
        admissions of those it did not lease. A check that cannot read its state raises: the
        claim call fails (fail closed). Heads another claim pass of this server is admitting
        are left to it (docs/lifecycle.md#admission)."""
        if want <= 0 or not eids:
            return []
        held: set[str] = set()
        try:
            admitted: list[Candidate] = []
            rest = list(eids)
            while rest and len(admitted) < want:
                # in rounds of as many heads as leases still wanted: a refused head makes
                # room for the next one, as when asking one by one; heads another pass of
                # this server holds are passed over (only the heads a round takes are held)
                rest = [e for e in rest if str(e) not in self._admitting]
                take, rest = rest[: want - len(admitted)], rest[want - len(admitted) :]
                if not take:
                    break
                mine = {str(e) for e in take}
                held |= mine
                self._admitting |= mine
                cands = await self._candidates(take, who)
                verdicts = await self.admission.decide_many(cands, who)
                for cand, verdict in zip(cands, verdicts, strict=True):
                    if isinstance(verdict, Block):
                        await self.admission.block(cand.execution_id, verdict)
                        budget.blocked += 1
                    elif verdict == ADMIT:
                        admitted.append(cand)
            # the rows carry everything the task needs (payload, tags, ...): no second read
            return await self._lease_admitted(admitted, who, req, budget)
        finally:
            self._admitting -= held

    async def _lease_admitted(
        self, admitted: list[Candidate], who: Claimer, req: ClaimRequest, budget: Budget
    ) -> list[Claimed]:
        """One ff_claim_admitted call for the admitted heads of one partition; every admission
        whose head was not leased is released."""
        if not admitted:
            return []
        triples = [(str(c.execution_id), str(uuid.uuid4()), str(uuid.uuid4())) for c in admitted]
        try:
            reply = await self.functions.scheduling.claim_admitted(
                admitted[0].execution_id.partition, who, req.lease_ttl_ms, triples, budget.cap
            )
        except FlowFabricError:
            for cand in admitted:
                await self.admission.release(cand, who)
            raise
        budget.spend(reply.reply_bytes)
        by_id = {str(c.execution_id): c for c in admitted}
        for raw, why in reply.refused:
            cand = by_id[raw]
            await self.admission.release(cand, who)
            if why == "mismatch":
                await self._block_for_route(cand.execution_id)
        return [claimed_from_row(row, who.lane_id, self.partitions) for row in reply.claimed]

    async def _consume_grant(
        self, eid: ExecutionId, who: Claimer, lease_ttl_ms: int, lease_id: str, attempt_id: str
    ) -> Claimed:
        """Claim with a grant: a new attempt, or the same attempt when it was interrupted
        (delay, waiting for children, resumed suspension), transparently for the worker."""
        lease_id = lease_id or str(uuid.uuid4())
        try:
            reply = await self.functions.scheduling.claim_execution(
                eid, who, lease_id, lease_ttl_ms, attempt_id or str(uuid.uuid4())
            )
        except FlowFabricError as exc:
            if exc.code != "use_claim_resumed_execution":
                raise
            reply = await self.functions.scheduling.claim_resumed_execution(
                eid, who, lease_id, lease_ttl_ms
            )
            claimed = claimed_from_reply(eid, who.lane_id, reply)
            claimed.resumed = True
            return claimed
        return claimed_from_reply(eid, who.lane_id, reply)

    async def grant(self, req: ClaimRequest, who: Claimer) -> tuple[ExecutionId, Granted] | None:
        """Two-step claim, step one: a grant for the first grantable head (ClaimForWorker)."""
        if not await self.lane_controls.claimable([who.lane_id]):
            return None
        return await self._grant(req, who)

    async def _grant(self, req: ClaimRequest, who: Claimer) -> tuple[ExecutionId, Granted] | None:
        parts = self.probe_order(who.lane_id, req.worker_instance_id)
        parts += [p for p, _ in self.hints.of_lane(who.lane_id) if p not in parts]
        pipe = self.store.pipeline()
        for p in parts:
            pipe.zrange(PartitionKeys.of(p).lane(who.lane_id, "eligible"), 0, 0)
        with claim_pass():
            for members in await self.store.run_pipeline(pipe):
                for raw in members:
                    try:
                        eid = parse_execution_id(text(raw), self.partitions)
                    except FlowFabricError:
                        continue
                    cand = await self._candidate(eid, who)
                    if cand.budget_ids or cand.quota_policy_id:
                        verdict = await self.admission.decide(cand, who)
                        if isinstance(verdict, Block):
                            await self.admission.block(eid, verdict)
                        if verdict != ADMIT:
                            continue
                    try:
                        return eid, await self.functions.scheduling.issue_claim_grant(
                            eid, who, req.grant_ttl_ms
                        )
                    except FlowFabricError as exc:
                        if cand.budget_ids or cand.quota_policy_id:
                            await self.admission.release(cand, who)
                        if exc.code == "capability_mismatch":
                            await self._block_for_route(eid)
                        elif exc.code not in (*NO_MATCH, "invalid_input"):
                            raise
        return None

    async def _candidate(self, eid: ExecutionId, who: Claimer) -> Candidate:
        """What the admission checks need of `eid`, read from its core."""
        return (await self._candidates([eid], who))[0]

    async def _candidates(self, eids: Sequence[ExecutionId], who: Claimer) -> list[Candidate]:
        """What the admission checks need of each of `eids`, read from their cores in one
        pipeline."""
        pipe = self.store.pipeline()
        for eid in eids:
            pipe.hmget(ExecKeys(eid).core, list(CANDIDATE_FIELDS))
        out = []
        for eid, row in zip(eids, await self.store.run_pipeline(pipe), strict=True):
            required, bids, qid, key, epoch = (text(v) for v in row)
            out.append(Candidate(
                eid, who.lane_id, tuple(t for t in required.split(",") if t),
                budget_ids=tuple(b for b in bids.split(",") if b), quota_policy_id=qid,
                concurrency_key=key, lease_epoch=int(epoch) if epoch.isdigit() else None,
            ))  # fmt: skip
        return out

    async def claim_granted(
        self, eid: ExecutionId, who: Claimer, lease_ttl_ms: int, lease_id: str, attempt_id: str
    ) -> Claimed:
        """Two-step claim, step two: consume the grant (ClaimFromGrant)."""
        claimed = await self._consume_grant(eid, who, lease_ttl_ms, lease_id, attempt_id)
        await self._attach_inputs([claimed])
        return claimed

    async def _block_for_route(self, eid: ExecutionId) -> None:
        await self.admission.block(eid, Block(ROUTE_REASON, CAPABLE_WORKER_DETAIL))

    async def _attach_inputs(self, claims: list[Claimed]) -> None:
        pipe = self.store.pipeline()
        for c in claims:
            k = ExecKeys(c.execution_id)
            pipe.get(k.payload)
            pipe.hmget(
                k.core,
                ["payload_encoding", "execution_kind", "namespace", "priority", "flow_id",
                 "trace_context"],
            )  # fmt: skip
            pipe.hgetall(k.tags)
            pipe.hget(k.attempt(c.attempt_index), "attempt_type")
        rows = await self.store.run_pipeline(pipe)
        for i, c in enumerate(claims):
            payload, (encoding, kind, namespace, priority, flow_id, trace), tags, attempt_type = (
                rows[4 * i : 4 * i + 4]
            )
            if c.resumed:
                c.attempt_type = text(attempt_type) or "initial"
            c.payload = bytes(payload or b"")
            c.payload_encoding, c.execution_kind, c.namespace = (
                text(encoding), text(kind), text(namespace),
            )  # fmt: skip
            c.priority = int(text(priority) or 0)
            c.flow_id, c.trace_context = text(flow_id), text(trace)
            c.tags = hash_to_dict(tags)

    # -- long poll ----------------------------------------------------------------------------

    def wake_local(self) -> None:
        """Something became claimable in this process (a create, an unblock): wake waiters."""
        self._wake_lane(None)

    def _wake_lane(self, lane: str | None) -> None:
        """Wake the waiters claiming from `lane` (every waiter for None)."""
        for event, lanes in list(self._local_wake.items()):
            if lane is None or lanes is None or lane in lanes:
                event.set()

    @contextlib.contextmanager
    def local_wakes(
        self, event: asyncio.Event, lanes: frozenset[str] | None = None
    ) -> Iterator[None]:
        """Set `event` whenever work becomes claimable in this process (on one of `lanes`,
        when given), while open."""
        self._local_wake[event] = lanes
        try:
            yield
        finally:
            self._local_wake.pop(event, None)

    async def claim_next(self, req: ClaimRequest, wait_ms: int) -> list[Claimed]:
        """Claim now, or wait up to `wait_ms` for work to arrive; [] = no work.

        The waiter listens before it claims and clears its wake flag before each claim, so an
        event that lands while a claim is in flight triggers another claim instead of being
        lost until the backstop. A wait that runs out with no event answers [] without a last
        claim: the next call's first claim is that pass, so an idle long poll costs one pass a
        second rather than two."""
        if wait_ms <= 0:
            return await self.claim(req)
        deadline = time.monotonic() + wait_ms / 1000
        wake = asyncio.Event()

        def on_event(event: dict[str, Any]) -> None:
            if event.get("public_state") == "waiting" or event.get("type") == "resync":
                wake.set()

        with self.local_wakes(wake, frozenset(req.lanes)):
            async with contextlib.AsyncExitStack() as stack:
                if self.hub is not None:
                    for p in {p for lane in req.lanes for p in self.lane_parts.of(lane)}:
                        part = PartitionKeys.of(p)
                        await stack.enter_async_context(self.hub.listen(part.exec_events, on_event))
                while True:
                    wake.clear()
                    got = await self.claim(req)
                    remaining = deadline - time.monotonic()
                    if got or remaining <= 0 or self.closing.is_set():
                        return got
                    closing = asyncio.ensure_future(self.closing.wait())
                    woken = asyncio.ensure_future(wake.wait())
                    await asyncio.wait(
                        {closing, woken},
                        timeout=min(remaining, WAIT_BACKSTOP_S),
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                    closing.cancel()
                    woken.cancel()
                    if not wake.is_set() and time.monotonic() >= deadline:
                        # the wait ran out with no event: no last pass, the caller's next
                        # ClaimNext claims first thing (docs/lifecycle.md#the-claim-cycle)
                        return []
