"""ExecutionService end to end through a real server, on both topologies."""

from __future__ import annotations

import uuid

import grpc
import pytest

from flowfabric.server.valkey.ids import parse_execution_id, solo_partition
from flowfabric.server.valkey.keys import ExecKeys
from flowfabric.v1 import execution_pb2 as pb
from flowfabric.v1 import types_pb2 as t
from tests.api.util import expect_error, keyspace_size
from tests.conftest import Api

C = grpc.StatusCode


async def create(api: Api, **fields: object) -> pb.CreateExecutionResponse:
    fields.setdefault("execution_kind", "demo")
    return await api.execution.CreateExecution(  # type: ignore[no-any-return]
        pb.CreateExecutionRequest(**fields), metadata=api.metadata
    )


async def test_create_then_duplicate_by_idempotency_key(api: Api) -> None:
    first = await create(api, idempotency_key="order-7", input_payload=b"\x00\x01\xff")
    assert first.WhichOneof("outcome") == "created"
    assert first.created.public_state == t.PUBLIC_STATE_WAITING
    second = await create(api, idempotency_key="order-7")
    assert second.WhichOneof("outcome") == "duplicate"
    assert second.duplicate.execution_id == first.created.execution_id
    # the server minted a solo id on the lane's partition
    eid = parse_execution_id(first.created.execution_id, 256)
    assert eid.partition == solo_partition("default", 256) == 86


async def test_client_supplied_id_is_kept_and_read_back(api: Api) -> None:
    eid = f"{{fp:3}}:{uuid.uuid4()}"
    created = await create(
        api, execution_id=eid, lane_id="gpu", priority=7, namespace="acme", tags={"app.k": "v"}
    )
    assert created.created.execution_id == eid
    info = (
        await api.execution.GetExecution(
            pb.GetExecutionRequest(execution_id=eid), metadata=api.metadata
        )
    ).execution
    assert info.lane_id == "gpu" and info.namespace == "acme" and info.priority == 7
    assert info.public_state == t.PUBLIC_STATE_WAITING
    assert info.state_vector.lifecycle_phase == t.LIFECYCLE_PHASE_RUNNABLE
    assert info.state_vector.eligibility_state == t.ELIGIBILITY_STATE_ELIGIBLE_NOW
    assert info.created_at > 0 and not info.HasField("started_at")
    snap = (
        await api.execution.DescribeExecution(
            pb.DescribeExecutionRequest(execution_id=eid), metadata=api.metadata
        )
    ).snapshot
    assert dict(snap.tags) == {"app.k": "v"}
    assert snap.total_attempt_count == 0
    assert not snap.HasField("current_attempt") and not snap.HasField("current_lease")
    assert snap.last_mutation_at >= snap.created_at
    state = await api.execution.GetExecutionState(
        pb.GetExecutionStateRequest(execution_id=eid), metadata=api.metadata
    )
    assert state.public_state == t.PUBLIC_STATE_WAITING


async def test_delayed_create_reports_delayed(api: Api) -> None:
    import time

    created = await create(api, delay_until=int(time.time() * 1000) + 60_000)
    assert created.created.public_state == t.PUBLIC_STATE_DELAYED


async def test_list_executions_priority_order_and_pages(api: Api) -> None:
    ids = []
    for prio in (1, 5, 3):
        ids.append((prio, (await create(api, priority=prio)).created.execution_id))
    page1 = await api.execution.ListExecutions(
        pb.ListExecutionsRequest(limit=2), metadata=api.metadata
    )
    assert [e.priority for e in page1.executions] == [5, 3]
    assert page1.total_returned == 2 and page1.next_page_token
    page2 = await api.execution.ListExecutions(
        pb.ListExecutionsRequest(limit=2, page_token=page1.next_page_token), metadata=api.metadata
    )
    assert [e.priority for e in page2.executions] == [1]
    one = await api.execution.ListExecutions(
        pb.ListExecutionsRequest(partition=86, state=pb.EXECUTION_INDEX_ELIGIBLE),
        metadata=api.metadata,
    )
    assert {e.execution_id for e in one.executions} == {eid for _, eid in ids}
    delayed = await api.execution.ListExecutions(
        pb.ListExecutionsRequest(state=pb.EXECUTION_INDEX_DELAYED), metadata=api.metadata
    )
    assert list(delayed.executions) == []


