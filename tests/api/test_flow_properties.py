"""A property test of flows over gRPC (docs/flows.md): random DAGs of up to 30 members with
random edge kinds, joins, failure policy and member outcomes, run by one simulated worker that
sometimes abandons a lease (a killed worker: the lease expires and the member is reclaimed).

Checked on every example: every flow ends terminal; no member is claimed before its upstreams
allow it (its join is met by upstreams that have ended); nothing finishes twice; every
member's final state and the flow's state equal those of a reference evaluator written here,
independently of the engine; after every step the lane's namespace sub-indexes on the flow's
partition add up to its eligible set (docs/lifecycle.md#tenant-fairness).

15 examples on standalone and 5 on the Cluster by default (seconds each; the Cluster run is the
slow one, and the same derandomized specs); set FF_FLOW_PROPERTY_EXAMPLES for a longer run on
both, e.g. `FF_FLOW_PROPERTY_EXAMPLES=500 .venv/bin/pytest -q tests/api/test_flow_properties.py`.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowfabric.v1 import flow_pb2 as pb
from flowfabric.v1 import types_pb2 as t
from tests.api.test_flow_ops import lane16
from tests.api.test_flows import flows
from tests.api.test_lifecycle import claim_next, complete, fail, state
from tests.conftest import Api
from tests.lua.util import check_lane_namespaces

EXAMPLES = int(os.environ.get("FF_FLOW_PROPERTY_EXAMPLES", "15"))
CLUSTER_EXAMPLES = int(os.environ.get("FF_FLOW_PROPERTY_EXAMPLES", "5"))
MAX_MEMBERS = 30
ABANDON_TTL_MS = 500
EXAMPLE_DEADLINE_S = 30.0
S = t.PublicState
NAMES = {
    S.PUBLIC_STATE_COMPLETED: "completed", S.PUBLIC_STATE_FAILED: "failed",
    S.PUBLIC_STATE_SKIPPED: "skipped", S.PUBLIC_STATE_CANCELLED: "cancelled",
    S.PUBLIC_STATE_EXPIRED: "expired",
}  # fmt: skip
JOIN_KINDS = {"all": pb.Join.KIND_ALL, "any": pb.Join.KIND_ANY, "quorum": pb.Join.KIND_QUORUM}


@dataclass(frozen=True)
class Spec:
    """One random flow: edges (up, down, kind) with up < down, a join per member, each
    member's outcome when it runs, which members' first lease is abandoned, the policy."""

    n: int
    edges: tuple[tuple[int, int, str], ...]
    joins: tuple[tuple[str, int], ...]
    succeeds: tuple[bool, ...]
    abandoned: frozenset[int]
    policy: str

    def inbound(self, m: int) -> list[tuple[int, str]]:
        return [(u, k) for u, d, k in self.edges if d == m]


@st.composite
def specs(draw: st.DrawFn) -> Spec:
    n = draw(st.integers(2, MAX_MEMBERS))
    pairs = draw(st.sets(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=2 * n))
    edges = tuple(
        sorted((min(a, b), max(a, b), draw(st.sampled_from(["success", "success", "completion"])))
               for a, b in {(min(p), max(p)) for p in pairs if p[0] != p[1]})
    )  # fmt: skip
    joins = []
    for m in range(n):
        indeg = sum(1 for _, d, _ in edges if d == m)
        kind = draw(st.sampled_from(["all", "all", "any", "quorum"])) if indeg else "all"
        joins.append((kind, draw(st.integers(1, indeg)) if kind == "quorum" else 0))
    succeeds = tuple(draw(st.lists(st.sampled_from([True, True, True, False]), min_size=n,
                                   max_size=n)))  # fmt: skip
    abandoned = draw(st.sets(st.integers(0, n - 1), max_size=2))
    policy = draw(st.sampled_from(["skip_dependents", "continue", "fail_fast"]))
    return Spec(n, edges, tuple(joins), succeeds, frozenset(abandoned), policy)


# -- the reference evaluator -------------------------------------------------------------------


def satisfied(kind: str, upstream: str, policy: str) -> bool:
    return (
        upstream == "completed"
        or kind == "completion"
        or (upstream == "skipped" and policy == "continue")
    )


def needed(spec: Spec, m: int) -> int:
    kind, k = spec.joins[m]
    n = len(spec.inbound(m))
    return {"all": n, "any": 1, "quorum": k}[kind]


def may_run(spec: Spec, m: int, final: dict[int, str]) -> bool:
    """Whether `m`'s join is met by its upstreams that have ended (`final`)."""
    met = sum(
        1 for u, kind in spec.inbound(m) if u in final and satisfied(kind, final[u], spec.policy)
    )
    return met >= needed(spec, m)


def reference(
    spec: Spec, finished_before_halt: set[int] | None, failed_first: int | None
) -> dict[int, str]:
    """Every member's final state. Without a fail_fast halt: topological order (edges go from
    lower to higher index), each member runs iff its join is met once its upstreams ended, and
    then ends as its outcome says; otherwise it is skipped. With a halt: the members finished
    before the first failure keep their state, the failing one failed, the rest cancelled."""
    if finished_before_halt is not None and failed_first is not None:
        halted = {m: "cancelled" for m in range(spec.n)}
        for m in finished_before_halt:
            halted[m] = "completed"
        halted[failed_first] = "failed"
        return halted
    final: dict[int, str] = {}
    for m in range(spec.n):
        if may_run(spec, m, final):
            final[m] = "completed" if spec.succeeds[m] else "failed"
        else:
            final[m] = "skipped"
    return final


def flow_state(final: dict[int, str]) -> str:
    return "completed" if all(s == "completed" for s in final.values()) else "failed"


# -- the simulated worker ----------------------------------------------------------------------


