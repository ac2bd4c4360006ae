"""CompleteExecutions: several completions in one call, each handled exactly as a
CompleteExecution (validation, fencing, replay reconciliation), one result per item in request
order; a bad batch as a whole is refused and changes nothing (both topologies)."""

from __future__ import annotations

import grpc

from flowfabric.server import limits
from flowfabric.v1 import execution_pb2 as pb
from flowfabric.v1 import types_pb2 as t
from flowfabric.v1 import worker_pb2 as wpb
from tests.api.test_lifecycle import (
    claim_one,
    complete,
    core,
    create,
    describe,
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
