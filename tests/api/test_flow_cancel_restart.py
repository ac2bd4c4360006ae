"""CancelFlow without `wait` survives a server kill -9: the backlog `ff_cancel_flow` recorded is
drained after a restart by the cancel reconciler (docs/flows.md#cancelling-a-flow). A real
`flowfabric serve` subprocess against the fixture Valkey (both topologies)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import grpc

from flowfabric.server.valkey.ids import flow_partition
from flowfabric.server.valkey.keys import FlowKeys, PartitionKeys
from flowfabric.server.valkey.store import Store
from flowfabric.v1 import flow_pb2 as pb
from flowfabric.v1 import flow_pb2_grpc
from tests.api.test_lifecycle import eventually
from tests.faults.harness import HMAC_SECRET, PARTITIONS, ServerProcess

MEMBERS = 1000
ATTEMPTS = 5


async def _flow(stub: flow_pb2_grpc.FlowServiceStub) -> str:
    fid = str(uuid.uuid4())
    reply = await stub.SubmitFlow(
        pb.SubmitFlowRequest(
            flow_id=fid, flow_kind="dag", namespace="ns",
            members=[pb.SubmitFlowRequest.Member(key=f"m{i}", execution_kind="s")
                     for i in range(MEMBERS)],
        )
    )  # fmt: skip
    assert reply.WhichOneof("outcome") == "submitted"
    return fid


async def test_an_async_cancel_finishes_after_a_kill_and_restart(
    valkey_url: str, store: Store, tmp_path: Path
) -> None:
    env = {
        "FF_VALKEY_URL": valkey_url, "FF_WAITPOINT_HMAC_SECRET": HMAC_SECRET,
        "FF_CANCEL_RECONCILER_INTERVAL_S": "1", "FF_SHUTDOWN_GRACE_S": "1",
        "FF_BOOT_RETRY_S": "10",
    }  # fmt: skip
    await store.call("DEL", "ff:config:partitions")
    server = ServerProcess(tmp_path, "server", env)
    await asyncio.to_thread(server.start)
    try:
        # The kill must land while members are still owed: the background drain usually has
        # not finished when the answer arrives; a flow it finished first is tried again.
        owed, fid = 0, ""
        for _ in range(ATTEMPTS):
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = flow_pb2_grpc.FlowServiceStub(channel)
                fid = await _flow(stub)
                req = pb.CancelFlowRequest(
                    flow_id=fid, reason="stop", cancellation_policy="cancel_all"
                )
                reply = await stub.CancelFlow(req)
                await asyncio.to_thread(server.kill)
            assert reply.cancellation_scheduled.member_count == MEMBERS
            tag = f"{{fp:{flow_partition(fid, PARTITIONS)}}}"
            owed = int(await store.call("SCARD", FlowKeys(tag, fid).pending_cancels))
            if owed:
                break
            await asyncio.to_thread(server.start)
        assert owed, "every attempt drained before the kill"
        assert await store.call("ZSCORE", PartitionKeys(tag).cancel_backlog, fid) is not None
        await asyncio.to_thread(server.start)

        async def drained() -> bool:
            return not await store.call("EXISTS", FlowKeys(tag, fid).pending_cancels)

        await eventually(drained, "the restarted server drains the backlog", within_s=30)
        async with grpc.aio.insecure_channel(server.address) as channel:
            view = await flow_pb2_grpc.FlowServiceStub(channel).DescribeFlow(
                pb.DescribeFlowRequest(flow_id=fid)
            )
        assert dict(view.members_by_state) == {"cancelled": MEMBERS}
        assert await store.call("ZSCORE", PartitionKeys(tag).cancel_backlog, fid) is None
    finally:
        await asyncio.to_thread(server.stop)
        await store.call("DEL", "ff:config:partitions")
