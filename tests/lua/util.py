"""Helpers for calling the Functions library directly in tests."""

from __future__ import annotations

import uuid

from flowfabric.server.ids import ExecutionId
from flowfabric.server.keys import ExecKeys, PartitionKeys
from flowfabric.server.store import Store

LANE = "default"


def new_eid(partition: int = 7) -> ExecutionId:
    return ExecutionId(partition, str(uuid.uuid4()))


def create_keys(eid: ExecutionId, idem: str | None = None, namespace: str = "ns") -> list[str]:
    k, p = ExecKeys(eid), PartitionKeys(eid.tag)
    return [
        k.core,
        k.payload,
        k.policy,
        k.tags,
        p.lane(LANE, "eligible"),
        p.lane(LANE, "delayed"),
        k.idempotency(namespace, idem) if idem else p.noop,
        p.execution_deadline,
        p.all_executions,
        p.lanes,
    ]


def create_args(eid: ExecutionId, **over: object) -> list[object]:
    base: dict[str, object] = {
        "execution_id": str(eid),
        "namespace": "ns",
        "lane_id": LANE,
        "execution_kind": "k",
        "priority": "0",
        "creator_identity": "tester",
        "policy_json": "",
        "input_payload": b"",
        "delay_until": "",
        "dedup_ttl_ms": "",
        "tags_json": "",
        "execution_deadline_at": "",
        "partition_id": str(eid.partition),
        "payload_encoding": "",
        "quota_policy_id": "",
    }
    base.update(over)
    return list(base.values())


async def create(store: Store, eid: ExecutionId, idem: str | None = None, **over: object) -> list:
    return await store.fcall(  # type: ignore[no-any-return]
        "ff_create_execution", create_keys(eid, idem), create_args(eid, **over)
    )


async def now_ms(store: Store) -> int:
    sec, usec = await store.call("TIME") if not store.cluster else await _time(store)
    return int(sec) * 1000 + int(usec) // 1000


async def _time(store: Store) -> list:
    node = store.client.get_primaries()[0]
    return await store.client.execute_command("TIME", target_nodes=node)  # type: ignore[no-any-return]
