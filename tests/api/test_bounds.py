"""Every input bounded before any write, over gRPC (docs/architecture.md#limits): each bounded
field of each RPC one past its bound is INVALID_ARGUMENT naming the field, and the keyspace is
exactly as before; the values at the bound are accepted. Also the regressions of the fault run:
huge lease TTLs, thousands of tags, near-2^64 waitpoint timeouts, huge registry TTLs, policy JSON
of the wrong shape, and every documented fence form."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest

from flowfabric.server.valkey import bounds
from flowfabric.server.valkey.ids import parse_execution_id
from flowfabric.server.valkey.keys import ExecKeys, WaitpointKeys
from flowfabric.v1 import execution_pb2 as pb
from flowfabric.v1 import signal_pb2 as spb
from flowfabric.v1 import types_pb2 as t
from flowfabric.v1 import worker_pb2 as wpb
from tests.api.suspend_util import LANE, create, started
from tests.api.util import expect_error, keyspace_dump
from tests.conftest import Api

C = grpc.StatusCode
U64 = 2**64 - 1
HUGE = 2**63
YEAR = bounds.HORIZON_MS.hi
W = {"worker_id": "w", "worker_instance_id": "w-1"}


async def refused(api: Api, call: Awaitable[Any], field: str, reason: str = "invalid_input") -> str:
    """`call` fails INVALID_ARGUMENT `reason` naming `field` and changes nothing in the store."""
    before = await keyspace_dump(api.store)
    info = await expect_error(call, C.INVALID_ARGUMENT, reason)
    named = info.metadata.get("field", "") + info.metadata.get("detail", "")
    assert field in named, info
    assert await keyspace_dump(api.store) == before, "a refused call writes nothing"
    return named


def _soon() -> int:
    """A minute from now by this machine's clock (close enough to Valkey's for a delay)."""
    return int(time.time() * 1000) + 60_000


def fence_of(h: t.LeaseHandle) -> t.LeaseFence:
    return t.LeaseFence(lease_id=h.lease_id, lease_epoch=h.lease_epoch, attempt_id=h.attempt_id)


async def state(api: Api, eid: str) -> int:
    reply = await api.execution.GetExecutionState(
        pb.GetExecutionStateRequest(execution_id=eid), metadata=api.metadata
    )
    return int(reply.public_state)


# -- 1: lease TTLs and every other duration -------------------------------------------------------


@pytest.mark.parametrize("ttl", [HUGE, 10**15, bounds.LEASE_TTL_MS.hi + 1])
async def test_claim_next_refuses_a_huge_lease_ttl_before_any_lease(api: Api, ttl: int) -> None:
    eid = await create(api)
    req = wpb.ClaimNextRequest(**W, lane_ids=[LANE], lease_ttl_ms=ttl)
    await refused(api, api.worker.ClaimNext(req, metadata=api.metadata), "lease_ttl_ms")
    assert await state(api, eid) == t.PUBLIC_STATE_WAITING
    ok = wpb.ClaimNextRequest(**W, lane_ids=[LANE], lease_ttl_ms=bounds.LEASE_TTL_MS.hi)
    reply = await api.worker.ClaimNext(ok, metadata=api.metadata)
    assert reply.task.lease.lease_ttl_ms == bounds.LEASE_TTL_MS.hi


Case = tuple[str, str, Callable[[Api, t.LeaseHandle], Awaitable[Any]]]


def _rpc(service: str, name: str, msg: Any) -> Callable[[Api, t.LeaseHandle], Awaitable[Any]]:
    """Call `name` on `service` with `msg` (a message, or a function of the lease handle)."""

    def go(api: Api, h: t.LeaseHandle) -> Awaitable[Any]:
        req = msg(h) if callable(msg) else msg
        return getattr(getattr(api, service), name)(req, metadata=api.metadata)  # type: ignore[no-any-return]

    return go


def _cases() -> list[Case]:
    w, e, s = "worker", "execution", "signal"
    lanes = [f"l{i}" for i in range(bounds.LANES.hi + 1)]
    wr, er, sr = wpb, pb, spb

    def sig(**more: Any) -> Callable[[t.LeaseHandle], Any]:
        return lambda h: sr.DeliverSignalRequest(
            execution_id=h.execution_id, waitpoint_id=str(uuid.uuid4()), signal_name="go", **more
        )

    return [
        ("lease_ttl_ms", "ClaimFromGrant", _rpc(w, "ClaimFromGrant",
            lambda h: wr.ClaimFromGrantRequest(**W, lane_id=LANE, lease_ttl_ms=HUGE,
                                               grant=t.ClaimGrant(execution_id=h.execution_id)))),
        ("grant_ttl_ms", "ClaimNext", _rpc(w, "ClaimNext", wr.ClaimNextRequest(
            **W, lane_ids=[LANE], grant_ttl_ms=bounds.GRANT_TTL_MS.hi + 1))),
        ("grant_ttl_ms", "ClaimForWorker", _rpc(w, "ClaimForWorker", wr.ClaimForWorkerRequest(
            **W, lane_id=LANE, grant_ttl_ms=U64))),
        ("lane_ids", "ClaimNext", _rpc(w, "ClaimNext", wr.ClaimNextRequest(**W, lane_ids=lanes))),
        ("lane_ids", "RegisterWorker", _rpc(w, "RegisterWorker", wr.RegisterWorkerRequest(
            **W, lane_ids=lanes))),
        ("lease_ttl_ms", "RegisterWorker", _rpc(w, "RegisterWorker", wr.RegisterWorkerRequest(
            **W, lease_ttl_ms=U64))),
        ("lease_ttl_ms", "Heartbeat", _rpc(w, "Heartbeat", wr.HeartbeatRequest(
            **W, lease_ttl_ms=U64))),
        ("lease_ttl_ms", "RenewLease", _rpc(w, "RenewLease", lambda h: wr.RenewLeaseRequest(
            lease=h, lease_ttl_ms=10**15))),
        ("lease.lease_ttl_ms", "RenewLease", _rpc(w, "RenewLease", lambda h: wr.RenewLeaseRequest(
            lease=t.LeaseHandle(**{**_handle(h), "lease_ttl_ms": HUGE})))),
        ("lease_history_grace_ms", "RenewLease", _rpc(w, "RenewLease",
            lambda h: wr.RenewLeaseRequest(lease=h, lease_history_grace_ms=U64))),
        ("expires_in_ms", "CreatePendingWaitpoint", _rpc(w, "CreatePendingWaitpoint",
            lambda h: wr.CreatePendingWaitpointRequest(lease=h, expires_in_ms=U64))),
        ("timeout_in_ms", "Suspend", _rpc(w, "Suspend", lambda h: wr.SuspendRequest(
            lease=h, timeout_in_ms=U64))),
        ("timeout_at", "Suspend", _rpc(w, "Suspend", lambda h: wr.SuspendRequest(
            lease=h, timeout_at=HUGE - 1))),
        ("retry_after_ms", "FailExecution", _rpc(w, "FailExecution",
            lambda h: wr.FailExecutionRequest(lease=h, failure_reason="x", retry_after_ms=U64))),
        ("delay_until", "DelayExecution", _rpc(w, "DelayExecution",
            lambda h: wr.DelayExecutionRequest(lease=h, delay_until=HUGE - 1))),
        ("retention_maxlen", "AppendFrame", _rpc(w, "AppendFrame", lambda h: wr.AppendFrameRequest(
            lease=h, frame_type="log", retention_maxlen=2**32 - 1))),
        ("timestamp", "AppendFrame", _rpc(w, "AppendFrame", lambda h: wr.AppendFrameRequest(
            lease=h, frame_type="log", timestamp=-1))),
        ("resume_delay_ms", "ResumeExecution", _rpc(e, "ResumeExecution",
            lambda h: er.ResumeExecutionRequest(execution_id=h.execution_id, resume_delay_ms=U64))),
        ("delay_until", "CreateExecution", _rpc(e, "CreateExecution", er.CreateExecutionRequest(
            execution_kind="k", lane_id=LANE, delay_until=HUGE - 1))),
        ("execution_deadline_at", "CreateExecution", _rpc(e, "CreateExecution",
            er.CreateExecutionRequest(execution_kind="k", execution_deadline_at=-5))),
        ("namespace", "CreateExecution", _rpc(e, "CreateExecution", er.CreateExecutionRequest(
            execution_kind="k", namespace="n" * (bounds.LABEL_BYTES.hi + 1)))),
        ("input_payload", "CreateExecution", _rpc(e, "CreateExecution", er.CreateExecutionRequest(
            execution_kind="k", policy_json="{}" + " " * 70_000))),
        ("result_payload", "CompleteExecution", _rpc(w, "CompleteExecution",
            lambda h: wr.CompleteExecutionRequest(lease=h, result_encoding="e" * 70_000))),
        ("dedup_ttl_ms", "DeliverSignal", _rpc(s, "DeliverSignal", sig(dedup_ttl_ms=U64))),
        ("resume_delay_ms", "DeliverSignal", _rpc(s, "DeliverSignal", sig(resume_delay_ms=U64))),
        ("signal_maxlen", "DeliverSignal", _rpc(s, "DeliverSignal", sig(signal_maxlen=U64))),
    ]  # fmt: skip


def _handle(h: t.LeaseHandle) -> dict[str, Any]:
    return {f.name: getattr(h, f.name) for f in t.LeaseHandle.DESCRIPTOR.fields}


@pytest.mark.parametrize(
    ("field", "rpc", "call"), _cases(), ids=lambda v: v if isinstance(v, str) else ""
)
async def test_every_bounded_field_is_refused_before_any_write(
    api: Api, field: str, rpc: str, call: Callable[[Api, t.LeaseHandle], Awaitable[Any]]
) -> None:
    h = await started(api)
    await refused(api, call(api, h), field)
    renewed = await api.worker.RenewLease(wpb.RenewLeaseRequest(lease=h), metadata=api.metadata)
    assert renewed.WhichOneof("outcome") == "renewed", "the lease is still held"


async def test_times_past_the_horizon_are_refused_by_the_function(api: Api) -> None:
    """Absolute times are epoch ms at the edge; their horizon from now is the function's."""
    h = await started(api)
    from flowfabric.server.engine.scanners import server_time_ms

    far = await server_time_ms(api.store) + YEAR + 60_000
    delay = wpb.DelayExecutionRequest(lease=h, delay_until=far)
    await refused(api, api.worker.DelayExecution(delay, metadata=api.metadata), "delay_until")
    susp = wpb.SuspendRequest(lease=h, timeout_at=far)
    await refused(api, api.worker.Suspend(susp, metadata=api.metadata), "timeout_at")
    create_req = pb.CreateExecutionRequest(execution_kind="k", lane_id=LANE, delay_until=far)
    await refused(api, api.execution.CreateExecution(create_req, metadata=api.metadata),
                  "delay_until")  # fmt: skip


