"""`Client.why` / `SyncClient.why` (docs/lifecycle.md#why-an-execution-is-not-running): the
typed answer for a delay, a dependency wait and a terminal execution, and the errors of a bad
id (both topologies)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import pytest

from flowfabric import (
    Client,
    ExecutionState,
    InvalidArgument,
    NotFound,
    SyncClient,
    Why,
    WhyDependencies,
    WhyKind,
)
from flowfabric.v1 import execution_pb2
from tests.conftest import API_TOKEN, Api

LANE = "sdk-why"


async def test_delay_has_its_eta(client: Client) -> None:
    sub = await client.submit("job", b"x", lane=LANE, delay_until=timedelta(hours=1))
    why = await client.why(sub.execution_id)
    assert why.kind is WhyKind.DELAY and not why.running
    assert why.state is ExecutionState.DELAYED and why.blocking_reason == "waiting_for_delay"
    assert why.eta_at is not None and why.eta_at > 0
    assert why.detail is None and why.raw.kind == execution_pb2.WhyNotRunning.KIND_DELAY


async def test_dependencies_are_typed(client: Client) -> None:
    f = client.flow()
    a = f.add("step", lane=LANE)
    b = f.add("step", lane=LANE, after=[a])
    sub = await f.submit()
    why = await client.why(sub[b])
    assert why.kind is WhyKind.DEPENDENCIES
    assert why.state is ExecutionState.WAITING_CHILDREN
    assert isinstance(why.detail, WhyDependencies)
    assert (why.detail.join, why.detail.required, why.detail.unresolved) == ("all", 1, 1)
    [up] = why.detail.upstreams
    assert up.execution_id == sub[a] and up.state is ExecutionState.WAITING


async def test_sync_client_and_terminal(api: Api, client: Client) -> None:
    sub = await client.submit("job", b"x", lane=LANE)
    await client.cancel(sub.execution_id)

    def read() -> Why:
        with SyncClient(api.address, token=API_TOKEN) as sync:
            return sync.why(sub.execution_id)

    why = await asyncio.to_thread(read)
    assert why.kind is WhyKind.TERMINAL and why.state is ExecutionState.CANCELLED


async def test_bad_ids_raise_as_describe_does(client: Client) -> None:
    with pytest.raises(NotFound):
        await client.why(f"{{fp:0}}:{uuid.uuid4()}")
    with pytest.raises(InvalidArgument):
        await client.why("not-an-id")


def test_an_unknown_kind_is_unknown() -> None:
    assert WhyKind.from_proto(0) is WhyKind.UNKNOWN
    assert WhyKind.from_proto(999) is WhyKind.UNKNOWN
    assert WhyKind.from_proto(execution_pb2.WhyNotRunning.KIND_QUOTA_RATE) is WhyKind.QUOTA_RATE
    # every kind the server may send has its own value (UNSPECIFIED is UNKNOWN)
    every = execution_pb2.WhyNotRunning.Kind.keys()
    assert {WhyKind.from_proto(execution_pb2.WhyNotRunning.Kind.Value(n)) for n in every} == (
        set(WhyKind)
    )
