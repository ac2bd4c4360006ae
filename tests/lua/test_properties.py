"""Property test: random operation sequences keep the state-vector invariants
(docs/architecture.md#the-state-vector).

Hypothesis drives creates, claims, renewals, completes, fails (with a retry policy), cancels,
delays, waiting-for-children, revokes, reclaims, promotions, replays and priority changes
against a few executions, through the same function wrappers the server uses, with current and
stale fences alike. After every step every execution must satisfy the invariants and be in
exactly the one lane scheduling set its state vector implies
(docs/architecture.md#the-state-vector), and the lane's namespace sub-indexes must add up to its
eligible set (docs/lifecycle.md#tenant-fairness): the two executions have different namespaces.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from flowfabric.server.valkey.codec import hash_to_dict
from flowfabric.server.valkey.errors import FlowFabricError
from flowfabric.server.valkey.functions import Claimer, Fence, Functions, Leased, NewExecution
from flowfabric.server.valkey.ids import ExecutionId
from flowfabric.server.valkey.keys import ExecKeys, PartitionKeys
from flowfabric.server.valkey.store import Store
from tests.conftest import flush
from tests.lua.util import check_lane_namespaces

LANE = "default"
LANE_SETS = ("eligible", "delayed", "active", "suspended", "terminal", "blocked:dependencies",
             "blocked:budget", "blocked:quota", "blocked:route", "blocked:operator")  # fmt: skip
RUNNABLE_SET = {
    "eligible_now": "eligible",
    "not_eligible_until_time": "delayed",
    "blocked_by_dependencies": "blocked:dependencies",
    "blocked_by_budget": "blocked:budget",
    "blocked_by_quota": "blocked:quota",
    "blocked_by_route": "blocked:route",
    "blocked_by_operator": "blocked:operator",
    "blocked_by_lane_state": "blocked:operator",
}
PUBLIC_OF_RUNNABLE = {
    "eligible_now": "waiting", "not_eligible_until_time": "delayed",
    "blocked_by_dependencies": "waiting_children", "blocked_by_budget": "rate_limited",
    "blocked_by_quota": "rate_limited", "blocked_by_route": "waiting",
    "blocked_by_lane_state": "waiting", "blocked_by_operator": "waiting",
}  # fmt: skip
PUBLIC_OF_TERMINAL = {"success": "completed", "failed": "failed", "cancelled": "cancelled",
                      "expired": "expired", "skipped": "skipped"}  # fmt: skip
POLICY = json.dumps(
    {"retry_policy": {"max_retries": 1, "backoff": {"type": "fixed", "delay_ms": 1}}}
)
FAR_FUTURE = 10**13


@dataclass
class Model:
    eids: list[ExecutionId] = field(default_factory=list)
    fences: dict[str, list[Fence]] = field(default_factory=dict)  # every fence ever issued


OPS = st.sampled_from(
    ["create", "claim", "claim_batch", "renew", "complete", "fail", "cancel", "cancel_holder",
     "delay", "wait_children", "revoke", "reclaim", "promote", "replay", "priority", "progress"]
)  # fmt: skip
STEP = st.tuples(
    OPS, st.integers(0, 1), st.integers(0, 3).map(lambda v: v == 0), st.integers(0, 9000)
)


def derived_public(c: dict[str, str]) -> str:
    phase = c["lifecycle_phase"]
    if phase == "terminal":
        return PUBLIC_OF_TERMINAL.get(c["terminal_outcome"], "failed")
    if phase in ("suspended", "active"):
        return phase
    return PUBLIC_OF_RUNNABLE.get(c["eligibility_state"], "waiting")


def expected_set(c: dict[str, str]) -> str | None:
    phase = c["lifecycle_phase"]
    if phase == "runnable":
        return RUNNABLE_SET[c["eligibility_state"]]
    return {"active": "active", "suspended": "suspended", "terminal": "terminal"}.get(phase)


async def check_invariants(store: Store, eid: ExecutionId) -> None:
    k, p = ExecKeys(eid), PartitionKeys(eid.tag)
    c = hash_to_dict(await store.call("HGETALL", k.core))
    phase, own = c["lifecycle_phase"], c["ownership_state"]
    assert not (phase in ("terminal", "suspended") and own == "leased"), c
    assert (c["terminal_outcome"] != "none") == (phase == "terminal"), c
    assert c["eligibility_state"] != "eligible_now" or phase == "runnable", c
    if phase == "active":
        assert own in ("leased", "lease_expired_reclaimable", "lease_revoked"), c
        assert c["attempt_state"] in ("running_attempt", "attempt_interrupted"), c
    assert not (phase == "runnable" and c["attempt_state"] == "running_attempt"), c
    assert (c["blocking_detail"] == "") == (c["blocking_reason"] == "none") or (
        c["blocking_reason"] != "none"
    ), c
    if c["blocking_reason"] == "none":
        assert c["blocking_detail"] == "", c
    assert c["public_state"] == derived_public(c), c
    pipe = store.pipeline()
    for name in LANE_SETS:
        pipe.zscore(p.lane(LANE, name), str(eid))
    member_of = [name for name, score in zip(LANE_SETS, await store.run_pipeline(pipe),
                                             strict=True) if score is not None]  # fmt: skip
    assert member_of == [expected_set(c)], (member_of, c)
    started = 0
    total = int(c["total_attempt_count"])
    for i in range(total):
        state = await store.call("HGET", k.attempt(i), "attempt_state")
        started += state == b"started"
    assert started <= 1, c


@dataclass
class Ctx:
    fn: Functions
    eid: ExecutionId
    fence: Fence
    fences: list[Fence]
    who: Claimer
    n: int


async def _claim(x: Ctx) -> None:
    await x.fn.scheduling.issue_claim_grant(x.eid, x.who, 5000)
    r = await x.fn.scheduling.claim_execution(
        x.eid, x.who, str(uuid.uuid4()), 60_000, str(uuid.uuid4())
    )
    x.fences.append(Fence(r.lease_id, r.lease_epoch, r.attempt_id))


async def _reclaim(x: Ctx) -> None:
    await x.fn.lease.issue_reclaim_grant(x.eid, x.who, 5000)
    r = await x.fn.lease.reclaim_execution(
        x.eid, x.who, str(uuid.uuid4()), 60_000, str(uuid.uuid4())
    )
    if isinstance(r, Leased):
        x.fences.append(Fence(r.lease_id, r.lease_epoch, r.attempt_id))


ACTIONS = {
    "claim": _claim,
    "reclaim": _reclaim,
    "renew": lambda x: x.fn.lease.renew_lease(x.eid, 0, x.fence, 60_000),
    "complete": lambda x: x.fn.execution.complete_execution(
        x.eid, x.fence, b"ok", "", "lease_holder"
    ),
    "fail": lambda x: x.fn.execution.fail_execution(
        x.eid, x.fence, "boom", "error", "lease_holder"
    ),
    "cancel": lambda x: x.fn.execution.cancel_execution(
        x.eid, "test", "operator_override", Fence()
    ),
    "cancel_holder": lambda x: x.fn.execution.cancel_execution(
        x.eid, "test", "lease_holder", x.fence
    ),
    "delay": lambda x: x.fn.execution.delay_execution(
        x.eid, x.fence, FAR_FUTURE - 1, "lease_holder"
    ),
    "wait_children": lambda x: x.fn.execution.move_to_waiting_children(
        x.eid, x.fence, "lease_holder"
    ),
    "revoke": lambda x: x.fn.lease.revoke_lease(x.eid, "", "test"),
    "promote": lambda x: x.fn.scheduling.promote_delayed(x.eid, LANE, FAR_FUTURE),
    "replay": lambda x: x.fn.execution.replay_execution(x.eid),
    "priority": lambda x: x.fn.scheduling.change_priority(x.eid, x.n),
    "progress": lambda x: x.fn.execution.update_progress(x.eid, x.fence, x.n % 101, "p"),
}


async def step(fn: Functions, model: Model, op: str, pick: int, stale: bool,
               n: int) -> None:  # fmt: skip
    if op == "create" or not model.eids:
        if len(model.eids) < 2:
            eid = ExecutionId(7, str(uuid.uuid4()))
            ns = f"ns-{len(model.eids)}"  # two namespaces: the claim weighs them
            await fn.execution.create_execution(NewExecution(eid, ns, LANE, "k", b"x", n, "prop",
                                                   policy_json=POLICY))  # fmt: skip
            model.eids.append(eid)
            model.fences[str(eid)] = []
        return
    if op == "claim_batch":  # across both namespaces (docs/lifecycle.md#tenant-fairness)
        who = Claimer("w", f"wi-{n % 3}", LANE)
        ids = [(str(uuid.uuid4()), str(uuid.uuid4())) for _ in range(1 + pick)]
        batch = await fn.scheduling.claim_batch(7, who, 60_000, ids, 4)
        for row in batch.claimed:
            model.fences[row.execution_id].append(
                Fence(row.lease_id, row.lease_epoch, row.attempt_id)
            )
        return
    eid = model.eids[pick % len(model.eids)]
    fences = model.fences[str(eid)]
    fence = (fences[0] if stale else fences[-1]) if fences else Fence("x", 1, "y")
    who = Claimer("w", f"wi-{n % 3}", LANE)
    await ACTIONS[op](Ctx(fn, eid, fence, fences, who, n))


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(steps=st.lists(STEP, min_size=5, max_size=60))
# Sequences that reach every state the lifecycle functions can produce, run on every test run.
@example(steps=[(op, 0, False, 5) for op in ("create", "claim", "wait_children", "replay")])
@example(
    steps=[("create", 0, False, 1), ("create", 1, False, 2), ("claim_batch", 0, False, 0),
           ("claim_batch", 1, False, 0), ("cancel", 0, False, 0), ("replay", 0, False, 0),
           ("claim_batch", 1, False, 0), ("complete", 0, False, 0)]
)  # fmt: skip
@example(
    steps=[(op, 0, False, 5) for op in
           ("create", "claim", "delay", "promote", "claim", "fail", "promote", "claim", "complete",
            "replay", "claim", "revoke", "reclaim", "progress", "cancel_holder", "replay")]
)  # fmt: skip
@example(
    steps=[("create", 0, False, 1), ("create", 1, False, 2), ("claim", 0, False, 3),
           ("revoke", 0, False, 0), ("claim", 1, False, 4), ("renew", 0, True, 0),
           ("complete", 1, True, 0), ("cancel", 0, False, 0), ("priority", 1, False, 9000)]
)  # fmt: skip
async def test_random_operations_keep_invariants(
    store: Store, steps: list[tuple[str, int, bool, int]]
) -> None:
    await flush(store)
    fn = Functions(store)
    model = Model()
    for op, pick, stale, n in steps:
        try:
            await step(fn, model, op, pick, stale, n)
        except FlowFabricError as exc:
            # Rejections are expected; they must be contract codes, never internal faults.
            assert exc.spec.klass != "bug" and exc.code not in (
                "backend_error",
                "protocol_error",
            ), exc
        for eid in model.eids:
            await check_invariants(store, eid)
        await check_lane_namespaces(store, "{fp:7}", LANE)
