"""Prometheus metrics (docs/observability.md#metrics), scraped over HTTP from a real server:
names follow the Prometheus conventions, the lane gauges equal the ZCARDs of the lane indexes
in every scrape, the counters see the events, and with 10,000 tenants over 200 lanes no
family has more series than `series_bounds()` states."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from flowfabric.server.app import FlowFabricServer
from flowfabric.server.config import Config
from flowfabric.server.valkey.keys import PartitionKeys
from flowfabric.server.valkey.lane_reads import known_lanes
from flowfabric.server.valkey.store import Store
from flowfabric.v1 import budget_pb2 as bpb
from flowfabric.v1 import budget_pb2_grpc
from flowfabric.v1 import execution_pb2 as pb
from flowfabric.v1 import types_pb2 as t
from flowfabric.v1 import worker_pb2 as wpb
from tests.conftest import API_TOKEN, FAST_SCANNERS, HMAC_SECRET, Api

PARTITIONS = 16
Families = dict[str, tuple[str, list[Sample]]]  # family -> (type, samples)


@contextlib.asynccontextmanager
async def serving(valkey_url: str, store: Store, run_scanners: bool) -> AsyncIterator[Api]:
    config = Config(
        valkey_url=valkey_url, listen_addr="127.0.0.1:0", api_token=API_TOKEN,
        waitpoint_hmac_secret=HMAC_SECRET, shutdown_grace_s=1.0, boot_retry_s=5.0,
        flow_partitions=PARTITIONS, scanner_intervals_ms=FAST_SCANNERS,
        metrics_addr="127.0.0.1:0", lanes=("default",),
    )  # fmt: skip
    server = FlowFabricServer(config, run_scanners=run_scanners)
    await store.call("DEL", "ff:config:partitions")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield Api(channel, store, server)
    finally:
        await channel.close()
        await server.stop()
        await store.call("DEL", "ff:config:partitions")


@pytest.fixture
async def metrics_api(valkey_url: str, store: Store) -> AsyncIterator[Api]:
    """A server of its own with metrics on a free port and the scanners running (100 ms)."""
    async with serving(valkey_url, store, run_scanners=True) as api:
        yield api


@pytest.fixture
async def quiet_api(valkey_url: str, store: Store) -> AsyncIterator[Api]:
    """The same without scanners (a 200-lane keyspace would keep fast scanners busy)."""
    async with serving(valkey_url, store, run_scanners=False) as api:
        yield api


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain")
        return str(reply.read().decode())


async def scrape(api: Api) -> Families:
    assert api.server.metrics is not None
    text = await asyncio.to_thread(_get, f"http://127.0.0.1:{api.server.metrics.port}/metrics")
    return {f.name: (f.type, list(f.samples)) for f in text_string_to_metric_families(text)}


def value(fams: Families, family: str, sample: str | None = None, **labels: str) -> float:
    """The sum of the samples of `family` (named `sample`, default the family) whose labels
    include `labels`."""
    name = sample or family
    return sum(
        s.value
        for s in fams[family][1]
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


async def zcard_sum(store: Store, state: str) -> int:
    parts = range(PARTITIONS)
    total = 0
    for lane in await known_lanes(store, parts):
        for p in parts:
            total += int(await store.call("ZCARD", PartitionKeys.of(p).lane(lane, state)))
    return total


def create(lane: str, namespace: str = "", **kw: object) -> pb.CreateExecutionRequest:
    return pb.CreateExecutionRequest(
        execution_kind="k", lane_id=lane, namespace=namespace,
        **kw,  # type: ignore[arg-type]
    )  # fmt: skip


async def claim(api: Api, lanes: list[str], max_tasks: int = 1) -> list[t.ClaimedTask]:
    reply = await api.worker.ClaimNext(
        wpb.ClaimNextRequest(
            worker_id="w", worker_instance_id="w-1", lane_ids=lanes, lease_ttl_ms=30_000,
            max_tasks=max_tasks,
        ),
        metadata=api.metadata,
    )  # fmt: skip
    kind = reply.WhichOneof("outcome")
    return [reply.task] if kind == "task" else list(reply.batch.tasks) if kind == "batch" else []


async def test_scrape_names_gauges_and_counters(metrics_api: Api) -> None:
    api = metrics_api
    md = api.metadata
    later = int(time.time() * 1000) + 3_600_000  # stays delayed
    retry = t.ExecutionPolicy(
        retry_policy=t.RetryPolicy(
            max_retries=1, backoff=t.Backoff(type="fixed", delay_ms=3_600_000)
        )
    )
    for req in [create("m-a", policy=retry), create("m-a"), create("m-a"), create("m-b"),
                create("m-b", delay_until=later)]:  # fmt: skip
        await api.execution.CreateExecution(req, metadata=md)
    failed, done = await claim(api, ["m-a"]), await claim(api, ["m-a"])
    await api.worker.CompleteExecution(
        wpb.CompleteExecutionRequest(lease=done[0].lease, result_payload=b"ok"), metadata=md
    )
    await api.worker.FailExecution(
        wpb.FailExecutionRequest(lease=failed[0].lease, failure_reason="x",
                                 failure_category="transient"), metadata=md,
    )  # fmt: skip
    with pytest.raises(grpc.aio.AioRpcError):
        await api.execution.GetExecution(pb.GetExecutionRequest(execution_id="{fp:1}:nope"))
    fams = await scrape(api)

    for name, (kind, samples) in fams.items():
        assert name.startswith("flowfabric_"), name
        for s in samples:
            if kind == "counter":
                assert s.name == name + "_total", s.name
        if kind == "histogram":
            assert name.endswith("_seconds"), name
    # backlog gauges equal the ZCARD sums, in every scrape
    for _ in range(3):
        for state in ("eligible", "delayed", "active", "terminal"):
            want = await zcard_sum(api.store, state)
            assert value(fams, "flowfabric_lane_executions", state=state) == want, state
        assert value(fams, "flowfabric_lane_executions", state="eligible", lane="m-b") == 1
        fams = await scrape(api)
    assert value(fams, "flowfabric_lane_executions", state="eligible") >= 2
    assert value(fams, "flowfabric_lane_oldest_eligible_age_seconds", lane="m-b") >= 0
    assert set(s.labels["reason"] for s in fams["flowfabric_blocked_executions"][1]) == {
        "dependencies", "budget", "quota", "route", "operator"
    }  # fmt: skip
    # counted events
    wait = "flowfabric_claim_wait_seconds"
    assert value(fams, wait, wait + "_count", lane="m-a") == 2
    assert value(fams, "flowfabric_terminal_outcomes", "flowfabric_terminal_outcomes_total",
                 outcome="success") == 1  # fmt: skip
    assert value(fams, "flowfabric_retries", "flowfabric_retries_total") == 1
    handled = "flowfabric_grpc_server_handled"
    svc = "flowfabric.v1.ExecutionService"
    assert value(fams, handled, handled + "_total", grpc_service=svc,
                 grpc_method="CreateExecution", grpc_code="OK") == 5  # fmt: skip
    assert value(fams, handled, handled + "_total", grpc_method="GetExecution",
                 grpc_code="UNAUTHENTICATED") == 1  # fmt: skip
    fcall = "flowfabric_fcall_duration_seconds"
    assert value(fams, fcall, fcall + "_count", function="ff_create_execution") == 5
    lag = fams["flowfabric_scanner_lag_seconds"][1]
    assert {"lease_expiry", "delayed_promoter", "unblock"} <= {s.labels["scanner"] for s in lag}


async def test_the_endpoint_answers_only_metrics(metrics_api: Api) -> None:
    assert metrics_api.server.metrics is not None
    base = f"http://127.0.0.1:{metrics_api.server.metrics.port}"
    with pytest.raises(urllib.error.HTTPError) as err:
        await asyncio.to_thread(_get, base + "/nothing")
    err.value.close()
    assert err.value.code == 404


async def test_series_stay_within_bounds_at_10000_tenants(quiet_api: Api) -> None:
    api = quiet_api
    if api.store.cluster:
        pytest.skip("the bounds do not depend on the topology; the standalone run checks them")
    md = api.metadata
    lanes = [f"lane-{i:03d}" for i in range(200)]
    # 10,000 tenants, 50 per lane, in batches of 1000
    items = [create(lanes[i % 200], namespace=f"tenant-{i:05d}") for i in range(10_000)]
    replies = await asyncio.gather(*(
        api.execution.CreateExecutions(
            pb.CreateExecutionsRequest(items=items[start : start + 1000]), metadata=md
        )
        for start in range(0, len(items), 1000)
    ))  # fmt: skip
    assert [len(r.results) for r in replies] == [1000] * 10
    claimed = await claim(api, lanes[:100], max_tasks=100)
    for lane in lanes[100:160]:  # claims on more lanes than the cap
        claimed += await claim(api, [lane])
    assert len({c.lease.lane_id for c in claimed}) > api.server.config.metrics_lanes
    budgets = budget_pb2_grpc.BudgetServiceStub(api.channel)
    for i in range(25):  # more than the top K shown
        bid = str(uuid.uuid4())
        await budgets.CreateBudget(
            bpb.CreateBudgetRequest(budget_id=bid, enforcement_mode="strict",
                                    dimensions=["total_tokens"], hard_limits=[100],
                                    soft_limits=[0]), metadata=md,
        )  # fmt: skip
        await budgets.ReportUsage(
            bpb.ReportUsageRequest(budget_id=bid, dimensions=["total_tokens"], deltas=[i * 4]),
            metadata=md,
        )

    fams = await scrape(api)
    assert api.server.metrics is not None
    bounds = api.server.metrics.series_bounds()
    for name, (_kind, samples) in fams.items():
        assert name in bounds, f"{name} has no stated bound"
        assert len(samples) <= bounds[name], (name, len(samples), bounds[name])
    lanes_shown = {s.labels["lane"] for s in fams["flowfabric_lane_executions"][1]}
    assert len(lanes_shown) == api.server.config.metrics_lanes + 1 and "other" in lanes_shown
    assert value(fams, "flowfabric_lane_executions", state="eligible") == await zcard_sum(
        api.store, "eligible"
    )
    per_lane: dict[str, float] = defaultdict(float)
    for s in fams["flowfabric_claim_wait_seconds"][1]:
        if s.name.endswith("_count"):
            per_lane[s.labels["lane"]] += s.value
    assert sum(per_lane.values()) == len(claimed) and len(per_lane) <= bounds["flowfabric_reclaims"]
    ratios = [s.value for s in fams["flowfabric_budget_usage_ratio"][1]]
    assert len(ratios) == api.server.config.metrics_budgets and max(ratios) == 0.96


def test_series_bounds_follow_the_caps() -> None:
    from flowfabric.server.api.metrics import Metrics, served_methods
    from flowfabric.server.valkey.store import Store

    store = Store.from_url("valkey://127.0.0.1:1")
    small = Metrics(dataclasses.replace(Config(), metrics_lanes=5, metrics_budgets=3), store, [])
    big = Metrics(dataclasses.replace(Config(), metrics_lanes=50, metrics_budgets=30), store, [])
    for m in (small, big):
        m.register_methods(served_methods())
    assert small.series_bounds()["flowfabric_lane_executions"] == 6 * 10
    assert big.series_bounds()["flowfabric_budget_limit"] == 60
    assert small.series_bounds()["flowfabric_grpc_server_handled"] == len(served_methods()) * 17


def test_metrics_settings_are_checked() -> None:
    from flowfabric.server.config import ConfigError

    cfg = Config.load(["--metrics-addr", ":0", "--metrics-lanes", "7"], env={})
    assert (cfg.metrics_addr, cfg.metrics_lanes, cfg.metrics_budgets) == (":0", 7, 20)
    for env in ({"FF_METRICS_ADDR": "9464"}, {"FF_METRICS_ADDR": "h:99999"},
                {"FF_METRICS_LANES": "0"}, {"FF_METRICS_BUDGETS": "1001"}):  # fmt: skip
        with pytest.raises(ConfigError, match=next(iter(env))):
            Config.load([], env=env)


async def test_a_failed_read_leaves_the_gauges_out_instead_of_zero() -> None:
    """Valkey unreachable (nothing listens on the port): the scrape still answers, without the
    lane and budget families, and counts the failed reads."""
    from flowfabric.server.api.metrics import Metrics

    store = Store.from_url("valkey://127.0.0.1:1")
    try:
        m = Metrics(Config(flow_partitions=4, budget_partitions=2), store, ["ff_x"])
        text = (await m.scrape()).decode()
    finally:
        await store.close()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert "flowfabric_lane_executions" not in fams and "flowfabric_budget_usage_ratio" not in fams
    failures = {s.labels["read"]: s.value for s in fams["flowfabric_metrics_read_failures"].samples}
    assert failures == {"lanes": 1, "budgets": 1}


async def test_open_watches_are_counted_while_open(metrics_api: Api) -> None:
    api = metrics_api
    created = await api.execution.CreateExecution(create("m-w"), metadata=api.metadata)
    call = api.execution.WatchExecution(
        pb.WatchExecutionRequest(execution_id=created.created.execution_id), metadata=api.metadata
    )
    await call.read()  # the current state: the watch is open
    gauge, svc = "flowfabric_grpc_server_open_streams", "flowfabric.v1.ExecutionService"
    fams = await scrape(api)
    assert value(fams, gauge, grpc_service=svc, grpc_method="WatchExecution") == 1
    call.cancel()
    handled = "flowfabric_grpc_server_handled"
    while True:  # the server sees the cancel a moment later
        fams = await scrape(api)
        if value(fams, gauge, grpc_method="WatchExecution") == 0:
            break
        await asyncio.sleep(0.05)
    assert value(fams, handled, handled + "_total", grpc_method="WatchExecution",
                 grpc_code="CANCELLED") == 1  # fmt: skip


def test_serve_prints_the_metrics_url_and_serves_it(tmp_path: Path) -> None:
    """The embedded quick start with `--metrics-addr`: the second line names the URL."""
    cli = [sys.executable, "-c", "from flowfabric.cli import main; main()"]
    argv = [*cli, "serve", "--listen-addr", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0",
            "--data-dir", str(tmp_path / "d")]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("FF_")}
    env["FF_DASHBOARD"] = "off"  # the quick start would print its URL first
    with (
        (tmp_path / "serve.log").open("w") as stderr,
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env) as proc,
    ):
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().startswith("flowfabric listening on 127.0.0.1:")
            line = proc.stdout.readline().strip()
            assert line.startswith("flowfabric metrics on http://127.0.0.1:"), line
            body = _get(line.rsplit(" ", 1)[1])
            assert "\nflowfabric_lanes 0.0\n" in body, "read from the (empty) embedded Valkey"
            assert 'flowfabric_scanner_lag_seconds{scanner="lease_expiry"}' in body
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
