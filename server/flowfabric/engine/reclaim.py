"""Reclaim: an expired or revoked lease is handed to a claiming worker
(docs/lifecycle.md#lease-expiry-and-reclaim).

A batch claim (`ff_claim_batch`) reclaims the due leases of its lane and partition itself,
before any eligible head. This module finds the partitions that hold due leases of a lane
(`due_partitions`), for the scheduler to claim from, and keeps the one-at-a-time path the
cross-slot admission mode uses: `ff_issue_reclaim_grant` then `ff_reclaim_execution`, whose reply
carries the new lease and attempt and what the worker needs (payload, kind, tags, ...). There a
candidate the worker's capabilities cannot take is parked for that capability set for a while,
so it is not retried on every call while a capable worker is never held back.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence

from flowfabric.server.engine.claims import (
    NO_MATCH,
    Budget,
    Claimed,
    ClaimRequest,
    claimed_from_reply,
    row_costs,
)
from flowfabric.server.engine.probe import lane_index, partitions_with_work
from flowfabric.server.valkey.codec import text
from flowfabric.server.valkey.errors import FlowFabricError
from flowfabric.server.valkey.functions import Claimer, Functions, ReclaimLimit
from flowfabric.server.valkey.ids import ExecutionId, parse_execution_id
from flowfabric.server.valkey.keys import ExecKeys, PartitionKeys
from flowfabric.server.valkey.store import Store, server_time_ms

RECLAIM_CANDIDATES_PER_PARTITION = 4
RECLAIM_PARK_S = 10.0
CLOCK_REFRESH_S = 5.0


class Reclaimer:
    def __init__(self, functions: Functions, store: Store, partitions: int) -> None:
        self.functions = functions
        self.store = store
        self.partitions = partitions
        # reclaim candidates a capability set cannot take, until a monotonic deadline; keyed
        # by (execution, capabilities CSV) so a capable worker is never held back by the park
        self._parked: dict[tuple[str, str], float] = {}
        # Valkey's clock minus ours, re-read every CLOCK_REFRESH_S: discovery only picks the
        # partitions to claim from (the claim itself decides what is due by Valkey's TIME)
        self._offset_ms = 0
        self._offset_read = -CLOCK_REFRESH_S

    async def _now_ms(self) -> int:
        mono = time.monotonic()
        if mono - self._offset_read >= CLOCK_REFRESH_S:
            self._offset_ms = await server_time_ms(self.store) - int(time.time() * 1000)
            self._offset_read = mono
        return int(time.time() * 1000) + self._offset_ms

    async def _due(self, parts: Sequence[int], lane: str, count: int) -> list[list[bytes]]:
        """Per partition of `parts`, up to `count` members of the lane's active set scored at
        or before Valkey's now (leases due or revoked)."""
        if not parts:
            return []
        now = await self._now_ms()
        pipe = self.store.pipeline()
        for p in parts:
            pipe.zrangebyscore(
                PartitionKeys.of(p).lane(lane, "active"), "-inf", now, start=0, num=count
            )
        return list(await self.store.run_pipeline(pipe))

    async def due_partitions(self, parts: Sequence[int], lane: str) -> list[int]:
        """The partitions of `parts` whose lane active set holds a due lease (one
        `ff_probe_due` per node: engine/probe.py)."""
        if not parts:
            return []
        index = lane_index(lane, "active")
        return await partitions_with_work(
            self.store, parts, index, test="due", upper=await self._now_ms()
        )

    async def reclaim(
        self, parts: Sequence[int], who: Claimer, req: ClaimRequest, want: int, budget: Budget
    ) -> list[Claimed]:
        """Up to `want` due or revoked leases of the lane in `parts`, leased to `who` one at a
        time, within `budget`."""
        rows = await self._due(parts, who.lane_id, RECLAIM_CANDIDATES_PER_PARTITION)
        mono = time.monotonic()
        if len(self._parked) > 1024:  # drop lapsed parks so the map stays bounded
            self._parked = {k: v for k, v in self._parked.items() if v > mono}
        candidates: list[ExecutionId] = []
        for members in rows:
            for raw in members:
                member = text(raw)
                if self._parked.get((member, who.capabilities_csv), 0) > mono:
                    continue
                try:
                    candidates.append(parse_execution_id(member, self.partitions))
                except FlowFabricError:
                    continue
        out: list[Claimed] = []
        for eid, cost in zip(candidates, await row_costs(self.store, candidates), strict=True):
            if len(out) >= want or not budget.fits(cost):
                break
            got = await self._try(eid, who, req)
            if got is not None:
                out.append(got)
                budget.spend(cost)
        return out

    async def _try(self, eid: ExecutionId, who: Claimer, req: ClaimRequest) -> Claimed | None:
        fields = ["lane_id", "lifecycle_phase", "ownership_state"]
        lane, phase, ownership = (
            text(v) for v in await self.store.call("HMGET", ExecKeys(eid).core, *fields)
        )
        if lane != who.lane_id or phase != "active":
            return None
        if ownership == "leased":
            # due but not yet marked by the scanner: mark it now (idempotent)
            await self.functions.lease.mark_lease_expired_if_due(eid)
        try:
            await self.functions.lease.issue_reclaim_grant(eid, who, req.grant_ttl_ms)
            reply = await self.functions.lease.reclaim_execution(
                eid, who, str(uuid.uuid4()), req.lease_ttl_ms, str(uuid.uuid4())
            )
        except FlowFabricError as exc:
            if exc.code == "capability_mismatch":
                park = (str(eid), who.capabilities_csv)
                self._parked[park] = time.monotonic() + RECLAIM_PARK_S
            elif exc.code not in NO_MATCH:
                raise
            return None
        if isinstance(reply, ReclaimLimit):
            return None
        return claimed_from_reply(eid, who.lane_id, reply)
