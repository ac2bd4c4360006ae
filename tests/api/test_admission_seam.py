"""The admission seam (docs/lifecycle.md#admission): a test-only cross-slot check registered on
the scheduler blocks, skips or admits chosen executions before they are leased.

Both topologies; no assertion depends on timing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from flowfabric.server.engine.admission import (
    ADMIT,
    CAPABLE_WORKER_DETAIL,
    ROUTE_REASON,
    SKIP,
    Admission,
    Block,
    Candidate,
    CapabilityCheck,
    Verdict,
)
from flowfabric.server.valkey.functions import Claimer
from flowfabric.server.valkey.ids import parse_execution_id
from flowfabric.server.valkey.keys import PartitionKeys
from flowfabric.v1 import types_pb2 as t
from tests.api.test_lifecycle import LANE, claim_next, create, get
from tests.conftest import Api


class ChosenCheck:
    """Blocks, skips or steals (another worker takes the grant first) chosen executions, and
    records what it saw and released."""

    name = "test_chosen"
    in_slot = False

    def __init__(self, api: Api) -> None:
        self.api = api
        self.block: set[str] = set()
        self.skip: set[str] = set()
        self.steal: set[str] = set()
        self.seen: list[str] = []
        self.released: list[str] = []

    async def check(self, candidate: Candidate, who: Claimer) -> Verdict:
        eid = str(candidate.execution_id)
        self.seen.append(eid)
        if eid in self.block:
            return Block("waiting_for_budget", "test budget exhausted")
        if eid in self.skip:
            return SKIP
        if eid in self.steal:  # the claim that follows loses the head to another worker
            other = Claimer("thief", "thief-1", LANE, "")
            assert self.api.server.scheduler is not None
            await self.api.server.scheduler.functions.scheduling.issue_claim_grant(
                candidate.execution_id, other, 60_000
            )
        return ADMIT

    async def release(self, candidate: Candidate, who: Claimer) -> None:
        self.released.append(str(candidate.execution_id))


@pytest.fixture
async def check(api: Api) -> AsyncIterator[ChosenCheck]:
    assert api.server.scheduler is not None
    admission = api.server.scheduler.admission
    assert [c.name for c in admission.checks] == ["capability_route", "budget", "quota"]
    chosen = ChosenCheck(api)
    admission.register(chosen)
    try:
        yield chosen
    finally:
        admission.unregister(chosen)


async def claimed_ids(api: Api, **kw: object) -> list[str]:
    reply = await claim_next(api, max_tasks=16, **kw)  # type: ignore[arg-type]
    if reply.WhichOneof("outcome") == "batch":
        return [task.lease.execution_id for task in reply.batch.tasks]
    if reply.WhichOneof("outcome") == "task":
        return [reply.task.lease.execution_id]
    return []


async def test_checks_block_and_skip_before_the_lease(api: Api, check: ChosenCheck) -> None:
    ids = [await create(api, input_payload=f"in-{i}".encode()) for i in range(6)]
    check.block, check.skip = {ids[1]}, {ids[3]}
    got = await claimed_ids(api)
    # the rest of the lane flows past the blocked and the skipped one, in eligible order
    assert got == [ids[0], ids[2], ids[4], ids[5]]
    blocked = await get(api, ids[1])
    assert blocked.state_vector.eligibility_state == t.ELIGIBILITY_STATE_BLOCKED_BY_BUDGET
    assert blocked.state_vector.blocking_reason == t.BLOCKING_REASON_WAITING_FOR_BUDGET
    assert blocked.blocking_detail == "test budget exhausted"
    eid = parse_execution_id(ids[1], api.server.config.flow_partitions)
    part = PartitionKeys(eid.tag)
    assert await api.store.call("ZSCORE", part.lane(LANE, "blocked:budget"), ids[1]) is not None
    assert await api.store.call("ZSCORE", part.lane(LANE, "eligible"), ids[1]) is None
    skipped = await get(api, ids[3])
    assert skipped.state_vector.eligibility_state == t.ELIGIBILITY_STATE_ELIGIBLE_NOW
    assert skipped.public_state == t.PUBLIC_STATE_WAITING
    # the skipped one stays eligible for a pass the check lets through; the blocked one is gone
    check.skip.clear()
    assert await claimed_ids(api) == [ids[3]]
    assert await claimed_ids(api) == []


async def test_inputs_come_with_the_candidate_first_claim(api: Api, check: ChosenCheck) -> None:
    eid = await create(api, input_payload=b"payload", tags={"app.k": "v"}, priority=3)
    reply = await claim_next(api)
    assert reply.WhichOneof("outcome") == "task", reply
    assert reply.task.lease.execution_id == eid
    assert bytes(reply.task.payload) == b"payload"
    assert dict(reply.task.tags) == {"app.k": "v"} and reply.task.priority == 3
    assert check.seen == [eid] and check.released == []


async def test_capability_route_is_the_first_check(api: Api, check: ChosenCheck) -> None:
    policy = t.ExecutionPolicy(
        routing_requirements=t.RoutingRequirements(required_capabilities=["gpu"])
    )
    gpu = await create(api, policy=policy)
    cpu = await create(api)
    assert await claimed_ids(api, caps=("cpu",)) == [cpu]
    info = await get(api, gpu)
    assert info.state_vector.eligibility_state == t.ELIGIBILITY_STATE_BLOCKED_BY_ROUTE
    assert info.state_vector.blocking_reason == t.BLOCKING_REASON_WAITING_FOR_CAPABLE_WORKER
    assert check.seen == [cpu], "the route check answered first; later checks never saw it"


async def test_a_failed_claim_releases_the_reservation(api: Api, check: ChosenCheck) -> None:
    stolen = await create(api)
    other = await create(api)
    check.steal = {stolen}
    assert await claimed_ids(api) == [other]
    assert check.released == [stolen]
    assert (await get(api, stolen)).state_vector.eligibility_state == (
        t.ELIGIBILITY_STATE_ELIGIBLE_NOW
    )


async def test_block_after_admit_releases_the_earlier_checks() -> None:
    class Reserving:
        name, in_slot = "reserving", False

        def __init__(self) -> None:
            self.released: list[str] = []

        async def check(self, candidate: Candidate, who: Claimer) -> Verdict:
            return ADMIT

        async def release(self, candidate: Candidate, who: Claimer) -> None:
            self.released.append(str(candidate.execution_id))

    class Refusing(Reserving):
        async def check(self, candidate: Candidate, who: Claimer) -> Verdict:
            return Block("waiting_for_quota", "full", until_ms=5)

    first, second = Reserving(), Refusing()
    admission = Admission(None, [CapabilityCheck(), first, second])  # type: ignore[arg-type]
    assert admission.cross_slot
    eid = parse_execution_id("{fp:0}:00000000-0000-0000-0000-000000000001", 4)
    who = Claimer("w", "w-1", LANE, "")
    verdict = await admission.decide(Candidate(eid, LANE), who)
    assert verdict == Block("waiting_for_quota", "full", 5)
    assert first.released == [str(eid)] and second.released == []
    gpu = Candidate(eid, LANE, required_capabilities=("gpu",))
    assert isinstance(await admission.decide(gpu, who), Block)
    assert first.released == [str(eid)], "a route block reserves nothing downstream"


async def test_decide_many_asks_a_batching_check_once_and_releases_the_refused() -> None:
    class Reserving:
        name, in_slot = "reserving", False

        def __init__(self) -> None:
            self.released: list[str] = []

        async def check(self, candidate: Candidate, who: Claimer) -> Verdict:
            return ADMIT

        async def release(self, candidate: Candidate, who: Claimer) -> None:
            self.released.append(str(candidate.execution_id))

    class Batching(Reserving):
        def __init__(self, refuse: set[str]) -> None:
            super().__init__()
            self.refuse = refuse
            self.calls: list[list[str]] = []

        async def check(self, candidate: Candidate, who: Claimer) -> Verdict:
            raise AssertionError("check_many is used when a check has one")

        async def check_many(self, cands: list[Candidate], who: Claimer) -> list[Verdict]:
            self.calls.append([str(c.execution_id) for c in cands])
            return [
                Block("waiting_for_quota", "full") if str(c.execution_id) in self.refuse else ADMIT
                for c in cands
            ]

    eids = [
        parse_execution_id(f"{{fp:0}}:00000000-0000-0000-0000-00000000000{i}", 4) for i in range(4)
    ]
    first, batching = Reserving(), Batching({str(eids[1]), str(eids[3])})
    last = Reserving()
    admission = Admission(None, [CapabilityCheck(), first, batching, last])  # type: ignore[arg-type]
    who = Claimer("w", "w-1", LANE, "")
    gpu = Candidate(eids[2], LANE, required_capabilities=("gpu",))
    cands = [Candidate(eids[0], LANE), Candidate(eids[1], LANE), gpu, Candidate(eids[3], LANE)]
    verdicts = await admission.decide_many(cands, who)
    assert [type(v).__name__ for v in verdicts] == ["Admit", "Block", "Block", "Block"]
    assert verdicts[2] == Block(ROUTE_REASON, CAPABLE_WORKER_DETAIL)
    assert batching.calls == [[str(eids[0]), str(eids[1]), str(eids[3])]], "one call, routed out"
    assert first.released == [str(eids[1]), str(eids[3])], "the refused give back the earlier"
    assert batching.released == [] and last.released == []
