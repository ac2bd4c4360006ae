"""The SDK and CLI side of per-key quota limits (docs/budgets.md#per-key-limits):
`submit(..., concurrency_key=)`, `f.add(..., concurrency_key=)`, a flow file's
`concurrency_key`, and `flowfabric submit --concurrency-key`."""

from __future__ import annotations

import json

import pytest

from flowfabric import Client, FlowBuilder, InvalidArgument, InvalidFlow
from tests.conftest import API_TOKEN, Api
from tests.sdk.test_budgets import _core
from tests.test_cli import _cli


async def test_submit_takes_a_concurrency_key(client: Client, api: Api) -> None:
    qid = (await client.create_quota_policy(window_seconds=60, max_concurrent=2)).quota_policy_id
    job = await client.submit("llm", lane="keys", quota=qid, concurrency_key="customer-1")
    core = await _core(api, job.execution_id)
    assert (core.get("quota_policy_id"), core.get("concurrency_key")) == (qid, "customer-1")
    with pytest.raises(InvalidArgument) as bad:
        await client.submit("llm", lane="keys", quota=qid, concurrency_key="two words")
    assert "concurrency_key" in str(bad.value)


async def test_flow_members_take_a_concurrency_key(client: Client, api: Api) -> None:
    qid = (await client.create_quota_policy(window_seconds=60, max_concurrent=2)).quota_policy_id
    f = client.flow()
    f.add("a", quota=qid, concurrency_key="tenant-9")
    f.add("b")
    request = f.to_request()
    assert [m.concurrency_key for m in request.members] == ["tenant-9", ""]
    submitted = await f.submit()
    eid = submitted.members["a"]
    assert (await _core(api, eid)).get("concurrency_key") == "tenant-9"
    spec = {"members": [{"key": "a", "kind": "a", "quota": qid, "concurrency_key": "t"}]}
    assert FlowBuilder.from_spec(spec).to_request().members[0].concurrency_key == "t"
    with pytest.raises(InvalidFlow):
        FlowBuilder.from_spec({"members": [{"key": "a", "kind": "a", "concurrency_key": 3}]})


async def test_cli_submit_takes_a_concurrency_key(api: Api) -> None:
    async with Client(api.address, token=API_TOKEN) as client:
        created = await client.create_quota_policy(window_seconds=60, max_concurrent=1)
    qid = created.quota_policy_id
    sub = await _cli(api, "--json", "submit", "llm", "--quota", qid, "--concurrency-key", "c-1")
    assert sub.returncode == 0, sub.stderr
    eid = json.loads(sub.stdout)["created"]["execution_id"]
    assert (await _core(api, eid)).get("concurrency_key") == "c-1"
    bad = await _cli(api, "submit", "llm", "--concurrency-key", "c-1")
    assert bad.returncode == 2 and "needs a quota_policy_id" in bad.stderr
