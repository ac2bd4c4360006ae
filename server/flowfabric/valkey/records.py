"""Stored signal and waitpoint records -> API messages, and the reads that fetch them by id.

Shared by the unary signal RPCs (GetResumeSignals, ListPendingWaitpoints) and the watch
streams, so a signal or waitpoint looks the same whichever way a client receives it. Tokens
appear only in `PendingWaitpointInfo` (the disclosure points of
docs/suspension.md#token-security-properties).
"""

from __future__ import annotations

from collections.abc import Mapping

from flowfabric.server.valkey.codec import hash_to_dict, int64, text
from flowfabric.server.valkey.ids import ExecutionId
from flowfabric.server.valkey.keys import WaitpointKeys, signal_key, signal_payload_key
from flowfabric.server.valkey.store import Store
from flowfabric.v1 import types_pb2 as t


def _int(fields: Mapping[str, str], name: str) -> int:
    try:
        return int64(int(fields.get(name) or 0))
    except ValueError:
        return 0


def _opt_int(fields: Mapping[str, str], name: str) -> int | None:
    raw = fields.get(name) or ""
    try:
        return int64(int(raw)) if raw else None
    except ValueError:
        return None


def signal_record(fields: Mapping[str, str], payload: bytes, stream_id: str = "") -> t.SignalRecord:
    """A stored signal hash (docs/suspension.md#data-model) and its payload bytes as a
    SignalRecord."""
    return t.SignalRecord(
        signal_id=fields.get("signal_id", ""),
        execution_id=fields.get("target_execution_id", ""),
        waitpoint_id=fields.get("target_waitpoint_id", ""),
        signal_name=fields.get("signal_name", ""),
        signal_category=fields.get("signal_category", ""),
        source_type=fields.get("source_type", ""),
        source_identity=fields.get("source_identity", ""),
        correlation_id=fields.get("correlation_id") or None,
        payload=payload,
        payload_encoding=fields.get("payload_encoding") or "json",
        observed_effect=fields.get("observed_effect", ""),
        created_at=_int(fields, "created_at"),
        accepted_at=_int(fields, "accepted_at"),
        stream_id=stream_id or fields.get("stream_id", ""),
    )


def waitpoint_info(
    fields: Mapping[str, str], required_signal_names: list[str]
) -> t.PendingWaitpointInfo:
    """A waitpoint hash as PendingWaitpointInfo (carries the token: never log it)."""
    return t.PendingWaitpointInfo(
        waitpoint_id=fields.get("waitpoint_id", ""),
        waitpoint_key=fields.get("waitpoint_key", ""),
        state=fields.get("state", ""),
        waitpoint_token=fields.get("waitpoint_token", ""),
        required_signal_names=required_signal_names,
        created_at=_int(fields, "created_at"),
        activated_at=_opt_int(fields, "activated_at"),
        expires_at=_opt_int(fields, "expires_at"),
    )


async def read_signals(
    store: Store, eid: ExecutionId, signal_ids: list[str]
) -> list[t.SignalRecord]:
    """Signals by id (hash + payload each, one pipeline on one slot), in the given order;
    ids that do not exist are left out."""
    pipe = store.pipeline()
    for sid in signal_ids:
        pipe.hgetall(signal_key(eid.tag, sid))
        pipe.get(signal_payload_key(eid.tag, sid))
    rows = await store.run_pipeline(pipe) if signal_ids else []
    out = []
    for i in range(0, len(rows), 2):
        fields = hash_to_dict(rows[i])
        if fields:
            payload = rows[i + 1] or b""
            raw = payload if isinstance(payload, bytes) else text(payload).encode()
            out.append(signal_record(fields, raw))
    return out


async def read_signal(
    store: Store, eid: ExecutionId, signal_id: str, stream_id: str = ""
) -> t.SignalRecord | None:
    """One signal by id; None when it does not exist."""
    found = await read_signals(store, eid, [signal_id])
    if not found:
        return None
    if stream_id:
        found[0].stream_id = stream_id
    return found[0]


async def read_waitpoint(
    store: Store, eid: ExecutionId, waitpoint_id: str
) -> t.PendingWaitpointInfo | None:
    """One waitpoint (with its matcher names) by id; None when it does not exist."""
    wk = WaitpointKeys(eid.tag, waitpoint_id)
    pipe = store.pipeline()
    pipe.hgetall(wk.waitpoint)
    pipe.hgetall(wk.condition)
    fields_raw, cond_raw = await store.run_pipeline(pipe)
    fields = hash_to_dict(fields_raw)
    if not fields:
        return None
    cond = hash_to_dict(cond_raw)
    names = [cond.get(f"matcher:{i}:name", "") for i in range(_int(cond, "total_matchers"))]
    return waitpoint_info(fields, [n for n in names if n])
