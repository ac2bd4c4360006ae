"""The suspension scanners (docs/suspension.md#scanners, docs/architecture.md#scanners), run by the
lifecycle `ScannerSet`.

| scanner | index (member → score), batch | function |
|---|---|---|
| suspension_timeout | `suspension_timeout` (eid → timeout_at), 50 | `ff_expire_suspension` |
| pending_wp_expiry | `pending_waitpoint_expiry` (wp id → expires_at), 100 | `ff_close_waitpoint` |

The pending-expiry action reads the waitpoint's execution id and closes it `never_committed`.

Both functions re-validate inside their atomic call, so a duplicate or late scan is harmless;
failures back off per member like every other scanner.
"""

from __future__ import annotations

import logging

from flowfabric.server.config import Config
from flowfabric.server.engine.scanners import Scanner
from flowfabric.server.valkey.codec import text
from flowfabric.server.valkey.errors import FlowFabricError
from flowfabric.server.valkey.functions import Functions
from flowfabric.server.valkey.functions.suspension import SuspensionExpired
from flowfabric.server.valkey.ids import parse_execution_id
from flowfabric.server.valkey.keys import PartitionKeys, WaitpointKeys
from flowfabric.server.valkey.store import Store

log = logging.getLogger("flowfabric.scanners")

SUSPENSION_TIMEOUT_BATCH = 50
PENDING_EXPIRY_BATCH = 100


def suspension_scanners(config: Config, store: Store, fn: Functions) -> list[Scanner]:
    parts = config.flow_partitions

    async def expire(member: str, now: int, lane: str | None) -> None:
        reply = await fn.suspension.expire_suspension(parse_execution_id(member, parts))
        if isinstance(reply, SuspensionExpired):
            log.info("suspension of %s timed out: %s", member, reply.behavior)

    async def close_pending(member: str, now: int, tag: str | None) -> None:
        assert tag is not None  # by_partition: the index's partition tag
        raw = await store.call("HGET", WaitpointKeys(tag, member).waitpoint, "execution_id")
        try:
            eid = parse_execution_id(text(raw), parts)
        except FlowFabricError:
            # no waitpoint record (or a foreign one): a ghost entry; drop it so it is not
            # retried forever (docs/suspension.md#closing-waitpoints)
            await store.call("ZREM", PartitionKeys(tag).pending_waitpoint_expiry, member)
            return
        await fn.suspension.close_waitpoint(eid, member, "never_committed")

    return [
        Scanner(
            "suspension_timeout",
            config.interval_ms("FF_SUSPENSION_TIMEOUT_INTERVAL_S"),
            lambda p, _: p.suspension_timeout,
            expire,
            batch=SUSPENSION_TIMEOUT_BATCH,
        ),
        Scanner(
            "pending_wp_expiry",
            config.interval_ms("FF_PENDING_WP_EXPIRY_INTERVAL_S"),
            lambda p, _: p.pending_waitpoint_expiry,
            close_pending,
            batch=PENDING_EXPIRY_BATCH,
            by_partition=True,
        ),
    ]
