"""Claims that fit and reclaims that cannot starve, over gRPC (both topologies).

A ClaimNext reply never carries more than the caller can receive: the server stops leasing at
the caller's declared `max_reply_bytes` (or gRPC's 4 MiB default), so nothing is leased that
the reply cannot deliver (docs/lifecycle.md#claim-reply-size). And an expired lease goes to the
next claim of its lane however much eligible work is queued in front of it
(docs/lifecycle.md#lease-expiry-and-reclaim).
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from flowfabric.server.api import limits
from flowfabric.server.engine.scanners import server_time_ms
from flowfabric.v1 import types_pb2 as t
from flowfabric.v1 import worker_pb2 as wpb
from flowfabric.v1 import worker_pb2_grpc
from tests.api.test_lifecycle import LANE, WORKER, claim_next, claim_one, create, state
from tests.api.util import expect_error, keyspace_size
from tests.conftest import Api

MIB = 1 << 20
MAX_PAYLOAD = limits.INPUT_PAYLOAD_MAX


async def claim_batch(
    api: Api, max_tasks: int, max_reply_bytes: int = 0, stub: object = None
) -> list[t.ClaimedTask]:
    reply = await (stub or api.worker).ClaimNext(  # type: ignore[attr-defined]
        wpb.ClaimNextRequest(
            worker_id=WORKER, worker_instance_id="w-1", lane_ids=[LANE], lease_ttl_ms=60_000,
            max_tasks=max_tasks, max_reply_bytes=max_reply_bytes,
        ),
        metadata=api.metadata,
    )  # fmt: skip
    return list(reply.batch.tasks) if reply.WhichOneof("outcome") == "batch" else []


async def test_a_claim_of_large_tasks_fits_the_default_receive_limit(api: Api) -> None:
    """16 tasks at the payload maximum are 16 MiB; a default client (4 MiB) gets what fits,
    and the rest stays queued instead of being leased into a reply it cannot receive."""
    eids = [await create(api, input_payload=bytes([i]) * MAX_PAYLOAD) for i in range(16)]
    got = await claim_batch(api, 16)
    assert 1 <= len(got) <= 3, len(got)
    assert sum(len(task.payload) for task in got) < limits.CLIENT_RECEIVE_DEFAULT
    taken = {task.lease.execution_id for task in got}
    for eid in eids:
        want = t.PUBLIC_STATE_ACTIVE if eid in taken else t.PUBLIC_STATE_WAITING
        assert await state(api, eid) == want, eid
    # a client that receives more (and says so) gets more in one reply
    options = [("grpc.max_receive_message_length", 8 * MIB)]
    async with grpc.aio.insecure_channel(api.address, options=options) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        more = await claim_batch(api, 16, max_reply_bytes=8 * MIB, stub=stub)
    assert 4 <= len(more) <= 7, len(more)
    assert not taken & {task.lease.execution_id for task in more}


async def test_small_tasks_still_batch_fully(api: Api) -> None:
    for _ in range(20):
        await create(api, input_payload=b"small")
    assert len(await claim_batch(api, 20)) == 20


@pytest.mark.parametrize("declared", [1, limits.CLAIM_REPLY_MIN - 1, limits.CLAIM_REPLY_MAX + 1])
async def test_a_receive_limit_too_small_or_too_large_is_refused(api: Api, declared: int) -> None:
    eid = await create(api)
    size = await keyspace_size(api.store)
    await expect_error(
        claim_batch(api, 2, max_reply_bytes=declared),
        grpc.StatusCode.INVALID_ARGUMENT, "invalid_input",
    )  # fmt: skip
    assert await state(api, eid) == t.PUBLIC_STATE_WAITING
    assert await keyspace_size(api.store) == size


async def test_an_expired_lease_is_reclaimed_by_the_next_claim_despite_a_backlog(api: Api) -> None:
    """A worker holds a lease and dies; meanwhile work keeps arriving faster than it is taken.
    The first claim after the lease is due gets the abandoned execution."""
    lost = await create(api, execution_kind="lost")
    crashed = await claim_one(api, "crashed-1", lease_ttl_ms=200)
    assert crashed.lease.execution_id == lost
    for _ in range(30):
        await create(api, priority=9)  # a backlog that outranks it
    while await server_time_ms(api.store) <= crashed.lease.lease_expires_at:
        await create(api, priority=9)  # steady inflow
        await asyncio.sleep(0.02)
    task = await claim_one(api, "w-2")
    assert task.lease.execution_id == lost
    assert task.attempt_type == t.ATTEMPT_TYPE_RECLAIM
    assert task.lease.lease_epoch == crashed.lease.lease_epoch + 1
    assert task.execution_kind == "lost"
    # the backlog is untouched by the reclaim
    assert (await claim_next(api, "w-3")).WhichOneof("outcome") == "task"