async def test_set_tags(api: Api) -> None:
    eid = (await create(api)).created.execution_id
    reply = await api.execution.SetExecutionTags(
        pb.SetExecutionTagsRequest(execution_id=eid, tags={"cairn.task_id": "t1", "a.b": "2"}),
        metadata=api.metadata,
    )
    assert reply.ok.count == 2
    await expect_error(
        api.execution.SetExecutionTags(
            pb.SetExecutionTagsRequest(execution_id=eid, tags={"NoDot": "x"}),
            metadata=api.metadata,
        ),
        C.INVALID_ARGUMENT,
        "invalid_tag_key",
    )


async def test_not_found_and_result_not_found(api: Api) -> None:
    missing = f"{{fp:1}}:{uuid.uuid4()}"
    for call in (
        api.execution.GetExecution(
            pb.GetExecutionRequest(execution_id=missing), metadata=api.metadata
        ),
        api.execution.DescribeExecution(
            pb.DescribeExecutionRequest(execution_id=missing), metadata=api.metadata
        ),
        api.execution.GetExecutionResult(
            pb.GetExecutionResultRequest(execution_id=missing), metadata=api.metadata
        ),
    ):
        await expect_error(call, C.NOT_FOUND, "execution_not_found")
    eid = (await create(api)).created.execution_id
    await expect_error(
        api.execution.GetExecutionResult(
            pb.GetExecutionResultRequest(execution_id=eid), metadata=api.metadata
        ),
        C.NOT_FOUND,
        "result_not_found",
    )


@pytest.mark.parametrize(
    ("fields", "reason", "field"),
    [
        ({"execution_id": "not-an-id"}, "invalid_input", "execution_id"),
        ({"execution_id": "{fp:999}:" + str(uuid.uuid4())}, "invalid_input", "execution_id"),
        (
            {"execution_id": "{fp:1}:" + str(uuid.uuid4()), "partition_id": 2},
            "invalid_input",
            "partition_id",
        ),
        ({"lane_id": "bad\tlane"}, "invalid_input", "lane_id"),
        ({"lane_id": "x" * 65}, "invalid_input", "lane_id"),
        ({"execution_kind": ""}, "invalid_input", "execution_kind"),
        ({"policy_json": "{not json"}, "invalid_policy_json", None),
        ({"tags": {"Bad": "x"}}, "invalid_tag_key", None),
        ({"input_payload": b"x" * ((1 << 20) + 1)}, "payload_too_large", None),
    ],
)
async def test_bad_create_input_changes_nothing(
    api: Api, fields: dict[str, object], reason: str, field: str | None
) -> None:
    before = await keyspace_size(api.store)
    info = await expect_error(create(api, **fields), C.INVALID_ARGUMENT, reason)
    if field:
        assert info.metadata["field"] == field
    assert info.metadata["class"] == "terminal" and info.metadata["retryable"] == "false"
    assert await keyspace_size(api.store) == before


async def test_unknown_enum_value_is_invalid_argument(api: Api) -> None:
    await expect_error(
        api.execution.ListExecutions(pb.ListExecutionsRequest(state=42), metadata=api.metadata),
        C.INVALID_ARGUMENT,
        "invalid_input",
    )
    await expect_error(
        api.execution.ListExecutions(pb.ListExecutionsRequest(limit=1001), metadata=api.metadata),
        C.INVALID_ARGUMENT,
        "invalid_input",
    )
    await expect_error(
        api.execution.ListExecutions(
            pb.ListExecutionsRequest(page_token="%%%"), metadata=api.metadata
        ),
        C.INVALID_ARGUMENT,
        "invalid_input",
    )


async def test_typed_policy_is_stored_as_json(api: Api) -> None:
    policy = t.ExecutionPolicy(
        retry_policy=t.RetryPolicy(max_retries=2, backoff=t.Backoff(type="fixed", delay_ms=250)),
        routing_requirements=t.RoutingRequirements(required_capabilities=["gpu", "cuda"]),
    )
    eid = (await create(api, policy=policy)).created.execution_id
    keys = ExecKeys(parse_execution_id(eid, 256))
    import json

    stored = json.loads(await api.store.call("GET", keys.policy))
    assert stored["retry_policy"] == {
        "max_retries": 2,
        "backoff": {"type": "fixed", "delay_ms": 250},
    }
    assert await api.store.call("HGET", keys.core, "required_capabilities") == b"cuda,gpu"
