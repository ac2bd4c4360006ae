"""Typed wrappers over the Functions library: build KEYS, encode ARGV, FCALL, decode the reply.

This is the only module that knows each function's KEYS/ARGV positions (their contract headers
live in `lua/`). Servicers, the scheduler and scanners call these and never format keys.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from flowfabric.server.codec import Reply, decode
from flowfabric.server.ids import ExecutionId
from flowfabric.server.keys import ExecKeys, PartitionKeys
from flowfabric.server.store import Store


@dataclass(frozen=True)
class NewExecution:
    """Everything `ff_create_execution` needs (spec 10 §2.1)."""

    execution_id: ExecutionId
    namespace: str
    lane_id: str
    execution_kind: str
    input_payload: bytes
    priority: int
    creator_identity: str
    policy_json: str = ""
    payload_encoding: str = ""
    idempotency_key: str = ""
    tags: Mapping[str, str] | None = None
    delay_until: int | None = None
    execution_deadline_at: int | None = None
    quota_policy_id: str = ""


def _opt(value: int | None) -> str:
    return "" if value is None else str(value)


class Functions:
    """One method per Valkey Function."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def _call(self, name: str, keys: list[str], args: list[str | bytes]) -> Reply:
        return decode(await self.store.fcall(name, keys, args), name)

    async def create_execution(self, x: NewExecution) -> Reply:
        """`OK eid public_state` or `DUPLICATE existing_eid`."""
        k, p = ExecKeys(x.execution_id), PartitionKeys(x.execution_id.tag)
        idem = k.idempotency(x.namespace, x.idempotency_key) if x.idempotency_key else p.noop
        keys = [
            k.core, k.payload, k.policy, k.tags,
            p.lane(x.lane_id, "eligible"), p.lane(x.lane_id, "delayed"),
            idem, p.execution_deadline, p.all_executions, p.lanes,
        ]  # fmt: skip
        args: list[str | bytes] = [
            str(x.execution_id), x.namespace, x.lane_id, x.execution_kind, str(x.priority),
            x.creator_identity, x.policy_json, x.input_payload, _opt(x.delay_until), "",
            json.dumps(dict(x.tags or {}), sort_keys=True), _opt(x.execution_deadline_at),
            str(x.execution_id.partition), x.payload_encoding, x.quota_policy_id,
        ]  # fmt: skip
        return await self._call("ff_create_execution", keys, args)

    async def set_execution_tags(self, eid: ExecutionId, tags: Mapping[str, str]) -> Reply:
        """`OK <pairs written>`."""
        k = ExecKeys(eid)
        args: list[str | bytes] = []
        for key in sorted(tags):
            args += [key, tags[key]]
        return await self._call("ff_set_execution_tags", [k.core, k.tags], args)


@dataclass(frozen=True)
class Fence:
    """The lease fence (lease id, epoch, attempt id); all empty = unfenced."""

    lease_id: str = ""
    lease_epoch: int | None = None
    attempt_id: str = ""

    def args(self) -> list[str | bytes]:
        epoch = "" if self.lease_epoch is None else str(self.lease_epoch)
        return [self.lease_id, epoch, self.attempt_id]


@dataclass(frozen=True)
class Claimer:
    """Who claims: worker pool, process, lane and advertised capabilities (sorted CSV)."""

    worker_id: str
    worker_instance_id: str
    lane_id: str
    capabilities_csv: str = ""
    capability_hash: str = ""


