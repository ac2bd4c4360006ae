"""Helpers shared by the suspension and signal API tests: create, claim, suspend, deliver."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from flowfabric.server.engine.scanners import server_time_ms
from flowfabric.server.valkey.codec import hash_to_dict
from flowfabric.server.valkey.ids import parse_execution_id
from flowfabric.server.valkey.keys import ExecKeys, WaitpointKeys
from flowfabric.v1 import execution_pb2 as epb
from flowfabric.v1 import signal_pb2 as spb
from flowfabric.v1 import types_pb2 as t
from flowfabric.v1 import worker_pb2 as wpb
from tests.conftest import Api

LANE = "L"
T = TypeVar("T")


async def create(api: Api, **fields: Any) -> str:
    fields.setdefault("execution_kind", "demo")
    fields.setdefault("lane_id", LANE)
    reply = await api.execution.CreateExecution(
        epb.CreateExecutionRequest(**fields), metadata=api.metadata
    )
    assert reply.WhichOneof("outcome") == "created", reply
    return str(reply.created.execution_id)


async def claim(api: Api, instance: str = "w-1") -> t.ClaimedTask:
    reply = await api.worker.ClaimNext(
        wpb.ClaimNextRequest(
            worker_id="w", worker_instance_id=instance, lane_ids=[LANE], lease_ttl_ms=30_000
        ),
        metadata=api.metadata,
    )
    assert reply.WhichOneof("outcome") == "task", reply
    return reply.task


async def started(api: Api) -> t.LeaseHandle:
    """A fresh execution, claimed: its lease."""
    await create(api)
    return (await claim(api)).lease


def condition(*names: str, mode: str = "") -> str:
    body: dict[str, Any] = {"condition_type": "signal_set", "required_signal_names": list(names)}
    body["signal_match_mode"] = mode or ("all" if len(names) > 1 else "any")
    return json.dumps(body)


def suspend(
    api: Api, lease: t.LeaseHandle, *names: str, mode: str = "", **fields: Any
) -> Awaitable[wpb.SuspendResponse]:
    fields.setdefault("reason_code", "waiting_for_signal")
    fields.setdefault("resume_condition_json", condition(*names, mode=mode))
    return api.worker.Suspend(  # type: ignore[no-any-return]
        wpb.SuspendRequest(lease=lease, **fields), metadata=api.metadata
    )


async def suspended(
    api: Api, *names: str, **fields: Any
) -> tuple[t.LeaseHandle, wpb.SuspendResponse.Suspended]:
    """A claimed execution suspended on `names`: its (old) lease and the Suspended answer."""
    lease = await started(api)
    reply = await suspend(api, lease, *names, **fields)
    assert reply.WhichOneof("outcome") == "suspended", reply
    return lease, reply.suspended


def deliver(
    api: Api, eid: str, waitpoint_id: str, token: str, name: str, **fields: Any
) -> Awaitable[spb.DeliverSignalResponse]:
    fields.setdefault("signal_category", "approval")
    fields.setdefault("source_type", "user")
    fields.setdefault("source_identity", "jane")
    return api.signal.DeliverSignal(  # type: ignore[no-any-return]
        spb.DeliverSignalRequest(
            execution_id=eid,
            waitpoint_id=waitpoint_id,
            waitpoint_token=token,
            signal_name=name,
            **fields,
        ),
        metadata=api.metadata,
    )


async def state(api: Api, eid: str) -> int:
    reply = await api.execution.GetExecutionState(
        epb.GetExecutionStateRequest(execution_id=eid), metadata=api.metadata
    )
    return int(reply.public_state)


async def core(api: Api, eid: str) -> dict[str, str]:
    key = ExecKeys(parse_execution_id(eid, 1 << 16)).core
    return hash_to_dict(await api.store.call("HGETALL", key))


async def waitpoint(api: Api, eid: str, waitpoint_id: str) -> dict[str, str]:
    tag = parse_execution_id(eid, 1 << 16).tag
    return hash_to_dict(await api.store.call("HGETALL", WaitpointKeys(tag, waitpoint_id).waitpoint))


async def eventually(
    probe: Callable[[], Awaitable[T]], done: Callable[[T], bool], what: str, limit_s: float = 20
) -> T:
    """Poll `probe` until `done` (bounded; a failure names what never happened)."""
    deadline = asyncio.get_running_loop().time() + limit_s
    while True:
        value = await probe()
        if done(value):
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what}: still {value!r}")
        await asyncio.sleep(0.05)


async def wait_server_time_past(api: Api, at_ms: int) -> None:
    await eventually(lambda: server_time_ms(api.store), lambda now: now > at_ms, "server time")


def flip_last(token: str) -> str:
    return token[:-1] + ("0" if token[-1] != "0" else "1")


def new_id() -> str:
    return str(uuid.uuid4())
