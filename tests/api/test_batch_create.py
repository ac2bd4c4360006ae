"""CreateExecutions: several creates in one call, each decoded and validated as a
CreateExecution and answered on its own, in request order; one `ff_create_executions` per
partition; a failed item writes nothing; a bad batch as a whole is refused (both topologies)."""

from __future__ import annotations

import time
from typing import Any

import grpc

from flowfabric.v1 import execution_pb2 as pb
from flowfabric.v1 import types_pb2 as t
from tests.api.test_lifecycle import LANE
from tests.api.util import expect_error, keyspace_dump
from tests.conftest import Api

C = grpc.StatusCode


def item(**fields: Any) -> pb.CreateExecutionRequest:
    fields.setdefault("execution_kind", "demo")
    fields.setdefault("lane_id", LANE)
    return pb.CreateExecutionRequest(**fields)


async def create_batch(
    api: Api, items: list[pb.CreateExecutionRequest]
) -> list[pb.CreateExecutionsResponse.Result]:
    reply = await api.execution.CreateExecutions(
        pb.CreateExecutionsRequest(items=items), metadata=api.metadata
    )
    assert len(reply.results) == len(items)
    return list(reply.results)


async def test_mixed_items_are_answered_each_in_request_order_across_partitions(api: Api) -> None:
    results = await create_batch(api, [
        item(partition_id=1, idempotency_key="k1", input_payload=b"one"),
        item(partition_id=2, tags={"Bad Key": "v"}),  # refused by the function
        item(partition_id=1, idempotency_key="k1"),  # same key, same batch: duplicate of 0
        item(execution_kind=""),  # refused by the decoder
        item(partition_id=3, idempotency_key="k2", delay_until=int(time.time() * 1000) + 3_600_000),
        item(partition_id=2),
        item(partition_id=3, policy_json="{not json"),
    ])  # fmt: skip
    kinds = [r.WhichOneof("outcome") for r in results]
    assert kinds == ["created", "error", "duplicate", "error", "created", "created", "error"]
    first = results[0].created.execution_id
    assert results[2].duplicate.execution_id == first
    assert results[1].error.reason == "invalid_tag_key"
    assert results[1].error.code == C.INVALID_ARGUMENT.value[0]
    assert results[3].error.reason == "invalid_input"
    assert results[3].error.metadata["field"] == "execution_kind"
    assert results[6].error.reason == "invalid_policy_json"
    assert results[0].created.public_state == t.PUBLIC_STATE_WAITING
    assert results[4].created.public_state == t.PUBLIC_STATE_DELAYED
    parts = [r.created.execution_id.split("}")[0] for r in (results[0], results[4], results[5])]
    assert len(set(parts)) == 3  # three partitions, one call each
    got = await api.execution.GetExecution(
        pb.GetExecutionRequest(execution_id=first), metadata=api.metadata
    )
    assert got.execution.execution_id == first
    # a later batch meets the earlier batch's idempotency key too
    again = await create_batch(api, [item(partition_id=3, idempotency_key="k2"), item()])
    assert again[0].duplicate.execution_id == results[4].created.execution_id
    assert again[1].WhichOneof("outcome") == "created"


async def test_invalid_items_change_nothing(api: Api) -> None:
    await create_batch(api, [item(idempotency_key="seed")])
    before = await keyspace_dump(api.store)
    results = await create_batch(api, [
        item(idempotency_key="x", tags={"Bad Key": "v"}),
        item(idempotency_key="y", policy_json="{not json"),
        item(concurrency_key="ck"),  # needs a quota_policy_id
        item(input_payload=b"x" * ((1 << 20) + 1)),
        item(flow_id="00000000-0000-4000-8000-000000000000"),
    ])  # fmt: skip
    assert [r.WhichOneof("outcome") for r in results] == ["error"] * 5
    assert results[3].error.reason == "payload_too_large"
    assert results[4].error.metadata["field"] == "flow_id"
    assert await keyspace_dump(api.store) == before


async def test_empty_or_oversized_batch_is_refused(api: Api) -> None:
    before = await keyspace_dump(api.store)
    for items in ([], [item()] * 1001):
        info = await expect_error(
            api.execution.CreateExecutions(
                pb.CreateExecutionsRequest(items=items), metadata=api.metadata
            ),
            C.INVALID_ARGUMENT,
            "invalid_input",
        )
        assert info.metadata["field"] == "items"
    assert await keyspace_dump(api.store) == before