class LifecycleFunctions(Functions):
    """Claims, leases and terminal transitions (spec 10 §2.2-§2.18).

    KEYS marked (*) in a function's header are built by the function from the tag of KEYS[1]
    (spec 00 §4 rule 3); the wrappers pass the placeholder `ff:noop:{p}` for them unless the
    real key is known without a read.
    """

    async def issue_claim_grant(self, eid: ExecutionId, who: Claimer, grant_ttl_ms: int) -> Reply:
        """`OK eid grant_expires_at`."""
        k, p = ExecKeys(eid), PartitionKeys(eid.tag)
        return await self._call(
            "ff_issue_claim_grant",
            [k.core, k.claim_grant, p.lane(who.lane_id, "eligible")],
            [str(eid), who.worker_id, who.worker_instance_id, who.lane_id, who.capability_hash,
             str(grant_ttl_ms), "", "", who.capabilities_csv],
        )  # fmt: skip

    async def claim_execution(
        self, eid: ExecutionId, who: Claimer, lease_id: str, lease_ttl_ms: int, attempt_id: str
    ) -> Reply:
        """`OK lease_id epoch expires_at attempt_id attempt_index attempt_type`."""
        k, p = ExecKeys(eid), PartitionKeys(eid.tag)
        keys = [
            k.core, k.claim_grant, p.lane(who.lane_id, "eligible"), p.lease_expiry,
            p.worker_leases(who.worker_instance_id), p.noop, p.noop, p.noop, k.attempts,
            k.lease_current, k.lease_history, p.lane(who.lane_id, "active"), p.attempt_timeout,
            p.execution_deadline,
        ]  # fmt: skip
        args: list[str | bytes] = [
            str(eid), who.worker_id, who.worker_instance_id, who.lane_id, who.capability_hash,
            lease_id, str(lease_ttl_ms), str(lease_ttl_ms * 2 // 3), attempt_id, "", "", "",
        ]  # fmt: skip
        return await self._call("ff_claim_execution", keys, args)

    async def renew_lease(
        self, eid: ExecutionId, attempt_index: int, fence: Fence, lease_ttl_ms: int,
        history_grace_ms: int = 5000,
    ) -> Reply:  # fmt: skip
        """`OK expires_at`."""
        k, p = ExecKeys(eid), PartitionKeys(eid.tag)
        return await self._call(
            "ff_renew_lease",
            [k.core, k.lease_current, k.lease_history, p.lease_expiry],
            [str(eid), str(attempt_index), fence.attempt_id, fence.lease_id,
             "" if fence.lease_epoch is None else str(fence.lease_epoch), str(lease_ttl_ms),
             str(history_grace_ms)],
        )  # fmt: skip

    async def complete_execution(
        self, eid: ExecutionId, fence: Fence, result: bytes, encoding: str, source: str
    ) -> Reply:
        """`OK completed`."""
        k, p = ExecKeys(eid), PartitionKeys(eid.tag)
        keys = [
            k.core, p.noop, p.lease_expiry, p.noop, p.noop, k.lease_current, k.lease_history,
            p.noop, p.noop, k.result, p.attempt_timeout, p.execution_deadline,
        ]  # fmt: skip
        args = [str(eid), *fence.args(), result, source, encoding]
        return await self._call("ff_complete_execution", keys, args)

    async def fail_execution(
        self,
        eid: ExecutionId,
        fence: Fence,
        reason: str,
        category: str,
        source: str,
        retry_policy_json: str = "",
    ) -> Reply:
        """`OK retry_scheduled delay_until next_index` or `OK terminal_failed`.

        `retry_policy_json` "" = the function reads the stored policy's retry_policy.
        """
        k, p = ExecKeys(eid), PartitionKeys(eid.tag)
        keys = [
            k.core, p.noop, p.lease_expiry, p.noop, p.noop, p.noop, k.lease_current,
            k.lease_history, p.noop, p.noop, p.attempt_timeout, p.execution_deadline,
        ]  # fmt: skip
        args = [str(eid), *fence.args(), reason, category, retry_policy_json, source]
        return await self._call("ff_fail_execution", keys, args)

    async def delay_execution(
        self, eid: ExecutionId, fence: Fence, delay_until: int, source: str
    ) -> Reply:
        """`OK delay_until`."""
        k, p = ExecKeys(eid), PartitionKeys(eid.tag)
        keys = [
            k.core, p.noop, k.lease_current, k.lease_history, p.lease_expiry, p.noop, p.noop,
            p.noop, p.attempt_timeout,
        ]  # fmt: skip
        args = [str(eid), *fence.args(), str(delay_until), source]
        return await self._call("ff_delay_execution", keys, args)

    async def move_to_waiting_children(self, eid: ExecutionId, fence: Fence, source: str) -> Reply:
        """`OK`."""
        k, p = ExecKeys(eid), PartitionKeys(eid.tag)
        keys = [
            k.core, p.noop, k.lease_current, k.lease_history, p.lease_expiry, p.noop, p.noop,
            p.noop, p.attempt_timeout,
        ]  # fmt: skip
        args = [str(eid), *fence.args(), source]
        return await self._call("ff_move_to_waiting_children", keys, args)

    async def cancel_execution(
        self, eid: ExecutionId, reason: str, source: str, fence: Fence
    ) -> Reply:
        """`OK cancelled <previous phase>`."""
        k, p = ExecKeys(eid), PartitionKeys(eid.tag)
        keys = [
            k.core, p.noop, p.noop, k.lease_current, k.lease_history, p.lease_expiry, p.noop,
            k.suspension_current, p.noop, p.noop, p.suspension_timeout, p.noop,
            p.attempt_timeout, p.execution_deadline, *([p.noop] * 7),
        ]  # fmt: skip
        args = [str(eid), reason, source, *fence.args()]
        return await self._call("ff_cancel_execution", keys, args)

    async def update_progress(
        self, eid: ExecutionId, fence: Fence, pct: int | None, message: str
    ) -> Reply:
        """`OK`."""
        k = ExecKeys(eid)
        args = [str(eid), fence.lease_id, "" if fence.lease_epoch is None else
                str(fence.lease_epoch), "" if pct is None else str(pct), message]  # fmt: skip
        return await self._call("ff_update_progress", [k.core], args)

    async def revoke_lease(self, eid: ExecutionId, expected_lease_id: str, reason: str) -> Reply:
        """`OK revoked lease_id epoch` or `ALREADY_SATISFIED already_revoked|already_expired`."""
        k, p = ExecKeys(eid), PartitionKeys(eid.tag)
        return await self._call(
            "ff_revoke_lease",
            [k.core, k.lease_current, k.lease_history, p.lease_expiry, p.noop],
            [str(eid), expected_lease_id, reason],
        )

    async def change_priority(self, eid: ExecutionId, priority: int) -> Reply:
        """`OK old new`."""
        p = PartitionKeys(eid.tag)
        return await self._call(
            "ff_change_priority", [ExecKeys(eid).core, p.noop], [str(eid), str(priority)]
        )

    async def replay_execution(self, eid: ExecutionId) -> Reply:
        """`OK public_state`."""
        k, p = ExecKeys(eid), PartitionKeys(eid.tag)
        return await self._call(
            "ff_replay_execution", [k.core, p.noop, p.noop, k.lease_history], [str(eid), ""]
        )

    async def mark_lease_expired_if_due(self, eid: ExecutionId) -> Reply:
        k, p = ExecKeys(eid), PartitionKeys(eid.tag)
        return await self._call(
            "ff_mark_lease_expired_if_due",
            [k.core, k.lease_current, p.lease_expiry, k.lease_history],
            [str(eid)],
        )

    async def promote_delayed(self, eid: ExecutionId, lane: str, now_ms: int) -> Reply:
        p = PartitionKeys(eid.tag)
        return await self._call(
            "ff_promote_delayed",
            [ExecKeys(eid).core, p.lane(lane, "delayed"), p.noop],
            [str(eid), str(now_ms)],
        )

    async def expire_execution(self, eid: ExecutionId, reason: str) -> Reply:
        k, p = ExecKeys(eid), PartitionKeys(eid.tag)
        keys = [
            k.core, p.noop, p.noop, k.lease_current, k.lease_history, p.lease_expiry, p.noop,
            p.noop, p.noop, p.attempt_timeout, p.execution_deadline, p.noop,
            p.suspension_timeout, k.suspension_current,
        ]  # fmt: skip
        return await self._call("ff_expire_execution", keys, [str(eid), reason])

    async def issue_reclaim_grant(self, eid: ExecutionId, who: Claimer, grant_ttl_ms: int) -> Reply:
        k, p = ExecKeys(eid), PartitionKeys(eid.tag)
        return await self._call(
            "ff_issue_reclaim_grant",
            [k.core, k.claim_grant, p.lease_expiry],
            [str(eid), who.worker_id, who.worker_instance_id, who.lane_id, who.capability_hash,
             str(grant_ttl_ms), "", "", who.capabilities_csv],
        )  # fmt: skip

    async def reclaim_execution(
        self, eid: ExecutionId, who: Claimer, lease_id: str, lease_ttl_ms: int, attempt_id: str
    ) -> Reply:
        """`OK lease_id epoch expires_at attempt_id attempt_index reclaim` or
        `OK max_reclaims_exceeded`."""
        k, p = ExecKeys(eid), PartitionKeys(eid.tag)
        keys = [
            k.core, k.claim_grant, p.noop, p.noop, p.noop, p.noop, k.attempts, k.lease_current,
            k.lease_history, p.lease_expiry, p.worker_leases(who.worker_instance_id), p.noop,
            p.attempt_timeout, p.execution_deadline,
        ]  # fmt: skip
        args: list[str | bytes] = [
            str(eid), who.worker_id, who.worker_instance_id, who.lane_id, lease_id,
            str(lease_ttl_ms), attempt_id, "",
        ]  # fmt: skip
        return await self._call("ff_reclaim_execution", keys, args)

    async def block_execution(self, eid: ExecutionId, reason: str, detail: str) -> Reply:
        """`OK blocked` (spec 30 §6.2)."""
        p = PartitionKeys(eid.tag)
        return await self._call(
            "ff_block_execution_for_admission",
            [ExecKeys(eid).core, p.noop, p.noop],
            [str(eid), reason, detail],
        )

    async def unblock_execution(self, eid: ExecutionId, expected_reason: str) -> Reply:
        """`OK unblocked` (spec 30 §6.3)."""
        p = PartitionKeys(eid.tag)
        return await self._call(
            "ff_unblock_execution",
            [ExecKeys(eid).core, p.noop, p.noop],
            [str(eid), expected_reason],
        )

    async def reconcile_indexes(self, eid: ExecutionId) -> Reply:
        """`OK ok` | `OK repaired <added> <removed>` | `OK not_found` | `OK unknown_state`."""
        return await self._call("ff_reconcile_indexes", [ExecKeys(eid).core], [str(eid)])

    async def claim_resumed_execution(
        self, eid: ExecutionId, who: Claimer, lease_id: str, lease_ttl_ms: int
    ) -> Reply:
        """`OK lease_id epoch expires_at attempt_id attempt_index resumed` (spec 20 §5.8)."""
        k, p = ExecKeys(eid), PartitionKeys(eid.tag)
        keys = [
            k.core, k.claim_grant, p.noop, p.lease_expiry, p.noop, p.noop, k.lease_current,
            k.lease_history, p.noop, p.attempt_timeout, p.execution_deadline,
        ]  # fmt: skip
        args: list[str | bytes] = [
            str(eid), who.worker_id, who.worker_instance_id, who.lane_id, lease_id,
            str(lease_ttl_ms), "", "",
        ]  # fmt: skip
        return await self._call("ff_claim_resumed_execution", keys, args)


@dataclass(frozen=True)
class Frame:
    """One frame to append (spec 30 §2.1); `None`/"" fields take the function's defaults."""

    frame_type: str
    payload: bytes
    timestamp: int | None = None
    encoding: str = ""
    metadata_json: str = ""
    correlation_id: str = ""
    source: str = ""
    retention_maxlen: int | None = None
    max_payload_bytes: int | None = None


class StreamFunctions(Functions):
    """Attempt output streams (spec 30 §2.1-§2.2)."""

    async def append_frame(
        self, eid: ExecutionId, attempt_index: int, fence: Fence, frame: Frame
    ) -> Reply:
        """`OK entry_id frame_count`."""
        k = ExecKeys(eid)
        args: list[str | bytes] = [
            str(eid), str(attempt_index), fence.lease_id,
            "" if fence.lease_epoch is None else str(fence.lease_epoch), fence.attempt_id,
            frame.frame_type, _opt(frame.timestamp), frame.payload, frame.encoding,
            frame.metadata_json, frame.correlation_id, frame.source,
            _opt(frame.retention_maxlen), _opt(frame.max_payload_bytes),
        ]  # fmt: skip
        keys = [k.core, k.stream(attempt_index), k.stream_meta(attempt_index)]
        return await self._call("ff_append_frame", keys, args)

    async def read_attempt_stream(
        self, eid: ExecutionId, attempt_index: int, from_id: str, to_id: str, count_limit: int
    ) -> Reply:
        """`OK entries closed_at closed_reason`; cursors already lowered (`-`, `+`, ids)."""
        k = ExecKeys(eid)
        return await self._call(
            "ff_read_attempt_stream",
            [k.stream(attempt_index), k.stream_meta(attempt_index)],
            [from_id, to_id, str(count_limit)],
        )
