"""CompleteExecutions: several completions in one call, each handled exactly as a
CompleteExecution (validation, fencing, replay reconciliation), one result per item in request
order; a bad batch as a whole is refused and changes nothing (both topologies). With `claim`
the call then claims new work as ClaimNext (wait_ms 0) would, after the completions."""

from __future__ import annotations

import grpc
import pytest

from flowfabric.server.api import limits
from flowfabric.server.valkey.errors import FlowFabricError
from flowfabric.v1 import execution_pb2 as pb
from flowfabric.v1 import types_pb2 as t
from flowfabric.v1 import worker_pb2 as wpb
from tests.api.test_lifecycle import (
    LANE,
    WORKER,
    claim_one,
    complete,
    core,
    create,
    describe,
    get,
    result_of,
    state,
    with_epoch,
)
from tests.api.util import expect_error, keyspace_size
from tests.conftest import Api

C = grpc.StatusCode


def item(lease: t.LeaseHandle, payload: bytes = b"ok") -> wpb.CompleteExecutionRequest:
    return wpb.CompleteExecutionRequest(lease=lease, result_payload=payload)


async def complete_batch(
    api: Api, items: list[wpb.CompleteExecutionRequest]
) -> list[wpb.CompleteExecutionsResponse.Result]:
    reply = await api.worker.CompleteExecutions(
        wpb.CompleteExecutionsRequest(items=items), metadata=api.metadata
    )
    return list(reply.results)


async def test_mixed_items_each_get_the_single_calls_outcome_in_order(api: Api) -> None:
    fresh = await create(api)
    h_fresh = (await claim_one(api)).lease
    stale = await create(api)
    h_stale = (await claim_one(api)).lease
    cancelled = await create(api)
    h_cancelled = (await claim_one(api)).lease
    await api.execution.CancelExecution(
        pb.CancelExecutionRequest(execution_id=cancelled, reason="operator"),
        metadata=api.metadata,
    )
    done_before = await create(api)
    h_done = (await claim_one(api)).lease
    assert not (await complete(api, h_done, b"first")).replayed
    too_big = await create(api)
    h_big = (await claim_one(api)).lease
    huge = b"x" * (limits.CREATE_REQUEST_MAX + 1)

    results = await complete_batch(
        api,
        [
            item(h_fresh, b"r-fresh"),
            item(with_epoch(h_stale, h_stale.lease_epoch + 1)),
            item(h_cancelled),
            item(h_done, b"first"),
            wpb.CompleteExecutionRequest(
                execution_id=fresh, source=t.CANCEL_SOURCE_LEASE_HOLDER
            ),  # unfenced as a lease holder: refused before anything runs
            item(h_big, huge),
        ],
    )

    assert [r.execution_id for r in results] == [fresh, stale, cancelled, done_before, fresh,
                                                 too_big]  # fmt: skip
    ok, fenced_out, not_active, replayed, unfenced, oversized = results
    assert ok.WhichOneof("outcome") == "completed" and not ok.completed.replayed
    assert ok.completed.completed.execution_id == fresh
    assert ok.completed.completed.public_state == t.PUBLIC_STATE_COMPLETED
    assert await result_of(api, fresh) == b"r-fresh"

    assert fenced_out.WhichOneof("outcome") == "error"
    assert (fenced_out.error.code, fenced_out.error.reason) == (C.ABORTED.value[0], "stale_lease")
    assert await state(api, stale) == t.PUBLIC_STATE_ACTIVE
    assert (await describe(api, stale)).current_lease.lease_epoch == h_stale.lease_epoch

    assert not_active.WhichOneof("outcome") == "error"
    assert not_active.error.code == C.FAILED_PRECONDITION.value[0]
    assert not_active.error.reason == "execution_not_active"
    assert not_active.error.metadata["terminal_outcome"] == "cancelled"
    assert not_active.error.metadata["attempt_id"] == h_cancelled.attempt_id
    assert await state(api, cancelled) == t.PUBLIC_STATE_CANCELLED

    assert replayed.WhichOneof("outcome") == "completed" and replayed.completed.replayed
    assert replayed.completed.completed.public_state == t.PUBLIC_STATE_COMPLETED
    assert await result_of(api, done_before) == b"first"

    assert unfenced.WhichOneof("outcome") == "error"
    assert unfenced.error.code == C.INVALID_ARGUMENT.value[0]
    assert unfenced.error.reason == "fence_required"

    assert oversized.WhichOneof("outcome") == "error"
    assert oversized.error.code == C.INVALID_ARGUMENT.value[0]
    assert oversized.error.reason == "payload_too_large"
    assert oversized.error.metadata["limit_bytes"] == str(limits.CREATE_REQUEST_MAX)
    assert await state(api, too_big) == t.PUBLIC_STATE_ACTIVE
    # the stale holder's rightful lease still completes on its own
    assert not (await complete(api, h_stale)).replayed
    assert not (await complete(api, h_big)).replayed


