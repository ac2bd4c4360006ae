"""Per-key quota limits at the API (docs/budgets.md#per-key-limits): CreateExecution and SubmitFlow
members carry a `concurrency_key`; the policy's limits apply per key; a bad key is refused at
the edge with nothing written. Both topologies, a real Valkey.
"""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest

from flowfabric.server.valkey.ids import parse_execution_id, quota_partition
from flowfabric.server.valkey.keys import ExecKeys, QuotaKeys
from flowfabric.v1 import execution_pb2 as pb
from flowfabric.v1 import flow_pb2 as fpb
from tests.api.test_budget_admission import PARTS, claimed_ids
from tests.api.test_budgets import create_quota
from tests.api.test_flows import flows, member
from tests.api.test_lifecycle import claim_one, complete, create
from tests.api.util import expect_error, keyspace_dump
from tests.conftest import Api


def bucket(qid: str, key: str) -> QuotaKeys:
    return QuotaKeys.of(quota_partition(qid, PARTS), qid, key)


async def core_key(api: Api, eid: str) -> str:
    raw = await api.store.call("HGET", ExecKeys(parse_execution_id(eid, 1 << 16)).core,
                               "concurrency_key")  # fmt: skip
    return (raw or b"").decode()


async def test_each_key_runs_up_to_the_cap_on_its_own(api: Api) -> None:
    qid, _ = await create_quota(api, window_seconds=60, max_concurrent=2)
    by_key = {k: [await create(api, quota_policy_id=qid, concurrency_key=k) for _ in range(3)]
              for k in ("acme", "globex")}  # fmt: skip
    assert await core_key(api, by_key["acme"][0]) == "acme"
    got = await claimed_ids(api)
    assert sorted(got) == sorted(by_key["acme"][:2] + by_key["globex"][:2]), "2 per customer"
    assert await claimed_ids(api) == []
    for k in ("acme", "globex"):
        assert await api.store.call("ZCARD", bucket(qid, k).admitted) == 2
    assert await api.store.call("ZCARD", bucket(qid, "").admitted) == 0


async def test_a_freed_key_slot_admits_the_same_keys_waiter(api: Api) -> None:
    qid, _ = await create_quota(api, window_seconds=60, max_concurrent=1)
    first = await create(api, quota_policy_id=qid, concurrency_key="k-1")
    task = await claim_one(api)
    assert task.lease.execution_id == first
    waiter = await create(api, quota_policy_id=qid, concurrency_key="k-1")
    assert await claimed_ids(api) == []
    waiting = await api.store.call("ZRANGE", bucket(qid, "k-1").waiters(), 0, -1)
    assert [w.decode() for w in waiting] == [waiter], "registered in its key's bucket"
    await complete(api, task.lease)
    for _ in range(100):  # the release wakes it; poll until it is claimable
        got = await claimed_ids(api)
        if got:
            break
        await asyncio.sleep(0.05)
    assert got == [waiter]


@pytest.mark.parametrize(
    ("key", "quota", "detail"),
    [("a b", True, "whitespace or control"), ("tab\there", True, "whitespace or control"),
     ("x" * 257, True, "at most 256"), ("ok", False, "needs a quota_policy_id")],
)  # fmt: skip
async def test_a_bad_key_is_refused_at_the_edge(
    api: Api, key: str, quota: bool, detail: str
) -> None:
    qid = (await create_quota(api, window_seconds=60, max_concurrent=1))[0] if quota else ""
    before = await keyspace_dump(api.store)
    info = await expect_error(
        api.execution.CreateExecution(
            pb.CreateExecutionRequest(execution_kind="k", lane_id="L", quota_policy_id=qid,
                                      concurrency_key=key),
            metadata=api.metadata,
        ),
        grpc.StatusCode.INVALID_ARGUMENT, "invalid_input",
    )  # fmt: skip
    assert info.metadata["field"] == "concurrency_key"
    assert await keyspace_dump(api.store) == before


async def test_a_flow_member_with_a_key(api: Api) -> None:
    qid, _ = await create_quota(api, window_seconds=60, max_concurrent=1)
    fid = str(uuid.uuid4())
    req = fpb.SubmitFlowRequest(flow_id=fid, flow_kind="dag", namespace="ns", members=[
        member("A", fid, quota_policy_id=qid, concurrency_key="tenant-7"),
    ])  # fmt: skip
    reply = await flows(api).SubmitFlow(req, metadata=api.metadata)
    eid = reply.submitted.members[0].execution_id
    assert await core_key(api, eid) == "tenant-7"
    task = await claim_one(api, lanes=(req.members[0].lane_id,))
    assert task.lease.execution_id == eid
    assert await api.store.call("ZSCORE", bucket(qid, "tenant-7").admitted, eid) is not None


async def test_a_flow_member_with_a_bad_key_is_refused(api: Api) -> None:
    qid, _ = await create_quota(api, window_seconds=60, max_concurrent=1)
    fid = str(uuid.uuid4())
    before = await keyspace_dump(api.store)
    info = await expect_error(
        flows(api).SubmitFlow(fpb.SubmitFlowRequest(
            flow_id=fid, flow_kind="dag", namespace="ns",
            members=[member("A", fid, quota_policy_id=qid, concurrency_key="a\x7fb")],
        ), metadata=api.metadata),
        grpc.StatusCode.INVALID_ARGUMENT, "invalid_input",
    )  # fmt: skip
    assert info.metadata["field"] == "members[0].concurrency_key"
    assert await keyspace_dump(api.store) == before