async def test_renew_leases_items_are_bounded_one_by_one(api: Api) -> None:
    h = await started(api)
    req = wpb.RenewLeasesRequest(renewals=[
        wpb.RenewLeaseRequest(lease=h, lease_ttl_ms=HUGE), wpb.RenewLeaseRequest(lease=h),
    ])  # fmt: skip
    reply = await api.worker.RenewLeases(req, metadata=api.metadata)
    bad, good = reply.results
    assert bad.error.reason == "invalid_input" and "lease_ttl_ms" in bad.error.message
    assert good.WhichOneof("outcome") == "renewed"


async def test_stream_work_refuses_a_huge_lease_ttl(api: Api) -> None:
    await create(api)
    req = wpb.StreamWorkRequest(**W, lane_ids=[LANE], lease_ttl_ms=HUGE)

    async def first() -> Any:
        async for item in api.worker.StreamWork(req, metadata=api.metadata):
            return item
        return None

    await refused(api, first(), "lease_ttl_ms")


# -- 2: tags and other maps -------------------------------------------------------------------


async def test_create_with_thousands_of_tags_is_refused_whole(api: Api) -> None:
    tags = {f"app.t{i}": "v" for i in range(4000)}
    req = pb.CreateExecutionRequest(execution_kind="k", lane_id=LANE, tags=tags)
    await refused(api, api.execution.CreateExecution(req, metadata=api.metadata), "tags")
    at_bound = {f"app.t{i}": "v" for i in range(bounds.TAGS.hi)}
    eid = await create(api, tags=at_bound)
    tags_key = ExecKeys(parse_execution_id(eid, api.server.config.flow_partitions)).tags
    assert await api.store.call("HLEN", tags_key) == bounds.TAGS.hi


