"""Model-based test of quota slots (docs/budgets.md#slots): random sequences of creates,
claims, completes, fails, cancels, worker kills (the lease runs out and the expiry function
marks it), lost releases and reconciler passes, through the real server and functions.

After every step each quota bucket's admitted set is exactly the executions that hold a live
lease plus the slots whose release was lost and not yet reconciled, the counter is its size, and
the cap is never exceeded. Releases are delivered deterministically: the server's own releaser
is held back, each `admission_released` announcement the step caused is awaited, and then
handed to the releaser (or dropped, for a lost release). The reconciler runs with no grace: the
steps are sequential, so no admission is ever in flight when it looks.

Both topologies, a real Valkey; a fresh lane and policy per example.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowfabric.server.engine import quota_reconciler
from flowfabric.server.engine.quota_reconciler import QuotaReconciler
from flowfabric.server.engine.ready import Released
from flowfabric.server.valkey.functions import Functions
from flowfabric.server.valkey.ids import parse_execution_id, quota_partition
from flowfabric.server.valkey.keys import ExecKeys, PartitionKeys, QuotaKeys
from flowfabric.v1 import execution_pb2 as pb
from flowfabric.v1 import types_pb2 as t
from tests.api.test_budget_admission import PARTS
from tests.api.test_budgets import create_quota, eventually
from tests.api.test_lifecycle import claim_next, complete, create, fail
from tests.conftest import Api

CAP = 2
KEYS = ("", "k1", "k2")  # the policy-wide bucket and two concurrency keys

OPS = st.sampled_from(["create", "claim", "complete", "fail", "cancel", "kill", "reconcile"])
STEP = st.tuples(OPS, st.integers(0, 7), st.booleans())  # op, pick, the release is lost


@dataclass
class Model:
    lane: str
    qid: str
    key_of: dict[str, str] = field(default_factory=dict)  # eid -> concurrency key
    live: dict[str, t.LeaseHandle] = field(default_factory=dict)  # holding a live lease
    killed: set[str] = field(default_factory=set)  # live, but the lease ran out
    lost: set[str] = field(default_factory=set)  # ended, its release never delivered

    def keys(self, key: str = "") -> QuotaKeys:
        return QuotaKeys.of(quota_partition(self.qid, PARTS), self.qid, key)


class Held:
    """Holds the server's releaser back: announcements are collected, not released."""

    def __init__(self) -> None:
        self.heard: list[Released] = []

    def schedule(self, released: Released) -> None:
        self.heard.append(released)


async def deliver(api: Api, held: Held, model: Model, eid: str, lost: bool) -> None:
    async def heard() -> bool:
        return any(r.execution_id == eid for r in held.heard)

    await eventually(heard)
    announced = next(r for r in held.heard if r.execution_id == eid)
    held.heard.remove(announced)
    assert announced.quota_policy_id == model.qid
    assert announced.concurrency_key == model.key_of[eid]
    if lost:
        model.lost.add(eid)
        return
    releaser = api.server.releaser
    assert releaser is not None
    assert await releaser.release(model.keys(model.key_of[eid]), eid), "the release freed it"


async def ended(api: Api, held: Held, model: Model, eid: str, lost: bool) -> None:
    del model.live[eid]
    model.killed.discard(eid)
    await deliver(api, held, model, eid, lost)


async def kill(api: Api, eid: str) -> None:
    """The worker died: its lease runs out (its deadline moved into the past), and the expiry
    function marks it, as the lease-expiry scanner would."""
    e = parse_execution_id(eid, 1 << 16)
    past = await api.store.time_ms() - 1
    await api.store.call("HSET", ExecKeys(e).core, "lease_expires_at", past)
    await api.store.call("HSET", ExecKeys(e).lease_current, "expires_at", past)
    await api.store.call("ZADD", PartitionKeys(e.tag).lease_expiry, past, eid)
    got = await Functions(api.store).lease.mark_lease_expired_if_due(e)
    assert got.outcome == "marked_expired", got


async def step(api: Api, held: Held, model: Model, op: str, pick: int, lost: bool) -> None:
    usable = sorted(set(model.live) - model.killed)
    if op == "create":
        key = KEYS[pick % len(KEYS)]
        extra = {"concurrency_key": key} if key else {}
        eid = await create(api, lane_id=model.lane, quota_policy_id=model.qid, **extra)
        model.key_of[eid] = key
    elif op == "claim":
        reply = await claim_next(api, f"w-{pick % 3}", lanes=(model.lane,))
        if reply.WhichOneof("outcome") == "task":
            lease = reply.task.lease
            model.live[lease.execution_id] = lease  # a new claim, or a reclaim of a killed one
            model.killed.discard(lease.execution_id)
    elif op in ("complete", "fail") and usable:
        eid = usable[pick % len(usable)]
        await (complete if op == "complete" else fail)(api, model.live[eid])
        await ended(api, held, model, eid, lost)
    elif op == "cancel" and model.live:
        eid = sorted(model.live)[pick % len(model.live)]
        await api.execution.CancelExecution(
            pb.CancelExecutionRequest(execution_id=eid), metadata=api.metadata
        )
        await ended(api, held, model, eid, lost)
    elif op == "kill" and usable:
        eid = usable[pick % len(usable)]
        await kill(api, eid)
        model.killed.add(eid)  # still holds its slot: the reclaim continues the admission
    elif op == "reconcile":
        await QuotaReconciler(api.store, Functions(api.store), PARTS, 0).reconcile(model.keys())
        model.lost.clear()


async def check(api: Api, model: Model) -> None:
    for key in KEYS:
        k = model.keys(key)
        members = {m.decode() for m in await api.store.call("ZRANGE", k.admitted, 0, -1)}
        live = {e for e in model.live if model.key_of[e] == key}
        lost = {e for e in model.lost if model.key_of[e] == key}
        assert members == live | lost, (key, members, live, lost)
        assert len(members) <= CAP, "the cap is never exceeded"
        counter = await api.store.call("GET", k.concurrency)
        assert int(counter or 0) == len(members), (key, counter, members)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(steps=st.lists(STEP, min_size=4, max_size=25))
async def test_each_bucket_holds_exactly_its_live_leases(
    api: Api, monkeypatch: pytest.MonkeyPatch, steps: list[tuple[str, int, bool]]
) -> None:
    releaser, hub = api.server.releaser, api.server.hub
    assert releaser is not None and hub is not None
    held = Held()
    monkeypatch.setattr(releaser, "_release", _noop)
    monkeypatch.setattr(quota_reconciler, "GRACE_MS", 0)
    api.server.ready.on_released(held.schedule)  # type: ignore[union-attr]
    try:
        model = Model(lane=f"q-{uuid.uuid4().hex[:8]}", qid="")
        model.qid, _ = await create_quota(api, window_seconds=1, max_concurrent=CAP)
        eid = await create(api, lane_id=model.lane)  # the lane's partition, to listen on
        await hub.wait_subscribed(PartitionKeys(parse_execution_id(eid, 1 << 16).tag).ready)
        await api.execution.CancelExecution(
            pb.CancelExecutionRequest(execution_id=eid), metadata=api.metadata
        )
        for op, pick, lost in steps:
            await step(api, held, model, op, pick, lost)
            await check(api, model)
    finally:
        api.server.ready._on_released.remove(held.schedule)  # type: ignore[union-attr]


async def _noop(*args: object) -> None:
    return None
