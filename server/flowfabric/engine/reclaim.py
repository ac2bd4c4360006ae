"""Reclaim: an expired or revoked lease in the probed partitions goes to the claiming worker
(docs/lifecycle.md#lease-expiry-and-reclaim).

`ff_issue_reclaim_grant` then `ff_reclaim_execution`, whose reply carries the new lease and
attempt and what the worker needs (payload, kind, tags, ...), so nothing is re-read after the
claim. The scheduler's probe pipeline reads the due entries of each probed partition's
lease_expiry index (due once the lease expired; at once when revoked) and hands them here before
any new claim. A candidate the worker's capabilities cannot take is parked for that capability
set for a while, so it is not retried on every call while a capable worker is never held back;
an entry of another lane is remembered and skipped.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence

from flowfabric.server.engine.claims import NO_MATCH, Claimed, ClaimRequest, claimed_from_reply
from flowfabric.server.valkey.codec import text
from flowfabric.server.valkey.errors import FlowFabricError
from flowfabric.server.valkey.functions import Claimer, Functions, ReclaimLimit
from flowfabric.server.valkey.ids import ExecutionId, parse_execution_id
from flowfabric.server.valkey.keys import ExecKeys
from flowfabric.server.valkey.store import Store, server_time_ms

RECLAIM_CANDIDATES_PER_PARTITION = 4
RECLAIM_PARK_S = 10.0
RECLAIM_TRIES_PER_CALL = 8  # due entries tried per claim call, at most
CLOCK_REFRESH_S = 5.0


class Reclaimer:
    def __init__(self, functions: Functions, store: Store, partitions: int) -> None:
        self.functions = functions
        self.store = store
        self.partitions = partitions
        # reclaim candidates a capability set cannot take, until a monotonic deadline; keyed
        # by (execution, capabilities CSV) so a capable worker is never held back by the park
        self._parked: dict[tuple[str, str], float] = {}
        # the lane of due entries seen, so a worker of another lane skips them without a read
        self._lanes: dict[str, str] = {}
        self._clock_offset = 0
        self._clock_refresh_at = 0.0

    async def server_now(self) -> int:
        """Valkey time in ms, estimated from a clock offset refreshed every few seconds (the
        functions read TIME themselves; this only picks due index entries)."""
        mono = time.monotonic()
        if mono >= self._clock_refresh_at:
            self._clock_offset = await server_time_ms(self.store) - int(time.time() * 1000)
            self._clock_refresh_at = mono + CLOCK_REFRESH_S
        return int(time.time() * 1000) + self._clock_offset

    async def reclaim_due(
        self, members: Sequence[str], who: Claimer, req: ClaimRequest, want: int
    ) -> list[Claimed]:
        """Lease up to `want` of the due lease_expiry `members` to `who`, trying at most
        RECLAIM_TRIES_PER_CALL of them, so a claim's cost stays bounded."""
        out: list[Claimed] = []
        mono = time.monotonic()
        if len(self._parked) > 1024:  # drop lapsed parks so the map stays bounded
            self._parked = {k: v for k, v in self._parked.items() if v > mono}
        if len(self._lanes) > 4096:
            self._lanes.clear()
        tries = 0
        for member in members:
            if len(out) >= want or tries >= RECLAIM_TRIES_PER_CALL:
                break
            known_lane = self._lanes.get(member)
            if known_lane is not None and known_lane != who.lane_id:
                continue
            if self._parked.get((member, who.capabilities_csv), 0) > mono:
                continue
            try:
                eid = parse_execution_id(member, self.partitions)
            except FlowFabricError:
                continue
            tries += 1
            got = await self._try(eid, who, req)
            if got is not None:
                out.append(got)
        return out

    async def _try(self, eid: ExecutionId, who: Claimer, req: ClaimRequest) -> Claimed | None:
        fields = ["lane_id", "lifecycle_phase", "ownership_state"]
        lane, phase, ownership = (
            text(v) for v in await self.store.call("HMGET", ExecKeys(eid).core, *fields)
        )
        if lane:
            self._lanes[str(eid)] = lane  # an execution's lane never changes
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
