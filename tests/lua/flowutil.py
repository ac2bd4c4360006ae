"""Helpers for the flow Function tests: submit a DAG, run members to an outcome, read states."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from flowfabric.server.valkey.functions import Functions
from flowfabric.server.valkey.functions.flow import SubmitEdge, SubmitMember, Submitted
from flowfabric.server.valkey.ids import ExecutionId, flow_partition
from flowfabric.server.valkey.keys import FlowKeys
from flowfabric.server.valkey.store import Store
from tests.lua.util import LANE, check_lane_namespaces, claim, complete, core_of, fail, hash_of

PARTITIONS = 256


@dataclass
class Dag:
    """A submitted flow: its id, tag and member ids by key."""

    flow_id: str
    tag: str
    ids: dict[str, ExecutionId]
    reply: Submitted

    @property
    def keys(self) -> FlowKeys:
        return FlowKeys(self.tag, self.flow_id)

    def __getitem__(self, key: str) -> ExecutionId:
        return self.ids[key]


def new_flow() -> tuple[str, int, str]:
    fid = str(uuid.uuid4())
    p = flow_partition(fid, PARTITIONS)
    return fid, p, f"{{fp:{p}}}"


async def submit(
    store: Store,
    members: Sequence[str],
    edges: Sequence[tuple[str, str] | tuple[str, str, str]] = (),
    joins: Mapping[str, tuple[str, int]] | None = None,
    refs: Mapping[tuple[str, str], str] | None = None,
    fid: str | None = None,
) -> Dag:
    """Submit members (by key) and edges (up, down[, kind]); `joins` = key -> (kind, k)."""
    if fid is None:
        fid, p, tag = new_flow()
    else:
        p = flow_partition(fid, PARTITIONS)
        tag = f"{{fp:{p}}}"
    ids = {k: ExecutionId(p, str(uuid.uuid4())) for k in members}
    joins = joins or {}
    refs = refs or {}
    ms = [
        SubmitMember(
            key=k, execution_id=ids[k], lane_id=LANE, execution_kind="step",
            input_payload=f"in-{k}".encode(), join_kind=joins.get(k, ("", 0))[0],
            join_quorum=joins.get(k, ("", 0))[1],
        )
        for k in members
    ]  # fmt: skip
    es = [
        SubmitEdge(str(uuid.uuid4()), e[0], e[1], e[2] if len(e) > 2 else "",
                   refs.get((e[0], e[1]), ""))
        for e in edges
    ]  # fmt: skip
    reply = await Functions(store).flow.submit_flow(tag, p, fid, "dag", "ns", ms, es)
    return Dag(fid, tag, ids, reply)


async def state(store: Store, eid: ExecutionId) -> str:
    return (await core_of(store, eid))["public_state"]


async def states(store: Store, dag: Dag) -> dict[str, str]:
    """Each member's public state; on the way, the lane's namespace side on the flow's
    partition must match its eligible set (docs/lifecycle.md#tenant-fairness)."""
    await check_lane_namespaces(store, dag.tag)
    return {k: await state(store, eid) for k, eid in dag.ids.items()}


async def run(
    store: Store, eid: ExecutionId, outcome: str = "success", result: bytes = b""
) -> None:
    """Claim `eid` and end it with `outcome` (success or failed, no retries)."""
    lease = await claim(store, eid)
    if outcome == "success":
        reply = await complete(store, eid, lease.fence, payload=result)
    else:
        reply = await fail(store, eid, lease.fence)
    assert reply[:2] == [1, b"OK"], reply


async def flow_core(store: Store, dag: Dag) -> dict[str, str]:
    return await hash_of(store, dag.keys.core)