@dataclass
class Run:
    spec: Spec
    ids: list[str]
    lane: str
    flow_id: str
    by_id: dict[str, int] = field(default_factory=dict)
    finished: dict[int, str] = field(default_factory=dict)
    abandoned: set[int] = field(default_factory=set)
    halted_after: set[int] | None = None
    failed_first: int | None = None


async def submit(api: Api, spec: Spec) -> Run:
    fid = str(uuid.uuid4())
    lane = lane16("prop", fid)
    members = [
        pb.SubmitFlowRequest.Member(
            key=f"m{m}", lane_id=lane, execution_kind="step",
            join=pb.Join(kind=JOIN_KINDS[spec.joins[m][0]], quorum=spec.joins[m][1]),
        )
        for m in range(spec.n)
    ]  # fmt: skip
    kinds = {"success": pb.DEPENDENCY_KIND_SUCCESS, "completion": pb.DEPENDENCY_KIND_COMPLETION}
    edges = [
        pb.SubmitFlowRequest.Edge(upstream_key=f"m{u}", downstream_key=f"m{d}", kind=kinds[k])
        for u, d, k in spec.edges
    ]
    reply = await flows(api).SubmitFlow(
        pb.SubmitFlowRequest(flow_id=fid, flow_kind="dag", namespace="ns", members=members,
                             edges=edges, failure_policy=spec.policy),
        metadata=api.metadata,
    )  # fmt: skip
    assert reply.WhichOneof("outcome") == "submitted", reply
    ids = [m.execution_id for m in reply.submitted.members]
    run = Run(spec, ids, lane, fid_of(reply))
    run.by_id = {eid: i for i, eid in enumerate(ids)}
    return run


def fid_of(reply: pb.SubmitFlowResponse) -> str:
    return reply.submitted.flow_id


async def upstream_states(api: Api, run: Run, m: int) -> dict[int, str]:
    out = {}
    for u, _ in run.spec.inbound(m):
        name = NAMES.get(await state(api, run.ids[u]))  # type: ignore[call-overload]
        if name is not None:
            out[u] = name
    return out


async def work(api: Api, run: Run) -> None:
    """Claim and run members until the flow has ended."""
    spec = run.spec
    deadline = time.monotonic() + EXAMPLE_DEADLINE_S
    while True:
        assert time.monotonic() < deadline, f"the flow did not end: {spec}"
        reply = await claim_next(api, lanes=(run.lane,), lease_ttl_ms=ABANDON_TTL_MS)
        if reply.WhichOneof("outcome") != "task":
            view = await flows(api).DescribeFlow(
                pb.DescribeFlowRequest(flow_id=run.flow_id), metadata=api.metadata
            )
            if view.flow.public_flow_state in ("completed", "failed"):
                return
            await asyncio.sleep(0.05)
            continue
        lease = reply.task.lease
        m = run.by_id[lease.execution_id]
        assert m not in run.finished, f"m{m} claimed after it finished"
        ended = await upstream_states(api, run, m)
        assert may_run(spec, m, ended), f"m{m} claimed before its join allowed it: {ended}"
        if m in spec.abandoned and m not in run.abandoned:
            run.abandoned.add(m)  # the worker dies holding the lease
            continue
        try:
            if spec.succeeds[m]:
                await complete(api, lease)
                run.finished[m] = "completed"
            else:
                done = await fail(api, lease)
                assert done.WhichOneof("outcome") == "terminal_failed", done
                run.finished[m] = "failed"
                if spec.policy == "fail_fast" and run.failed_first is None:
                    run.failed_first = m
                    run.halted_after = {k for k, v in run.finished.items() if v == "completed"}
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.ABORTED:
                continue  # a slow worker lost its short lease: the member is reclaimed later
            # fenced: a fail_fast halt cancelled it while it ran
            assert spec.policy == "fail_fast" and run.failed_first is not None, exc
        # releases, skips and halts keep the eligible set's namespace side in step
        await check_lane_namespaces(api.store, tag_of(run), run.lane)


def tag_of(run: Run) -> str:
    """The flow's partition tag: the `{fp:N}` its member ids start with."""
    return run.ids[0][: run.ids[0].index("}") + 1]


async def check_random_flow(api: Api, spec: Spec) -> None:
    run = await submit(api, spec)
    await work(api, run)
    expected = reference(spec, run.halted_after, run.failed_first)
    got = {
        m: NAMES.get(await state(api, eid), "live")  # type: ignore[call-overload]
        for m, eid in enumerate(run.ids)
    }
    assert got == expected, spec
    view = await flows(api).DescribeFlow(
        pb.DescribeFlowRequest(flow_id=run.flow_id), metadata=api.metadata
    )
    assert view.flow.public_flow_state == flow_state(expected), spec
    await check_lane_namespaces(api.store, tag_of(run), run.lane)


def _property(examples: int, name: str) -> Any:
    @settings(
        max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck),
        derandomize=examples <= 25,
    )  # fmt: skip
    @given(spec=specs())
    async def test(engine_api: Api, spec: Spec) -> None:
        await check_random_flow(engine_api, spec)

    test.__name__ = test.__qualname__ = name
    return test


# One property per topology, so each gets its own example count (CI time: tests/README.md).
test_random_flows_end_as_the_reference_says = pytest.mark.parametrize(
    "valkey_url", ["standalone"], indirect=True
)(_property(EXAMPLES, "test_random_flows_end_as_the_reference_says"))
test_random_flows_end_as_the_reference_says_on_a_cluster = pytest.mark.parametrize(
    "valkey_url", ["cluster"], indirect=True
)(_property(CLUSTER_EXAMPLES, "test_random_flows_end_as_the_reference_says_on_a_cluster"))
