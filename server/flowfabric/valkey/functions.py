"""Typed wrappers over the Functions library: build KEYS, encode ARGV, FCALL, decode the reply.

This is the only module that knows each function's KEYS/ARGV positions (their contract headers
live in `lua/`). Servicers, the scheduler and scanners call these and never format keys.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from flowfabric.server.valkey.codec import Reply, decode, hash_to_dict, text
from flowfabric.server.valkey.errors import FlowFabricError
from flowfabric.server.valkey.ids import ExecutionId
from flowfabric.server.valkey.keys import ExecKeys, PartitionKeys, WaitpointKeys, signal_key
from flowfabric.server.valkey.store import Store

log = logging.getLogger("flowfabric.functions")


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

    async def claim_batch(
        self, partition: int, who: Claimer, lease_ttl_ms: int, ids: list[tuple[str, str]],
        max_scanned: int,
    ) -> Reply:  # fmt: skip
        """`OK claimed mismatched`: up to len(ids) heads of the lane's eligible set on one
        partition leased in one call, the i-th lease with the i-th (lease_id, attempt_id)."""
        p = PartitionKeys.of(partition)
        keys = [
            p.lane(who.lane_id, "eligible"), p.lease_expiry, p.attempt_timeout,
            p.execution_deadline,
        ]  # fmt: skip
        args: list[str | bytes] = [
            who.worker_id, who.worker_instance_id, who.lane_id, who.capability_hash,
            who.capabilities_csv, str(lease_ttl_ms), str(lease_ttl_ms * 2 // 3), str(len(ids)),
            str(max_scanned), *(v for pair in ids for v in pair),
        ]  # fmt: skip
        return await self._call("ff_claim_batch", keys, args)


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


@dataclass(frozen=True)
class Suspension:
    """What `ff_suspend_execution` needs besides the fence (spec 20 §5.2)."""

    suspension_id: str
    waitpoint_id: str
    waitpoint_key: str
    reason_code: str
    requested_by: str
    resume_condition_json: str
    resume_policy_json: str
    continuation_metadata_pointer: str = ""
    timeout_at: int | None = None
    use_pending_waitpoint: bool = False
    timeout_behavior: str = ""


@dataclass(frozen=True)
class Signal:
    """One signal for `ff_deliver_signal` / `ff_buffer_signal_for_pending_waitpoint`
    (spec 20 §5.3-§5.4); `None`/"" fields take the function's defaults."""

    waitpoint_id: str
    signal_id: str
    signal_name: str
    waitpoint_token: str
    signal_category: str = ""
    source_type: str = ""
    source_identity: str = ""
    payload: bytes = b""
    payload_encoding: str = ""
    correlation_id: str = ""
    idempotency_key: str = ""
    target_scope: str = ""
    created_at: int | None = None
    dedup_ttl_ms: int | None = None
    resume_delay_ms: int | None = None
    max_signals_per_execution: int | None = None
    signal_maxlen: int | None = None


INITIAL_KID = "k1"