async def test_set_execution_tags_bounds(api: Api) -> None:
    eid = await create(api, tags={f"app.t{i}": "v" for i in range(bounds.TAGS.hi)})
    more = pb.SetExecutionTagsRequest(execution_id=eid, tags={"app.extra": "v"})
    await refused(api, api.execution.SetExecutionTags(more, metadata=api.metadata), "tags")
    big = pb.SetExecutionTagsRequest(execution_id=eid, tags={"app.t0": "v" * 5000})
    await refused(api, api.execution.SetExecutionTags(big, metadata=api.metadata), "tags")


# -- 3: waitpoint timeouts, and reads of values stored past the bounds ---------------------------


async def test_waitpoint_reads_survive_a_stored_timeout_past_the_bounds(api: Api) -> None:
    """A record an older version wrote with a near-2^64 expiry still reads (clamped)."""
    h = await started(api)
    created = await api.worker.CreatePendingWaitpoint(
        wpb.CreatePendingWaitpointRequest(lease=h, expires_in_ms=60_000), metadata=api.metadata
    )
    wpid = created.created.waitpoint_id
    eid = parse_execution_id(h.execution_id, api.server.config.flow_partitions)
    await api.store.call(
        "HSET", WaitpointKeys(eid.tag, wpid).waitpoint, "expires_at", str(2**64 + 5)
    )
    listed = await api.signal.ListPendingWaitpoints(
        spb.ListPendingWaitpointsRequest(execution_id=h.execution_id), metadata=api.metadata
    )
    assert [w.waitpoint_id for w in listed.waitpoints] == [wpid]
    assert listed.waitpoints[0].expires_at == 2**63 - 1