async def test_the_same_completion_twice_in_one_batch_commits_once(api: Api) -> None:
    eid = await create(api)
    h = (await claim_one(api)).lease
    results = await complete_batch(api, [item(h, b"once"), item(h, b"once")])
    assert [r.WhichOneof("outcome") for r in results] == ["completed", "completed"]
    assert sorted(r.completed.replayed for r in results) == [False, True]
    assert await result_of(api, eid) == b"once"
    assert (await core(api, eid))[b"public_state"] == b"completed"


async def test_many_items_complete_in_order(api: Api) -> None:
    ids = [await create(api) for _ in range(20)]
    leases = {h.execution_id: h for h in [(await claim_one(api)).lease for _ in ids]}
    order = list(reversed(ids))
    results = await complete_batch(api, [item(leases[e], e.encode()) for e in order])
    assert [r.execution_id for r in results] == order
    assert all(r.WhichOneof("outcome") == "completed" for r in results)
    assert not any(r.completed.replayed for r in results)
    for eid in ids:
        assert await result_of(api, eid) == eid.encode()


async def test_an_empty_or_oversized_batch_is_refused_and_changes_nothing(api: Api) -> None:
    await create(api)
    h = (await claim_one(api)).lease
    before = await keyspace_size(api.store), await core(api, h.execution_id)
    info = await expect_error(complete_batch(api, []), C.INVALID_ARGUMENT, "invalid_input")
    assert info.metadata["field"] == "items"
    info = await expect_error(
        complete_batch(api, [item(h)] * 1001), C.INVALID_ARGUMENT, "invalid_input"
    )
    assert info.metadata["field"] == "items"
    assert (await keyspace_size(api.store), await core(api, h.execution_id)) == before
    assert await state(api, h.execution_id) == t.PUBLIC_STATE_ACTIVE


def claim(max_tasks: int = 0, caps: tuple[str, ...] = (), **fields: object) -> wpb.ClaimNextRequest:
    return wpb.ClaimNextRequest(
        worker_id=WORKER,
        worker_instance_id="w-2",
        lane_ids=[LANE],
        capabilities=list(caps),
        lease_ttl_ms=30_000,
        max_tasks=max_tasks,
        **fields,  # type: ignore[arg-type]
    )


async def complete_and_claim(
    api: Api, items: list[wpb.CompleteExecutionRequest], request: wpb.ClaimNextRequest
) -> wpb.CompleteExecutionsResponse:
    reply: wpb.CompleteExecutionsResponse = await api.worker.CompleteExecutions(
        wpb.CompleteExecutionsRequest(items=items, claim=request), metadata=api.metadata
    )
    return reply


async def test_a_claim_runs_after_the_completions_and_respects_max_tasks(api: Api) -> None:
    first = await create(api)
    h = (await claim_one(api)).lease
    waiting = [await create(api) for _ in range(3)]

    reply = await complete_and_claim(api, [item(h, b"done")], claim(max_tasks=2))

    assert [r.WhichOneof("outcome") for r in reply.results] == ["completed"]
    assert await result_of(api, first) == b"done"
    assert not reply.HasField("claim_error")
    assert [c.lease.execution_id for c in reply.claimed] == waiting[:2]  # FIFO, at most 2
    for task in reply.claimed:
        assert task.lease.worker_instance_id == "w-2" and task.lease.lease_epoch >= 1
        assert task.execution_kind == "demo"
        assert await state(api, task.lease.execution_id) == t.PUBLIC_STATE_ACTIVE
    assert await state(api, waiting[2]) == t.PUBLIC_STATE_WAITING
    # the claimed leases are ordinary leases: they complete like any other
    again = await complete_and_claim(api, [item(c.lease) for c in reply.claimed], claim())
    assert [r.WhichOneof("outcome") for r in again.results] == ["completed", "completed"]
    assert [c.lease.execution_id for c in again.claimed] == [waiting[2]]  # max_tasks 0 = one


