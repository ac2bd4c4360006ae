"""The dependency reconciler (docs/flows.md#the-dependency-reconciler), run by the lifecycle
`ScannerSet`.

| scanner | index (member → score), batch | function |
|---|---|---|
| dependency_reconciler | `deps_pending` (upstream eid → time left), 50 | `ff_resolve_outgoing` |

Resolution happens inside the call that ends an upstream; this scanner only finishes what such
a call left past its per-call bound (a large fan-out or a deep skip cascade). The function
re-walks the upstream's out-edges (resolved ones are skipped cheaply) and leaves the index when
it finished, so a duplicate or late scan is harmless.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from flowfabric.server.config import Config
from flowfabric.server.engine.scanners import Scanner
from flowfabric.server.valkey.functions import Functions
from flowfabric.server.valkey.functions.flow import Outgoing
from flowfabric.server.valkey.ids import parse_execution_id

log = logging.getLogger("flowfabric.scanners")

DEPENDENCY_RECONCILER_BATCH = 50


def flow_scanners(
    config: Config, fn: Functions, on_eligible: Callable[[], None] | None = None
) -> list[Scanner]:
    parts = config.flow_partitions

    async def resolve(member: str, now: int, lane: str | None) -> None:
        reply = await fn.flow.resolve_outgoing(parse_execution_id(member, parts))
        if isinstance(reply, Outgoing) and reply.resolved:
            log.info(
                "dependency reconciler: %s had edges left past the per-call bound; resolved %d "
                "more (%d released, %d skipped, %d still pending)",
                member, reply.resolved, reply.released, reply.skipped, reply.pending,
            )  # fmt: skip
            if reply.released and on_eligible is not None:
                on_eligible()

    return [
        Scanner(
            "dependency_reconciler",
            config.interval_ms("FF_DEPENDENCY_RECONCILER_INTERVAL_S"),
            lambda p, _: p.deps_pending,
            resolve,
            batch=DEPENDENCY_RECONCILER_BATCH,
        )
    ]