class SignalFunctions(LifecycleFunctions):
    """Suspension, waitpoints, signals and the waitpoint HMAC keystore (spec 20 §5).

    `hmac_secret` (the configured FF_WAITPOINT_HMAC_SECRET) lets the calls that mint or
    validate tokens repair a keystore lost with the keyspace: on `hmac_secret_not_initialized`
    the boot install is re-run on that partition and the call retried once (spec 50 §2.6).
    """

    def __init__(self, store: Store, hmac_secret: str | None = None) -> None:
        super().__init__(store)
        self.hmac_secret = hmac_secret

    async def _keyed(self, tag: str, name: str, keys: list[str], args: list[str | bytes]) -> Reply:
        try:
            return await self._call(name, keys, args)
        except FlowFabricError as exc:
            if exc.code != "hmac_secret_not_initialized" or not self.hmac_secret:
                raise
        outcome = await self.install_waitpoint_hmac_secret(tag, INITIAL_KID, self.hmac_secret)
        log.critical(
            "keyspace reset detected: the waitpoint HMAC keystore of %s was missing; boot "
            "install re-run (%s)", tag, outcome.str(0),
        )  # fmt: skip
        return await self._call(name, keys, args)

    async def create_pending_waitpoint(
        self, eid: ExecutionId, fence: Fence, attempt_index: int, waitpoint_id: str,
        waitpoint_key: str, expires_in_ms: int,
    ) -> Reply:  # fmt: skip
        """`OK waitpoint_id waitpoint_key waitpoint_token expires_at`."""
        k, p = ExecKeys(eid), PartitionKeys(eid.tag)
        wk = WaitpointKeys(eid.tag, waitpoint_id)
        keys = [k.core, wk.waitpoint, p.pending_waitpoint_expiry, p.hmac_keystore, k.waitpoints]
        args: list[str | bytes] = [
            str(eid), *fence.args(), str(attempt_index), waitpoint_id, waitpoint_key,
            str(expires_in_ms),
        ]  # fmt: skip
        return await self._keyed(eid.tag, "ff_create_pending_waitpoint", keys, args)

    async def suspend_execution(
        self, eid: ExecutionId, fence: Fence, attempt_index: int, s: Suspension
    ) -> Reply:
        """`OK|ALREADY_SATISFIED suspension_id waitpoint_id waitpoint_key waitpoint_token`."""
        k, p = ExecKeys(eid), PartitionKeys(eid.tag)
        keys = [
            k.core, k.suspension_current, WaitpointKeys(eid.tag, s.waitpoint_id).waitpoint,
            p.hmac_keystore, k.lease_current, k.lease_history, p.lease_expiry,
            p.attempt_timeout, p.suspension_timeout, p.pending_waitpoint_expiry, k.waitpoints,
            k.signals,
        ]  # fmt: skip
        args: list[str | bytes] = [
            str(eid), *fence.args(), str(attempt_index), s.suspension_id, s.waitpoint_id,
            s.waitpoint_key, s.reason_code, s.requested_by, s.resume_condition_json,
            s.resume_policy_json, s.continuation_metadata_pointer, _opt(s.timeout_at),
            "1" if s.use_pending_waitpoint else "0", s.timeout_behavior,
        ]  # fmt: skip
        return await self._keyed(eid.tag, "ff_suspend_execution", keys, args)

    def _signal_call(self, eid: ExecutionId, s: Signal) -> tuple[list[str], list[str | bytes]]:
        k, p = ExecKeys(eid), PartitionKeys(eid.tag)
        wk = WaitpointKeys(eid.tag, s.waitpoint_id)
        dedup = wk.dedup(s.idempotency_key) if s.idempotency_key else p.noop
        keys = [
            k.core, wk.waitpoint, p.hmac_keystore, k.signals, signal_key(eid.tag, s.signal_id),
            dedup, k.suspension_current, p.suspension_timeout,
        ]  # fmt: skip
        args: list[str | bytes] = [
            str(eid), s.waitpoint_id, s.signal_id, s.signal_name, s.signal_category,
            s.source_type, s.source_identity, s.payload, s.payload_encoding, s.correlation_id,
            s.idempotency_key, s.target_scope, _opt(s.created_at), _opt(s.dedup_ttl_ms),
            _opt(s.resume_delay_ms), _opt(s.max_signals_per_execution), _opt(s.signal_maxlen),
            s.waitpoint_token,
        ]  # fmt: skip
        return keys, args

    async def deliver_signal(self, eid: ExecutionId, s: Signal) -> Reply:
        """`OK signal_id observed_effect stream_id accepted_at` or `DUPLICATE existing_id`."""
        keys, args = self._signal_call(eid, s)
        return await self._keyed(eid.tag, "ff_deliver_signal", keys, args)

    async def buffer_signal_for_pending_waitpoint(self, eid: ExecutionId, s: Signal) -> Reply:
        """As `deliver_signal`; the effect is `buffered_for_pending_waitpoint`."""
        keys, args = self._signal_call(eid, s)
        return await self._keyed(eid.tag, "ff_buffer_signal_for_pending_waitpoint", keys, args)

    async def resume_execution(
        self, eid: ExecutionId, trigger_type: str, resume_delay_ms: int = 0
    ) -> Reply:
        """`OK public_state` (`waiting` | `delayed`)."""
        k, p = ExecKeys(eid), PartitionKeys(eid.tag)
        return await self._call(
            "ff_resume_execution",
            [k.core, k.suspension_current, p.suspension_timeout],
            [str(eid), trigger_type, str(resume_delay_ms) if resume_delay_ms else ""],
        )

    async def close_waitpoint(self, eid: ExecutionId, waitpoint_id: str, reason: str) -> Reply:
        """`OK closed` or `OK already_closed`."""
        p = PartitionKeys(eid.tag)
        return await self._call(
            "ff_close_waitpoint",
            [ExecKeys(eid).core, WaitpointKeys(eid.tag, waitpoint_id).waitpoint,
             p.pending_waitpoint_expiry],
            [str(eid), waitpoint_id, reason],
        )  # fmt: skip

    async def expire_suspension(self, eid: ExecutionId) -> Reply:
        """`OK behavior public_state` or `ALREADY_SATISFIED reason`."""
        k, p = ExecKeys(eid), PartitionKeys(eid.tag)
        return await self._call(
            "ff_expire_suspension",
            [k.core, k.suspension_current, p.suspension_timeout, p.attempt_timeout,
             p.execution_deadline],
            [str(eid)],
        )  # fmt: skip

    async def read_resume_signals(
        self, eid: ExecutionId, attempt_index: int
    ) -> list[tuple[dict[str, str], bytes]]:
        """The signals that satisfied the suspension `attempt_index` resumed from, in matcher
        order: (signal hash, payload bytes) each."""
        k = ExecKeys(eid)
        reply = await self._call(
            "ff_read_resume_signals", [k.core, k.suspension_current], [str(eid), str(attempt_index)]
        )
        n = reply.int(0)
        rest = list(reply.values[1:])
        if len(rest) == n and all(isinstance(r, list) and len(r) == 2 for r in rest):
            pairs = [(r[0], r[1]) for r in rest]  # nested {fields, payload}
        elif len(rest) == 2 * n:
            pairs = [(rest[2 * i], rest[2 * i + 1]) for i in range(n)]
        else:
            raise FlowFabricError(
                "protocol_error", message=f"ff_read_resume_signals: {n} signals, {len(rest)} values"
            )
        return [(hash_to_dict(fields), _bytes(payload)) for fields, payload in pairs]

    async def list_waitpoints(self, eid: ExecutionId) -> list[WaitpointRow]:
        """The execution's `pending`/`active` waitpoints with tokens, ordered by id."""
        k = ExecKeys(eid)
        reply = await self._call("ff_list_waitpoints", [k.core, k.waitpoints], [str(eid)])
        rows = []
        for item in reply.values[1 : 1 + reply.int(0)]:
            v = [text(x) for x in item]
            if len(v) < 8:
                raise FlowFabricError(
                    "protocol_error", message=f"ff_list_waitpoints: short row of {len(v)}"
                )
            try:
                names = [str(n) for n in json.loads(v[7] or "[]") if n]
            except (ValueError, TypeError):
                names = []
            rows.append(WaitpointRow(*v[:7], names))  # type: ignore[arg-type]
        return rows

    # -- the keystore (one call per partition) --------------------------------------------------

    async def install_waitpoint_hmac_secret(self, tag: str, kid: str, secret_hex: str) -> Reply:
        """`OK installed|repaired|unchanged|mismatch` (spec 20 §4.7)."""
        return await self._call(
            "ff_install_waitpoint_hmac_secret", [PartitionKeys(tag).hmac_keystore],
            [kid, secret_hex],
        )  # fmt: skip

    async def rotate_waitpoint_hmac_secret(
        self, tag: str, new_kid: str, new_secret_hex: str, grace_ms: int
    ) -> Reply:
        """`OK rotated <previous_kid or ""> <new_kid> <gc_count>` or `OK noop <kid>`."""
        return await self._call(
            "ff_rotate_waitpoint_hmac_secret", [PartitionKeys(tag).hmac_keystore],
            [new_kid, new_secret_hex, str(grace_ms)],
        )  # fmt: skip

    async def list_waitpoint_hmac_kids(self, tag: str) -> tuple[str, list[tuple[str, int]]]:
        """(current kid or "", [(verifying kid, expires_at_ms)])."""
        reply = await self._call(
            "ff_list_waitpoint_hmac_kids", [PartitionKeys(tag).hmac_keystore], []
        )
        n = reply.int(1)
        return reply.str(0), [(reply.str(2 + 2 * i), reply.int(3 + 2 * i)) for i in range(n)]


@dataclass(frozen=True)
class WaitpointRow:
    """One row of `ff_list_waitpoints` (carries the token: never log it)."""

    waitpoint_id: str
    waitpoint_key: str
    state: str
    waitpoint_token: str
    created_at: str
    activated_at: str
    expires_at: str
    required_signal_names: list[str]

    def as_fields(self) -> dict[str, str]:
        return {
            "waitpoint_id": self.waitpoint_id, "waitpoint_key": self.waitpoint_key,
            "state": self.state, "waitpoint_token": self.waitpoint_token,
            "created_at": self.created_at, "activated_at": self.activated_at,
            "expires_at": self.expires_at,
        }  # fmt: skip

    def __repr__(self) -> str:
        return f"WaitpointRow({self.waitpoint_id}, {self.state}, token=<REDACTED>)"


def _bytes(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    return text(value).encode() if value else b""