# -- 4: the worker registry ------------------------------------------------------------------


async def test_registry_ttls_at_the_bound_are_accepted(api: Api) -> None:
    ttl = bounds.LEASE_TTL_MS.hi
    reg = await api.worker.RegisterWorker(
        wpb.RegisterWorkerRequest(**W, lease_ttl_ms=ttl), metadata=api.metadata
    )
    assert reg.heartbeat_interval_ms == ttl // 3
    beat = await api.worker.Heartbeat(
        wpb.HeartbeatRequest(**W, lease_ttl_ms=ttl), metadata=api.metadata
    )
    assert beat.expires_at >= reg.expires_at


# -- 5: every documented fence form ---------------------------------------------------------


def _fenced_calls() -> list[tuple[str, Callable[[Api, t.LeaseHandle], Awaitable[Any]], str]]:
    def go(name: str, build: Callable[[t.LeaseHandle], Any]) -> Any:
        def call(api: Api, h: t.LeaseHandle) -> Awaitable[Any]:
            return getattr(api.worker, name)(build(h), metadata=api.metadata)  # type: ignore[no-any-return]

        return call

    def msg(h: t.LeaseHandle) -> dict[str, Any]:
        return {"execution_id": h.execution_id, "fence": fence_of(h)}

    def loose(h: t.LeaseHandle) -> dict[str, Any]:
        return {"execution_id": h.execution_id, "lease_id": h.lease_id,
                "lease_epoch": h.lease_epoch, "attempt_id": h.attempt_id}  # fmt: skip

    return [
        ("RenewLease", go("RenewLease", lambda h: wpb.RenewLeaseRequest(**msg(h))), "renewed"),
        ("CompleteExecution", go("CompleteExecution",
            lambda h: wpb.CompleteExecutionRequest(**msg(h))), "completed"),
        ("FailExecution", go("FailExecution",
            lambda h: wpb.FailExecutionRequest(**msg(h), failure_reason="x")), "terminal_failed"),
        ("CancelLeasedExecution", go("CancelLeasedExecution",
            lambda h: wpb.CancelLeasedExecutionRequest(**msg(h), reason="r")), "cancelled"),
        ("DelayExecution", go("DelayExecution",
            lambda h: wpb.DelayExecutionRequest(**msg(h), delay_until=_soon())), "delayed"),
        ("MoveToWaitingChildren", go("MoveToWaitingChildren",
            lambda h: wpb.MoveToWaitingChildrenRequest(**msg(h))), "moved"),
        ("Suspend", go("Suspend",
            lambda h: wpb.SuspendRequest(**msg(h), timeout_in_ms=60_000)), "suspended"),
        ("UpdateProgress", go("UpdateProgress",
            lambda h: wpb.UpdateProgressRequest(**loose(h), progress_pct=5)), "updated"),
        ("AppendFrame", go("AppendFrame",
            lambda h: wpb.AppendFrameRequest(**loose(h), frame_type="log", payload=b"x")),
            "appended"),
        ("CreatePendingWaitpoint", go("CreatePendingWaitpoint",
            lambda h: wpb.CreatePendingWaitpointRequest(**loose(h), expires_in_ms=60_000)),
            "created"),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("rpc", "call", "outcome"), _fenced_calls(), ids=lambda v: v if isinstance(v, str) else ""
)
async def test_the_fence_form_works(
    api: Api, rpc: str, call: Callable[[Api, t.LeaseHandle], Awaitable[Any]], outcome: str
) -> None:
    h = await started(api)
    reply = await call(api, h)
    assert reply.WhichOneof("outcome") == outcome, reply


