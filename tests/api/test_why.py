"""DescribeExecution's `why` (docs/lifecycle.md#why-an-execution-is-not-running): one test per
kind that exists today, each reached through the API (or, for the admission blocks no check
writes yet, through `ff_block_execution_for_admission`), on both topologies. Reading it writes
nothing.
"""

from __future__ import annotations

import asyncio
import uuid

import grpc

from flowfabric.server.engine.scanners import server_time_ms
from flowfabric.server.valkey.functions import Functions
from flowfabric.server.valkey.ids import parse_execution_id
from flowfabric.server.valkey.keys import WORKERS_INDEX, ExecKeys
from flowfabric.v1 import execution_pb2 as pb
from flowfabric.v1 import types_pb2 as t
from flowfabric.v1 import worker_pb2 as wpb
from tests.api import test_flows as flows
from tests.api.suspend_util import suspended
from tests.api.test_lifecycle import (
    LANE,
    WORKER,
    claim_next,
    claim_one,
    complete,
    create,
    fail,
    retry_policy,
)
from tests.api.util import expect_error, keyspace_dump
from tests.conftest import Api

C = grpc.StatusCode
K = pb.WhyNotRunning


async def why(api: Api, eid: str) -> pb.WhyNotRunning:
    reply = await api.execution.DescribeExecution(
        pb.DescribeExecutionRequest(execution_id=eid), metadata=api.metadata
    )
    assert reply.snapshot.execution_id == eid
    return reply.why


async def test_eligible_not_yet_claimed(api: Api) -> None:
    eid = await create(api)
    w = await why(api, eid)
    assert w.kind == K.KIND_WAITING_FOR_WORKER
    assert w.blocking_reason == t.BLOCKING_REASON_WAITING_FOR_WORKER
    assert not w.HasField("eta_at") and w.WhichOneof("detail") is None
    assert LANE in w.summary


async def test_delayed_eta_is_delay_until(api: Api) -> None:
    due = await server_time_ms(api.store) + 3_600_000
    eid = await create(api, delay_until=due)
    w = await why(api, eid)
    assert w.kind == K.KIND_DELAY
    assert w.eta_at == due
    assert w.blocking_reason == t.BLOCKING_REASON_WAITING_FOR_DELAY
    assert str(due) in w.summary


async def test_a_retry_backoff_is_a_delay_until_the_retry(api: Api) -> None:
    backoff = t.Backoff(type="fixed", delay_ms=60_000)
    eid = await create(api, policy=retry_policy(max_retries=2, backoff=backoff))
    task = await claim_one(api)
    reply = await fail(api, task.lease)
    assert reply.WhichOneof("outcome") == "retry_scheduled", reply
    w = await why(api, eid)
    assert w.kind == K.KIND_DELAY
    assert w.blocking_reason == t.BLOCKING_REASON_WAITING_FOR_RETRY_BACKOFF
    assert w.eta_at == reply.retry_scheduled.delay_until and "retry backoff" in w.summary


async def test_running_then_terminal(api: Api) -> None:
    eid = await create(api)
    task = await claim_one(api, "w-run")
    w = await why(api, eid)
    assert w.kind == K.KIND_RUNNING and "w-run" in w.summary
    assert not w.HasField("eta_at")
    await complete(api, task.lease)
    w = await why(api, eid)
    assert w.kind == K.KIND_TERMINAL and "success" in w.summary


async def test_an_expired_lease_is_reclaimable_with_its_expiry(api: Api) -> None:
    eid = await create(api)
    task = await claim_one(api, "w-gone", lease_ttl_ms=1)
    for _ in range(200):  # the lease-expiry scanner is off here: the lease only runs out
        if await server_time_ms(api.store) > task.lease.lease_expires_at:
            break
        await asyncio.sleep(0.01)
    w = await why(api, eid)
    assert w.kind == K.KIND_RECLAIMABLE
    assert w.eta_at == task.lease.lease_expires_at
    assert "w-gone" in w.summary
    # once the expiry is marked (the scanner's function) the answer is the same
    parsed = parse_execution_id(eid, api.server.config.flow_partitions)
    await Functions(api.store).lease.mark_lease_expired_if_due(parsed)
    owner = await api.store.call("HGET", ExecKeys(parsed).core, "ownership_state")
    assert owner == b"lease_expired_reclaimable"
    marked = await why(api, eid)
    assert marked.kind == K.KIND_RECLAIMABLE and marked.eta_at == task.lease.lease_expires_at


