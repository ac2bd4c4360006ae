"""Reclaim: an expired or revoked lease in the probed partitions goes to the claiming worker
(docs/lifecycle.md#lease-expiry-and-reclaim).

`ff_issue_reclaim_grant` then `ff_reclaim_execution`, whose reply carries the new lease and
attempt and what the worker needs (payload, kind, tags, ...), so nothing is re-read after the
claim. A candidate the worker's capabilities cannot take is parked for that capability set for
a while, so it is not retried on every call while a capable worker is never held back.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Sequence

from flowfabric.server.engine.claims import NO_MATCH, Claimed, ClaimRequest, claimed_from_reply
from flowfabric.server.valkey.codec import text
from flowfabric.server.valkey.errors import FlowFabricError
from flowfabric.server.valkey.functions import Claimer, Functions, ReclaimLimit
from flowfabric.server.valkey.ids import ExecutionId, parse_execution_id
from flowfabric.server.valkey.keys import ExecKeys, PartitionKeys
from flowfabric.server.valkey.store import Store, server_time_ms

RECLAIM_CANDIDATES_PER_PARTITION = 4
RECLAIM_PARK_S = 10.0


class Reclaimer:
    def __init__(self, functions: Functions, store: Store, partitions: int) -> None:
        self.functions = functions
        self.store = store
        self.partitions = partitions
        # reclaim candidates a capability set cannot take, until a monotonic deadline; keyed
        # by (execution, capabilities CSV) so a capable worker is never held back by the park
        self._parked: dict[tuple[str, str], float] = {}

    async def reclaim(
        self, parts: Sequence[int], who: Claimer, req: ClaimRequest, want: int
    ) -> list[Claimed]:
        """Up to `want` due or revoked leases of the lane in `parts`, leased to `who`."""
        now = await server_time_ms(self.store)
        pipe = self.store.pipeline()
        for p in parts:
            pipe.zrangebyscore(
                PartitionKeys.of(p).lease_expiry, "-inf", now, start=0,
                num=RECLAIM_CANDIDATES_PER_PARTITION,
            )  # fmt: skip
        rows = await self.store.run_pipeline(pipe)
        out: list[Claimed] = []
        mono = time.monotonic()
        if len(self._parked) > 1024:  # drop lapsed parks so the map stays bounded
            self._parked = {k: v for k, v in self._parked.items() if v > mono}
        for raw in itertools.chain.from_iterable(rows):
            if len(out) >= want:
                break
            member = text(raw)
            if self._parked.get((member, who.capabilities_csv), 0) > mono:
                continue
            try:
                eid = parse_execution_id(member, self.partitions)
            except FlowFabricError:
                continue
            got = await self._try(eid, who, req)
            if got is not None:
                out.append(got)
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