async def test_cancel_leased_fence_form_refuses_a_partial_or_stale_fence(api: Api) -> None:
    h = await started(api)
    partial = t.LeaseFence(lease_id=h.lease_id, attempt_id=h.attempt_id)
    req = wpb.CancelLeasedExecutionRequest(execution_id=h.execution_id, fence=partial)
    before = await keyspace_dump(api.store)
    await expect_error(
        api.worker.CancelLeasedExecution(req, metadata=api.metadata),
        C.INVALID_ARGUMENT, "partial_fence_triple",
    )  # fmt: skip
    stale = t.LeaseFence(lease_id=str(uuid.uuid4()), lease_epoch=h.lease_epoch,
                         attempt_id=h.attempt_id)  # fmt: skip
    req = wpb.CancelLeasedExecutionRequest(execution_id=h.execution_id, fence=stale)
    await expect_error(
        api.worker.CancelLeasedExecution(req, metadata=api.metadata), C.ABORTED, "stale_lease"
    )
    assert await keyspace_dump(api.store) == before
    ok = wpb.CancelLeasedExecutionRequest(execution_id=h.execution_id, fence=fence_of(h))
    reply = await api.worker.CancelLeasedExecution(ok, metadata=api.metadata)
    assert reply.cancelled.public_state == t.PUBLIC_STATE_CANCELLED
    again = await api.worker.CancelLeasedExecution(ok, metadata=api.metadata)
    assert again.replayed


# -- 6: policy JSON ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "path"),
    [
        ({"retry_policy": {"max_retries": "two"}}, "retry_policy.max_retries must be an integer"),
        ({"retry_policy": {"max_retries": -1}}, "retry_policy.max_retries"),
        ({"max_retries": 2}, "max_retries is not a known policy field"),
        ({"timeout_policy": {"attempt_timeout_ms": 10**15}}, "timeout_policy.attempt_timeout_ms"),
        ({"stream_policy": {"retention_maxlen": 10**9}}, "stream_policy.retention_maxlen"),
    ],
)
async def test_create_refuses_a_policy_off_its_schema(
    api: Api, policy: dict[str, Any], path: str
) -> None:
    req = pb.CreateExecutionRequest(
        execution_kind="k", lane_id=LANE, policy_json=json.dumps(policy)
    )
    named = await refused(
        api, api.execution.CreateExecution(req, metadata=api.metadata), path, "invalid_policy_json"
    )
    assert path in named


async def test_create_refuses_a_policy_message_over_its_bounds(api: Api) -> None:
    policy = t.ExecutionPolicy(retry_policy=t.RetryPolicy(max_retries=5000))
    req = pb.CreateExecutionRequest(execution_kind="k", lane_id=LANE, policy=policy)
    await refused(api, api.execution.CreateExecution(req, metadata=api.metadata),
                  "retry_policy.max_retries", "invalid_policy_json")  # fmt: skip


async def test_fail_refuses_a_bad_retry_policy_and_keeps_the_lease(api: Api) -> None:
    h = await started(api)
    bad = json.dumps({"max_retries": "two"})
    req = wpb.FailExecutionRequest(lease=h, failure_reason="x", retry_policy_json=bad)
    await refused(api, api.worker.FailExecution(req, metadata=api.metadata),
                  "retry_policy.max_retries", "invalid_policy_json")  # fmt: skip
    good = json.dumps({"max_retries": 2, "backoff": {"type": "fixed", "delay_ms": 1}})
    req = wpb.FailExecutionRequest(lease=h, failure_reason="x", retry_policy_json=good)
    reply = await api.worker.FailExecution(req, metadata=api.metadata)
    assert reply.WhichOneof("outcome") == "retry_scheduled"