async def test_dependencies_name_the_unresolved_upstreams(api: Api) -> None:
    fid, ids = await flows.submit(api, "ABC", [("A", "C"), ("B", "C")])
    await flows.run(api, fid, "A")
    w = await why(api, ids["C"])
    assert w.kind == K.KIND_DEPENDENCIES
    d = w.dependencies
    assert (d.join_kind, d.required, d.total, d.satisfied, d.impossible, d.unresolved) == (
        "all",
        2,
        2,
        1,
        0,
        1,
    )
    assert [u.execution_id for u in d.upstreams] == [ids["B"]]
    assert d.upstreams[0].public_state == t.PUBLIC_STATE_WAITING
    assert d.upstreams[0].edge_id
    assert ids["B"] in w.summary and "waiting" in w.summary


async def test_a_quorum_join_reports_its_k(api: Api) -> None:
    join = flows.pb.Join(kind=flows.pb.Join.KIND_QUORUM, quorum=2)
    _, ids = await flows.submit(
        api, "ABCD", [("A", "D"), ("B", "D"), ("C", "D")], joins={"D": join}
    )
    w = await why(api, ids["D"])
    d = w.dependencies
    assert (d.join_kind, d.required, d.total, d.unresolved) == ("quorum", 2, 3, 3)
    assert sorted(u.execution_id for u in d.upstreams) == sorted(ids[k] for k in "ABC")


async def test_a_member_created_blocked_waits_for_its_release(api: Api) -> None:
    fid = str(uuid.uuid4())
    await flows.flows(api).CreateFlow(
        flows.pb.CreateFlowRequest(flow_id=fid, flow_kind="dag", namespace="ns"),
        metadata=api.metadata,
    )
    eid = await flows.create_member(api, fid, "A", blocked=True)
    w = await why(api, eid)
    assert w.kind == K.KIND_DEPENDENCIES
    assert (w.dependencies.total, w.dependencies.unresolved) == (0, 0)
    assert not w.dependencies.upstreams and "release" in w.summary


async def test_capability_block_names_what_is_missing(api: Api) -> None:
    policy = t.ExecutionPolicy(
        routing_requirements=t.RoutingRequirements(required_capabilities=["gpu", "linux"])
    )
    eid = await create(api, policy=policy)
    await api.worker.RegisterWorker(
        wpb.RegisterWorkerRequest(
            worker_id=WORKER,
            worker_instance_id="cpu-1",
            capabilities=["linux"],
            lane_ids=[LANE],
            lease_ttl_ms=10_000,
        ),
        metadata=api.metadata,
    )
    reply = await claim_next(api, "cpu-1", caps=("linux",))
    assert reply.WhichOneof("outcome") == "no_work"
    w = await why(api, eid)
    assert w.kind == K.KIND_CAPABILITY
    assert w.blocking_reason == t.BLOCKING_REASON_WAITING_FOR_CAPABLE_WORKER
    c = w.capability
    assert list(c.required) == ["gpu", "linux"] and list(c.missing) == ["gpu"]
    assert (c.live_workers, c.capable_workers) == (1, 0)
    assert c.HasField("last_mismatch_at")
    assert "gpu" in w.summary
    # a capable worker registers: the explanation says the unblocker will return it
    await api.worker.RegisterWorker(
        wpb.RegisterWorkerRequest(
            worker_id=WORKER,
            worker_instance_id="gpu-1",
            capabilities=["gpu", "linux"],
            lane_ids=[LANE],
            lease_ttl_ms=10_000,
        ),
        metadata=api.metadata,
    )
    c = (await why(api, eid)).capability
    assert (c.live_workers, c.capable_workers, list(c.missing)) == (2, 1, [])


async def test_suspension_names_its_waitpoint_and_timeout(api: Api) -> None:
    timeout = await server_time_ms(api.store) + 3_600_000
    lease, s = await suspended(api, "review", timeout_at=timeout, timeout_behavior="cancel")
    w = await why(api, lease.execution_id)
    assert w.kind == K.KIND_SUSPENDED
    assert w.eta_at == timeout
    sw = w.suspension
    assert (sw.waitpoint_id, sw.suspension_id) == (s.waitpoint_id, s.suspension_id)
    assert (sw.timeout_at, sw.timeout_behavior, sw.reason_code) == (
        timeout,
        "cancel",
        "waiting_for_signal",
    )
    assert sw.suspended_at > 0
    assert s.waitpoint_id in w.summary


