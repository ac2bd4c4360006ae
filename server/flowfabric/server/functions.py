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