async def test_a_claim_matches_capabilities_as_claim_next_does(api: Api) -> None:
    policy = t.ExecutionPolicy(
        routing_requirements=t.RoutingRequirements(required_capabilities=["gpu"])
    )
    await create(api)
    h = (await claim_one(api)).lease
    gpu = await create(api, policy=policy, priority=9)
    cpu = await create(api, priority=1)

    reply = await complete_and_claim(api, [item(h)], claim(max_tasks=4, caps=("cpu",)))
    assert [r.WhichOneof("outcome") for r in reply.results] == ["completed"]
    assert [c.lease.execution_id for c in reply.claimed] == [cpu]
    info = await get(api, gpu)  # not claimed: moved out of the way, as by ClaimNext
    assert info.state_vector.eligibility_state == t.ELIGIBILITY_STATE_BLOCKED_BY_ROUTE

    gpu2 = await create(api, policy=policy)
    reply = await complete_and_claim(
        api, [item(reply.claimed[0].lease)], claim(max_tasks=4, caps=("gpu",))
    )
    assert [r.WhichOneof("outcome") for r in reply.results] == ["completed"]
    assert gpu2 in [c.lease.execution_id for c in reply.claimed]

    # nothing left to claim: the completions alone
    h3 = reply.claimed[0].lease
    reply = await complete_and_claim(api, [item(h3)], claim(max_tasks=4, caps=("cpu",)))
    assert [r.WhichOneof("outcome") for r in reply.results] == ["completed"]
    assert list(reply.claimed) == [] and not reply.HasField("claim_error")


async def test_a_bad_claim_is_refused_before_any_completion(api: Api) -> None:
    await create(api)
    h = (await claim_one(api)).lease
    await create(api)
    before = await keyspace_size(api.store), await core(api, h.execution_id)
    for bad, field in [
        (claim(wait_ms=10), "claim.wait_ms"),
        (claim(max_tasks=101), "claim.max_tasks"),
        (wpb.ClaimNextRequest(worker_id=WORKER, worker_instance_id="w-2"), "lane_ids"),
        (wpb.ClaimNextRequest(worker_id=WORKER, lane_ids=[LANE]), "worker_instance_id"),
    ]:
        info = await expect_error(
            complete_and_claim(api, [item(h)], bad), C.INVALID_ARGUMENT, "invalid_input"
        )
        assert info.metadata["field"] == field
    assert (await keyspace_size(api.store), await core(api, h.execution_id)) == before
    assert await state(api, h.execution_id) == t.PUBLIC_STATE_ACTIVE


async def test_a_failed_claim_is_reported_and_the_completions_stand(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    eid = await create(api)
    h = (await claim_one(api)).lease
    waiting = await create(api)

    async def unavailable(*_: object) -> list[object]:
        raise FlowFabricError("backend_unavailable", message="injected", retry_after_ms=1000)

    assert api.server.scheduler is not None
    monkeypatch.setattr(api.server.scheduler, "claim_next", unavailable)
    reply = await complete_and_claim(api, [item(h, b"kept")], claim(max_tasks=2))
    monkeypatch.undo()

    assert [r.WhichOneof("outcome") for r in reply.results] == ["completed"]
    assert await result_of(api, eid) == b"kept"
    assert (await core(api, eid))[b"public_state"] == b"completed"
    assert list(reply.claimed) == []
    assert reply.claim_error.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert reply.claim_error.reason == "backend_unavailable"
    assert await state(api, waiting) == t.PUBLIC_STATE_WAITING
