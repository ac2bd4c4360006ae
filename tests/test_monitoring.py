"""Lint of the shipped monitoring (docs/observability.md#monitoring-as-code): the alert rules have
the Prometheus rule-file shape, every alert and dashboard query parses as PromQL, and every
metric they name is one a live server exports."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from flowfabric.server.app import FlowFabricServer
from flowfabric.server.config import Config
from flowfabric.server.embedded import ValkeyProcess
from tests.conftest import HMAC_SECRET

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "monitoring" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "monitoring" / "grafana" / "flowfabric.json"
DURATION = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")
# Grafana's variables, replaced by values of their kind before parsing
GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$instance": ".*"}
SERIES_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "gauge": ("",),
}


@pytest.fixture(scope="module")
async def exported(valkey_standalone: ValkeyProcess) -> AsyncIterator[set[str]]:
    """Every series name a live server's scrape offers (scanners on, so theirs too)."""
    config = Config(
        valkey_url=valkey_standalone.url, listen_addr="127.0.0.1:0",
        waitpoint_hmac_secret=HMAC_SECRET, shutdown_grace_s=1.0, boot_retry_s=5.0,
        metrics_addr="127.0.0.1:0",
    )  # fmt: skip
    server = FlowFabricServer(config)
    await server.start()
    try:
        assert server.metrics is not None
        url = f"http://127.0.0.1:{server.metrics.port}/metrics"

        def get() -> str:
            with urllib.request.urlopen(url, timeout=30) as reply:
                return str(reply.read().decode())

        text = await asyncio.to_thread(get)
    finally:
        await server.stop()
    names = set()
    for fam in text_string_to_metric_families(text):
        names |= {fam.name + s for s in SERIES_SUFFIXES.get(fam.type, ("",))}
    yield names


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (parsing it as PromQL)."""
    for var, val in GRAFANA_VARS.items():
        expr = expr.replace(var, val)
    found: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            found.add(node.name)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return found


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    assert isinstance(doc, dict) and set(doc) == {"groups"}
    out = []
    for group in doc["groups"]:
        assert set(group) <= {"name", "interval", "rules", "limit"} and group["name"]
        out += group["rules"]
    return out


def dashboard_queries() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and dash["panels"]
    out = []
    for panel in dash["panels"]:
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        out += [target["expr"] for target in panel["targets"]]
    return out


def test_rule_file_shape() -> None:
    names = set()
    for rule in rules():
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}
        assert re.fullmatch(r"[A-Z][A-Za-z0-9]+", rule["alert"]) and rule["alert"] not in names
        names.add(rule["alert"])
        assert DURATION.match(rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
    # what the monitoring promises (docs/observability.md#monitoring-as-code)
    assert {
        "FlowFabricClaimWaitHigh", "FlowFabricLeaseExpiriesHigh", "FlowFabricReclaimsHigh",
        "FlowFabricScannerLagging", "FlowFabricBudgetNearLimit", "FlowFabricBudgetExhausted",
    } <= names  # fmt: skip


def test_every_query_parses_and_names_exported_metrics(exported: set[str]) -> None:
    queries = [r["expr"] for r in rules()] + dashboard_queries()
    used = set()
    for q in queries:
        names = metric_names(q)
        assert names, f"selects no metric: {q}"
        assert names <= exported, f"{sorted(names - exported)} in {q}"
        used |= names
    assert len(used) >= 15, "the dashboard and rules cover the families"
    dash = json.loads(DASHBOARD.read_text())
    for var in dash["templating"]["list"]:
        for name in re.findall(r"label_values\((\w+)", json.dumps(var.get("query", ""))):
            assert name in exported, name


def test_the_lint_catches_an_unknown_metric_and_bad_promql() -> None:
    assert metric_names("rate(flowfabric_nope_total[5m]) > 1") == {"flowfabric_nope_total"}
    with pytest.raises(ValueError):
        metric_names("sum by (lane (flowfabric_reclaims_total)")