async def test_suspension_without_timeout_has_no_eta(api: Api) -> None:
    lease, _ = await suspended(api, "review")
    w = await why(api, lease.execution_id)
    assert w.kind == K.KIND_SUSPENDED
    assert not w.HasField("eta_at") and not w.suspension.HasField("timeout_at")


async def test_a_manual_pause_is_a_suspension_for_an_operator(api: Api) -> None:
    lease, _ = await suspended(api, "go", reason_code="manual_pause")
    w = await why(api, lease.execution_id)
    assert w.kind == K.KIND_SUSPENDED
    assert w.blocking_reason == t.BLOCKING_REASON_PAUSED_BY_OPERATOR
    assert w.suspension.reason_code == "manual_pause" and "operator" in w.summary


async def _blocked(api: Api, reason: str, detail: str, **create_fields: object) -> str:
    eid = await create(api, **create_fields)
    parsed = parse_execution_id(eid, api.server.config.flow_partitions)
    await Functions(api.store).admission.block_execution(parsed, reason, detail)
    return eid


async def test_budget_block_carries_the_stored_detail(api: Api) -> None:
    detail = "budget b-1: total_tokens 100/100"
    policy = t.ExecutionPolicy(budget_ids=["b-1", "b-2"])
    eid = await _blocked(api, "waiting_for_budget", detail, policy=policy)
    w = await why(api, eid)
    assert w.kind == K.KIND_BUDGET
    assert w.blocking_reason == t.BLOCKING_REASON_WAITING_FOR_BUDGET
    assert (list(w.budget.budget_ids), w.budget.detail) == (["b-1", "b-2"], detail)
    assert w.blocking_detail == detail and detail in w.summary
    assert not w.HasField("eta_at")


async def test_quota_rate_and_concurrency_blocks(api: Api) -> None:
    detail = "quota q-1: rate limit 2/2 per 60s window; retry_at 1900000000000"
    rate = await _blocked(api, "waiting_for_quota", detail, quota_policy_id="q-1")
    w = await why(api, rate)
    assert w.kind == K.KIND_QUOTA_RATE
    assert w.quota.quota_policy_id == "q-1" and "rate limit" in w.quota.detail
    assert w.eta_at == 1_900_000_000_000
    cap = await _blocked(api, "waiting_for_quota", "quota q-1: concurrency cap 3")
    w = await why(api, cap)
    assert w.kind == K.KIND_QUOTA_CONCURRENCY and not w.HasField("eta_at")
    assert w.quota.detail == "quota q-1: concurrency cap 3"


async def test_operator_and_policy_pauses(api: Api) -> None:
    op = await _blocked(api, "paused_by_operator", "held for review")
    w = await why(api, op)
    assert w.kind == K.KIND_OPERATOR_PAUSE and "held for review" in w.summary
    lane = await _blocked(api, "paused_by_policy", "")
    assert (await why(api, lane)).kind == K.KIND_LANE_PAUSED


async def test_reading_it_writes_nothing(api: Api) -> None:
    policy = t.ExecutionPolicy(
        routing_requirements=t.RoutingRequirements(required_capabilities=["gpu"])
    )
    eid = await create(api, policy=policy)
    assert (await claim_next(api, "cpu-1")).WhichOneof("outcome") == "no_work"
    _, ids = await flows.submit(api, "AB", [("A", "B")])
    await api.store.call("SADD", WORKERS_INDEX, "stale-instance")  # an entry past its TTL
    before = await keyspace_dump(api.store)
    for subject in (eid, ids["B"], ids["A"]):
        await why(api, subject)
    assert await keyspace_dump(api.store) == before


async def test_bad_input_is_describes_errors(api: Api) -> None:
    unknown = (
        str(parse_execution_id(await create(api), 1 << 16).tag)
        + ":"
        + ("00000000-0000-4000-8000-000000000000")
    )
    await expect_error(why(api, unknown), C.NOT_FOUND, "execution_not_found")
    await expect_error(why(api, "nope"), C.INVALID_ARGUMENT, "invalid_input")
