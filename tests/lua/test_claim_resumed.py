"""ff_claim_resumed_execution (docs/suspension.md#claiming-a-resumed-execution) for executions
paused by a worker delay."""

from __future__ import annotations

import uuid

import pytest

from flowfabric.server.valkey.errors import FlowFabricError
from flowfabric.server.valkey.functions import Claimer, Fence, Functions, NewExecution
from flowfabric.server.valkey.ids import ExecutionId
from flowfabric.server.valkey.keys import ExecKeys, PartitionKeys
from flowfabric.server.valkey.store import Store

LANE = "default"


async def delayed_then_promoted(fn: Functions) -> tuple[ExecutionId, Fence]:
    eid = ExecutionId(5, str(uuid.uuid4()))
    await fn.execution.create_execution(NewExecution(eid, "ns", LANE, "k", b"", 0, "t"))
    who = Claimer("w", "wi-1", LANE)
    await fn.scheduling.issue_claim_grant(eid, who, 5000)
    r = await fn.scheduling.claim_execution(eid, who, str(uuid.uuid4()), 30_000, str(uuid.uuid4()))
    fence = Fence(r.lease_id, r.lease_epoch, r.attempt_id)
    await fn.execution.delay_execution(eid, fence, 1, "lease_holder")  # already due
    assert (await fn.scheduling.promote_delayed(eid, LANE, 10**13)).outcome == "promoted"
    return eid, fence


async def test_resumed_claim_reuses_the_attempt(store: Store) -> None:
    fn = Functions(store)
    eid, old = await delayed_then_promoted(fn)
    who = Claimer("w2", "wi-2", LANE)
    await fn.scheduling.issue_claim_grant(eid, who, 5000)
    with pytest.raises(FlowFabricError) as caught:
        await fn.scheduling.claim_execution(eid, who, str(uuid.uuid4()), 30_000, str(uuid.uuid4()))
    assert caught.value.code == "use_claim_resumed_execution"
    lease_id = str(uuid.uuid4())
    r = await fn.scheduling.claim_resumed_execution(eid, who, lease_id, 30_000)
    assert r.lease_id == lease_id
    assert r.lease_epoch == old.lease_epoch + 1  # new epoch
    assert r.attempt_id == old.attempt_id and r.attempt_index == 0 and r.attempt_type == "resumed"
    core = await store.call("HGETALL", ExecKeys(eid).core)
    assert core[b"lifecycle_phase"] == b"active" and core[b"attempt_state"] == b"running_attempt"
    assert core[b"total_attempt_count"] == b"1"
    attempt = await store.call("HGETALL", ExecKeys(eid).attempt(0))
    assert attempt[b"attempt_state"] == b"started" and attempt[b"resumed_at"] != b""
    p = PartitionKeys(eid.tag)
    assert await store.call("ZSCORE", p.lane(LANE, "eligible"), str(eid)) is None
    assert await store.call("ZSCORE", p.lane(LANE, "active"), str(eid)) is not None
    # the grant was single-use, and the old fence is stale
    with pytest.raises(FlowFabricError) as again:
        await fn.scheduling.claim_resumed_execution(eid, who, str(uuid.uuid4()), 30_000)
    assert again.value.code == "execution_not_leaseable"
    with pytest.raises(FlowFabricError) as stale:
        await fn.execution.complete_execution(eid, old, b"", "", "lease_holder")
    assert stale.value.code == "stale_lease"


async def test_resumed_claim_rejections(store: Store) -> None:
    fn = Functions(store)
    eid = ExecutionId(5, str(uuid.uuid4()))
    who = Claimer("w", "wi-1", LANE)
    with pytest.raises(FlowFabricError) as missing:
        await fn.scheduling.claim_resumed_execution(eid, who, "l", 1000)
    assert missing.value.code == "execution_not_found"
    await fn.execution.create_execution(NewExecution(eid, "ns", LANE, "k", b"", 0, "t"))
    with pytest.raises(FlowFabricError) as never:
        await fn.scheduling.claim_resumed_execution(eid, who, "l", 1000)
    assert never.value.code == "not_a_resumed_execution"
    paused, _ = await delayed_then_promoted(fn)
    await fn.scheduling.issue_claim_grant(paused, Claimer("other", "wi-9", LANE), 5000)
    with pytest.raises(FlowFabricError) as foreign:
        await fn.scheduling.claim_resumed_execution(paused, who, "l", 1000)
    assert foreign.value.code == "invalid_claim_grant"
