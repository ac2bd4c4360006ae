"""The dashboard's reads (docs/dashboard.md#what-each-view-reads) on both topologies, without a
browser: every view answers from a real store, a fan-out is collapsed, bad input is refused."""

from __future__ import annotations

import uuid

import pytest

from flowfabric import Client, Worker
from flowfabric.server.api.dashboard import views
from flowfabric.server.api.servicers.base import ServerContext
from flowfabric.server.valkey.errors import FlowFabricError
from flowfabric.server.valkey.functions import Functions
from flowfabric.server.valkey.store import Store
from tests.conftest import API_TOKEN, HMAC_SECRET, Api


async def test_every_view_reads_the_store(api: Api, store: Store) -> None:
    ctx = ServerContext(api.server.config, store, Functions(store, HMAC_SECRET))
    async with Client(api.address, token=API_TOKEN) as client:
        job = await client.submit("view", {"x": 1}, lane="views", tags={"app.k": "<v>"})
        f = client.flow()
        root = f.add("root", {}, lane="views")
        for _ in range(7):
            f.add("leaf", {}, lane="views", after=[root])
        flow = await f.submit()
        budget, quota = str(uuid.uuid4()), str(uuid.uuid4())
        await client.create_budget(budget, dimensions={"total_tokens": (100, 0)})
        await client.report_usage(budget, total_tokens=7)
        await client.create_quota_policy(quota, window_seconds=10, max_concurrent=2)
        worker = Worker(api.address, token=API_TOKEN, lanes=["views"], handle_signals=False)

        lanes = {row["lane"]: row for row in (await views.lanes(ctx))["lanes"]}
        assert lanes["views"]["counts"]["eligible"] == 2  # the job and the flow's root
        assert lanes["views"]["counts"]["blocked:dependencies"] == 7

        page = await views.executions(ctx, "views", "eligible", "", "")
        assert job.execution_id in {row["execution_id"] for row in page["executions"]}
        assert (await views.executions(ctx, "views", "eligible", "completed", ""))[
            "executions"
        ] == []
        with pytest.raises(FlowFabricError, match="state must be one of"):
            await views.executions(ctx, "views", "nope", "", "")
        with pytest.raises(FlowFabricError, match="unknown public state"):
            await views.executions(ctx, "views", "eligible", "unspecified", "")

        detail = await views.execution(ctx, job.execution_id)
        assert detail["snapshot"]["tags"] == {"app.k": "<v>"}
        assert detail["snapshot"]["public_state"] == "PUBLIC_STATE_WAITING"
        assert detail["why"]["blocking_reason"] == "BLOCKING_REASON_WAITING_FOR_WORKER"

        assert flow.flow_id in {row["flow_id"] for row in (await views.flows(ctx))["flows"]}
        graph = await views.flow(ctx, flow.flow_id)
        kinds = {node["kind"]: node for node in graph["nodes"]}
        assert kinds["leaf"]["count"] == 7 and kinds["leaf"]["states"] == {"waiting_children": 7}
        assert kinds["root"]["count"] == 1 and len(graph["edges"]) == 1
        with pytest.raises(FlowFabricError) as missing:
            await views.flow(ctx, str(uuid.uuid4()))
        assert missing.value.code == "flow_not_found"

        money = await views.budgets(ctx)
        mine = next(b for b in money["budgets"] if b["budget_id"] == budget)
        assert mine["usage"] == {"total_tokens": "7"} and mine["hard_limits"]["total_tokens"]
        assert quota in {q["quota_policy_id"] for q in money["quotas"]}

        async with worker:  # registered (no claims run): listed, holding nothing
            listed = (await views.workers(ctx))["workers"]
            assert [w["lanes"] for w in listed] == [["views"]] and listed[0]["leases"] == []
