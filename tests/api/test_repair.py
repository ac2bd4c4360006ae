"""The guarded repair sweep (docs/architecture.md#repair-sweep), run through AdminService over a
keyspace with records planted by hand as older versions left them: a core from a create that
failed half-way (no index reaches it), a lease held for 10^15 ms, a waitpoint and a suspension
whose timeouts sit near 2^64. Live records are untouched and a second sweep repairs nothing."""

from __future__ import annotations

import uuid

import grpc
import pytest

from flowfabric.server.engine.scanners import server_time_ms
from flowfabric.server.valkey import bounds
from flowfabric.server.valkey.ids import ExecutionId, parse_execution_id
from flowfabric.server.valkey.keys import ExecKeys, PartitionKeys, WaitpointKeys
from flowfabric.v1 import admin_pb2 as apb
from flowfabric.v1 import worker_pb2 as wpb
from tests.api.suspend_util import create, started
from tests.api.util import expect_error, keyspace_dump
from tests.conftest import Api

DAY_MS = 24 * 3600 * 1000


async def sweep(api: Api, min_age_ms: int | None = None) -> apb.RepairSweepResponse:
    req = apb.RepairSweepRequest(min_age_ms=min_age_ms)
    return await api.admin.RepairSweep(req, metadata=api.metadata)  # type: ignore[no-any-return]


async def plant_orphan(api: Api, created_at: int, partition: int = 5) -> ExecutionId:
    """What a create refused half-way by `unpack` left: core, payload, policy; no index."""
    eid = ExecutionId(partition, str(uuid.uuid4()))
    k = ExecKeys(eid)
    await api.store.call(
        "HSET", k.core, "execution_id", str(eid), "lane_id", "L", "lifecycle_phase", "runnable",
        "eligibility_state", "eligible_now", "public_state", "waiting",
        "total_attempt_count", "0", "created_at", str(created_at),
    )  # fmt: skip
    await api.store.call("SET", k.payload, b"input")
    await api.store.call("SET", k.policy, "{}")
    return eid


def eid_of(api: Api, text: str) -> ExecutionId:
    return parse_execution_id(text, api.server.config.flow_partitions)


async def test_sweep_removes_only_old_orphans_and_is_idempotent(api: Api) -> None:
    now = await server_time_ms(api.store)
    live = eid_of(api, await create(api, tags={"app.k": "v"}))
    old = await plant_orphan(api, now - 2 * DAY_MS)
    young = await plant_orphan(api, now)
    live_before = await api.store.call("HGETALL", ExecKeys(live).core)

    report = await sweep(api, min_age_ms=DAY_MS)
    assert report.scanned == 3
    assert (report.orphans_removed, report.clamped, report.skipped) == (1, 0, 1)
    assert list(report.repaired_execution_ids) == [str(old)]
    k = ExecKeys(old)
    assert await api.store.call("EXISTS", k.core, k.payload, k.policy) == 0
    assert await api.store.call("EXISTS", ExecKeys(young).core) == 1, "too young to be sure"
    assert await api.store.call("HGETALL", ExecKeys(live).core) == live_before

    before = await keyspace_dump(api.store)
    again = await sweep(api, min_age_ms=DAY_MS)
    assert (again.orphans_removed, again.clamped) == (0, 0)
    assert await keyspace_dump(api.store) == before, "a second sweep changes nothing"


async def test_sweep_clamps_a_lease_held_practically_forever(api: Api) -> None:
    h = await started(api)
    eid = eid_of(api, h.execution_id)
    k, p = ExecKeys(eid), PartitionKeys(eid.tag)
    forever = str(await server_time_ms(api.store) + 10**15)
    await api.store.call("HSET", k.core, "lease_expires_at", forever)
    await api.store.call("HSET", k.lease_current, "expires_at", forever)
    await api.store.call("ZADD", p.lease_expiry, forever, str(eid))

    report = await sweep(api)
    assert (report.clamped, list(report.repaired_execution_ids)) == (1, [str(eid)])
    now = await server_time_ms(api.store)
    expiry = int(float(await api.store.call("ZSCORE", p.lease_expiry, str(eid))))
    assert now < expiry <= now + bounds.LEASE_TTL_MS.hi
    stored = int(await api.store.call("HGET", k.core, "lease_expires_at"))
    assert stored == expiry
    renewed = await api.worker.RenewLease(wpb.RenewLeaseRequest(lease=h), metadata=api.metadata)
    assert renewed.WhichOneof("outcome") == "renewed", "the holder keeps its lease"
    assert (await sweep(api)).clamped == 0


async def test_sweep_clamps_waitpoint_and_suspension_timeouts(api: Api) -> None:
    h = await started(api)
    eid = eid_of(api, h.execution_id)
    pending = await api.worker.CreatePendingWaitpoint(
        wpb.CreatePendingWaitpointRequest(lease=h, expires_in_ms=60_000), metadata=api.metadata
    )
    wpid = pending.created.waitpoint_id
    suspended = await api.worker.Suspend(
        wpb.SuspendRequest(lease=h, timeout_in_ms=60_000), metadata=api.metadata
    )
    assert suspended.WhichOneof("outcome") == "suspended"
    k, p = ExecKeys(eid), PartitionKeys(eid.tag)
    huge = str(2**64)
    await api.store.call("HSET", WaitpointKeys(eid.tag, wpid).waitpoint, "expires_at", huge)
    await api.store.call("HSET", k.suspension_current, "timeout_at", huge)
    await api.store.call("ZADD", p.suspension_timeout, huge, str(eid))

    report = await sweep(api)
    assert report.clamped == 1
    now = await server_time_ms(api.store)
    horizon = now + bounds.HORIZON_MS.hi
    wp_expiry = int(
        await api.store.call("HGET", WaitpointKeys(eid.tag, wpid).waitpoint, "expires_at")
    )
    assert wp_expiry <= horizon
    assert int(await api.store.call("HGET", k.suspension_current, "timeout_at")) <= horizon
    score = float(await api.store.call("ZSCORE", p.suspension_timeout, str(eid)))
    assert score <= horizon
    assert (await sweep(api)).clamped == 0


@pytest.mark.parametrize("age", [bounds.HORIZON_MS.hi + 1, 2**64 - 1])
async def test_sweep_min_age_is_bounded(api: Api, age: int) -> None:
    await expect_error(sweep(api, age), grpc.StatusCode.INVALID_ARGUMENT, "invalid_input")
