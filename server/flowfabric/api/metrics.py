"""Prometheus metrics on FF_METRICS_ADDR (docs/observability.md#metrics).

One `CollectorRegistry` per server (tests run several servers in one process), served by a
small asyncio HTTP handler on the server's own loop, so it stops with the server. Three kinds
of figure:

- **Counted where the server already sees the event**, with no extra Valkey round trip: gRPC
  calls (an interceptor), each FCALL's latency and the replies that say a lease expired, an
  execution was reclaimed, retried or ended, or how long a claimed head had waited
  (`valkey/observe.py`), and scanner cycles (`ScannerSet.on_cycle`).
- **Read from Valkey at scrape time** through `lane_reads.lane_depths` (lane depth by state,
  oldest eligible age, blocked by reason) and `budget_reads` (the top budgets by usage), so a
  scrape shows the ZCARDs of that moment. When the read fails those families are left out of
  the scrape rather than reported as 0.
- **Labels only from closed sets.** Lanes are capped: the top `FF_METRICS_LANES` lanes by
  backlog at each scrape, the rest summed into `lane="other"`; counters take the first
  `FF_METRICS_LANES` lanes they see and `other` after that. Budgets: the top
  `FF_METRICS_BUDGETS` (budget, dimension) pairs by usage ratio. `series_bounds()` states the
  most series each family can have.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from flowfabric.server.api.handlers import rewrap
from flowfabric.server.valkey import budget_reads
from flowfabric.server.valkey.functions.core import Leased, Outcome
from flowfabric.server.valkey.functions.execution import Ended, FailOutcome
from flowfabric.server.valkey.keys import BudgetKeys
from flowfabric.server.valkey.lane_reads import BLOCKED_REASONS, LANE_STATES, LaneDepth, lane_depths
from flowfabric.server.valkey.observe import FcallObserver
from flowfabric.server.valkey.store import Store

if TYPE_CHECKING:
    from flowfabric.server.config import Config
    from flowfabric.server.engine.scanners import ScannerSet

    Handler = grpc.RpcMethodHandler[Any, Any]
    Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    Handler = grpc.RpcMethodHandler
    Interceptor = grpc.aio.ServerInterceptor

log = logging.getLogger("flowfabric.metrics")

# `_created` series double every counter and histogram for a figure Prometheus derives itself
disable_created_metrics()  # type: ignore[no-untyped-call]

OTHER = "other"  # the bucket of lanes past the cap
UNKNOWN = "unknown"  # a counted event whose reply names no lane
BUDGETS_READ = 1000  # budgets read per scrape, in id order over the budget partitions
OUTCOMES = ("success", "failed", "cancelled", "expired")
CODES = tuple(c.name for c in grpc.StatusCode)
_CODE_BY_VALUE = {c.value[0]: c.name for c in grpc.StatusCode}
RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
FCALL_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
WAIT_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, 14400, 86400)
CYCLE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60)
READ_TIMEOUT_S = 10.0
HTTP_TIMEOUT_S = 10.0


def parse_addr(addr: str) -> tuple[str, int]:
    """`host:port` (`:port` = every interface; port 0 picks one)."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"FF_METRICS_ADDR must be host:port, got: {addr!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


class LaneLabels:
    """The `lane` label of counters: the first `cap` lanes seen keep their name, every later
    one is `other` (so a counter never has more than cap + 2 lane values)."""

    def __init__(self, cap: int, seed: Iterable[str] = ()) -> None:
        self.cap = cap
        self.named: set[str] = set()
        for lane in seed:
            self(lane)

    def __call__(self, lane: object) -> str:
        if not isinstance(lane, str) or not lane:
            return UNKNOWN
        if lane in self.named:
            return lane
        if len(self.named) < self.cap and lane not in (OTHER, UNKNOWN):
            self.named.add(lane)
            return lane
        return OTHER


@dataclass
class ScannerState:
    interval_s: float
    last_success: float | None = None  # wall clock, seconds


@dataclass
class Snapshot:
    """What one scrape read from Valkey."""

    lanes: dict[str, LaneDepth] | None = None
    now_ms: int = 0
    budgets: list[tuple[str, str, int, int, int]] | None = None  # id, dim, usage, hard, soft
    known_lanes: int = 0


def top_lanes(depths: Mapping[str, LaneDepth], cap: int) -> list[LaneDepth]:
    """The `cap` lanes with the most non-terminal executions (ties by name), then one `other`
    lane summing the rest (counts added, the oldest head kept), when there is a rest."""

    def backlog(d: LaneDepth) -> int:
        return sum(n for s, n in d.counts.items() if s != "terminal")

    ranked = sorted(depths.values(), key=lambda d: (-backlog(d), d.lane))
    named = [d for d in ranked if d.lane != OTHER][:cap]
    rest = [d for d in ranked if d not in named]
    if not rest:
        return named
    other = LaneDepth(OTHER)
    for d in rest:
        for state, n in d.counts.items():
            other.counts[state] += n
        if d.head_eligible_since_ms is not None and (
            other.head_eligible_since_ms is None
            or d.head_eligible_since_ms < other.head_eligible_since_ms
        ):
            other.head_eligible_since_ms = d.head_eligible_since_ms
    return [*named, other]


class _ValkeyCollector(Collector):
    """The scrape-time families, from the snapshot the current scrape read."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def collect(self) -> Iterable[Metric]:
        snap = self.m.snapshot
        yield from self._lanes(snap)
        yield from self._budgets(snap)
        yield from self._scanners()

    def _lanes(self, snap: Snapshot) -> Iterable[Metric]:
        if snap.lanes is None:
            return
        depth = GaugeMetricFamily(
            "flowfabric_lane_executions",
            "Executions in each lane's scheduling set, by state (ZCARD at scrape time).",
            labels=["lane", "state"],
        )
        age = GaugeMetricFamily(
            "flowfabric_lane_oldest_eligible_age_seconds",
            "How long the head of each lane's eligible queue has been eligible (0 = empty).",
            labels=["lane"],
        )
        blocked = GaugeMetricFamily(
            "flowfabric_blocked_executions",
            "Blocked executions over every lane, by reason.",
            labels=["reason"],
        )
        totals = dict.fromkeys(BLOCKED_REASONS, 0)
        for d in snap.lanes.values():
            for reason in BLOCKED_REASONS:
                totals[reason] += d.counts[f"blocked:{reason}"]
        for d in top_lanes(snap.lanes, self.m.lane_cap):
            for state in LANE_STATES:
                depth.add_metric([d.lane, state], d.counts[state])
            age.add_metric([d.lane], d.head_age_ms(snap.now_ms) / 1000)
        for reason, n in totals.items():
            blocked.add_metric([reason], n)
        lanes = GaugeMetricFamily(
            "flowfabric_lanes", "Lanes named by any partition's lane registry."
        )
        lanes.add_metric([], snap.known_lanes)
        yield from (depth, age, blocked, lanes)

    def _budgets(self, snap: Snapshot) -> Iterable[Metric]:
        if snap.budgets is None:
            return
        ratio = GaugeMetricFamily(
            "flowfabric_budget_usage_ratio",
            "Usage over the hard limit (the soft limit when there is no hard one), top budgets.",
            labels=["budget", "dimension"],
        )
        usage = GaugeMetricFamily(
            "flowfabric_budget_usage", "Usage of the top budgets.", labels=["budget", "dimension"]
        )
        limit = GaugeMetricFamily(
            "flowfabric_budget_limit",
            "Limits of the top budgets (0 = none).",
            labels=["budget", "dimension", "kind"],
        )
        for bid, dim, used, hard, soft in snap.budgets:
            ratio.add_metric([bid, dim], used / (hard or soft))
            usage.add_metric([bid, dim], used)
            limit.add_metric([bid, dim, "hard"], hard)
            limit.add_metric([bid, dim, "soft"], soft)
        yield from (ratio, usage, limit)

    def _scanners(self) -> Iterable[Metric]:
        if not self.m.scanner_state:
            return
        now = time.time()
        lag = GaugeMetricFamily(
            "flowfabric_scanner_lag_seconds",
            "Seconds since the scanner's last successful cycle ended (since start if none).",
            labels=["scanner"],
        )
        last = GaugeMetricFamily(
            "flowfabric_scanner_last_success_timestamp_seconds",
            "When the scanner's last successful cycle ended (0 = none yet).",
            labels=["scanner"],
        )
        interval = GaugeMetricFamily(
            "flowfabric_scanner_interval_seconds",
            "The scanner's configured interval.",
            labels=["scanner"],
        )
        for name, st in sorted(self.m.scanner_state.items()):
            lag.add_metric([name], now - (st.last_success or self.m.started_at))
            last.add_metric([name], st.last_success or 0)
            interval.add_metric([name], st.interval_s)
        yield from (lag, last, interval)


class _Fcalls(FcallObserver):
    """FCALL latency, and the events the replies report."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def timed(self, function: str) -> Any:
        return self.m.fcall_seconds.labels(function).time()

    def replied(self, function: str, ctx: Any, values: Mapping[str, object], reply: Any) -> None:
        seen = _SEEN.get(function)
        if seen is not None:
            seen(self.m, values, reply)


def _claimed(m: Metrics, values: Mapping[str, object], reply: Any) -> None:
    lane = m.lane_label(values.get("lane_id"))
    for row in reply.claimed:
        if row.attempt_type == "reclaim":
            m.reclaims.labels(lane).inc()
        elif row.claim_wait_ms is not None:
            m.claim_wait.labels(lane).observe(row.claim_wait_ms / 1000)


def _reclaimed(m: Metrics, values: Mapping[str, object], reply: Any) -> None:
    if isinstance(reply, Leased):
        m.reclaims.labels(m.lane_label(values.get("lane_id"))).inc()


def _expired_lease(m: Metrics, values: Mapping[str, object], reply: Any) -> None:
    if isinstance(reply, Outcome) and reply.outcome == "marked_expired":
        m.lease_expiries.inc()


def _completed(m: Metrics, values: Mapping[str, object], reply: Any) -> None:
    if type(reply) is Outcome:  # not a Replayed: that completion was counted the first time
        m.outcomes.labels("success").inc()


def _failed(m: Metrics, values: Mapping[str, object], reply: Any) -> None:
    if isinstance(reply, FailOutcome):
        if reply.outcome == "retry_scheduled":
            m.retries.inc()
        elif reply.outcome == "terminal_failed":
            m.outcomes.labels("failed").inc()


def _ended(m: Metrics, values: Mapping[str, object], reply: Any) -> None:
    if isinstance(reply, Ended) and reply.outcome in ("cancelled", "expired"):
        m.outcomes.labels(reply.outcome).inc()


# The replies that report a counted event (docs/observability.md#where-events-are-counted)
_SEEN = {
    "ff_claim_batch": _claimed,
    "ff_claim_admitted": _claimed,
    "ff_reclaim_execution": _reclaimed,
    "ff_mark_lease_expired_if_due": _expired_lease,
    "ff_complete_execution": _completed,
    "ff_fail_execution": _failed,
    "ff_cancel_execution": _ended,
    "ff_expire_execution": _ended,
}


class Metrics:
    """Every family of one server, its registry and its HTTP endpoint."""

    def __init__(self, config: Config, store: Store, functions: Sequence[str]) -> None:
        self.config = config
        self.store = store
        self.lane_cap = config.metrics_lanes
        self.budget_cap = config.metrics_budgets
        self.functions = tuple(functions)  # the library's functions: the `function` label set
        self.lane_label = LaneLabels(self.lane_cap, config.lanes)
        self.registry = CollectorRegistry()
        self.snapshot = Snapshot()
        self.scanner_state: dict[str, ScannerState] = {}
        self.started_at = time.time()
        self.methods: list[tuple[str, str, bool]] = []  # service, method, server-streaming
        self.port: int | None = None
        self.host = ""
        self._http: asyncio.Server | None = None
        self._scrape_lock = asyncio.Lock()
        r = self.registry
        self.rpc_handled = Counter(
            "flowfabric_grpc_server_handled", "RPCs completed, by service, method and code.",
            ["grpc_service", "grpc_method", "grpc_code"], registry=r,
        )  # fmt: skip
        self.rpc_seconds = Histogram(
            "flowfabric_grpc_server_handling_seconds",
            "Time to answer a unary-response RPC, by service and method.",
            ["grpc_service", "grpc_method"], buckets=RPC_BUCKETS, registry=r,
        )  # fmt: skip
        self.open_streams = Gauge(
            "flowfabric_grpc_server_open_streams",
            "Server-streaming RPCs open now (tails, watches, StreamWork), by method.",
            ["grpc_service", "grpc_method"], registry=r,
        )  # fmt: skip
        self.fcall_seconds = Histogram(
            "flowfabric_fcall_duration_seconds", "FCALL round trip, by Valkey Function.",
            ["function"], buckets=FCALL_BUCKETS, registry=r,
        )  # fmt: skip
        self.claim_wait = Histogram(
            "flowfabric_claim_wait_seconds",
            "How long a claimed execution had been eligible (eligible -> claimed), by lane.",
            ["lane"], buckets=WAIT_BUCKETS, registry=r,
        )  # fmt: skip
        self.reclaims = Counter(
            "flowfabric_reclaims", "Expired or revoked leases reclaimed by a claim, by lane.",
            ["lane"], registry=r,
        )  # fmt: skip
        self.lease_expiries = Counter(
            "flowfabric_lease_expiries", "Leases the lease-expiry scanner marked expired.",
            registry=r,
        )  # fmt: skip
        self.retries = Counter(
            "flowfabric_retries", "Failed attempts given a retry by the retry policy.",
            registry=r,
        )  # fmt: skip
        self.outcomes = Counter(
            "flowfabric_terminal_outcomes",
            "Executions ended by a complete, fail, cancel or expire call, by outcome.",
            ["outcome"], registry=r,
        )  # fmt: skip
        self.cycle_seconds = Histogram(
            "flowfabric_scanner_cycle_duration_seconds", "One pass of a scanner, by scanner.",
            ["scanner"], buckets=CYCLE_BUCKETS, registry=r,
        )  # fmt: skip
        self.cycle_failures = Counter(
            "flowfabric_scanner_cycle_failures", "Scanner cycles that failed, by scanner.",
            ["scanner"], registry=r,
        )  # fmt: skip
        self.scrape_failures = Counter(
            "flowfabric_metrics_read_failures",
            "Scrapes whose Valkey read failed (its families were left out), by read.",
            ["read"], registry=r,
        )  # fmt: skip
        r.register(_ValkeyCollector(self))

    # -- wiring -------------------------------------------------------------------------------

    def attach(self, stores: Iterable[Store], scanners: ScannerSet | None) -> None:
        for store in stores:
            store.observer = _Fcalls(self)
        if scanners is not None:
            names = [(s.name, s.interval_ms) for s in scanners.scanners]
            jobs = [scanners.reconciler] if scanners.reconciler is not None else []
            names += [
                (getattr(j, "name", "index_reconciler"), j.interval_ms)
                for j in jobs + scanners.cycles
            ]
            for name, interval_ms in names:
                self.scanner_state[name] = ScannerState(interval_ms / 1000)
            scanners.on_cycle = self.on_cycle

    def on_cycle(self, name: str, interval_ms: int, seconds: float, ok: bool) -> None:
        st = self.scanner_state.setdefault(name, ScannerState(interval_ms / 1000))
        self.cycle_seconds.labels(name).observe(seconds)
        if ok:
            st.last_success = time.time()
        else:
            self.cycle_failures.labels(name).inc()

    def interceptor(self) -> MetricsInterceptor:
        return MetricsInterceptor(self)

    def register_methods(self, server_methods: Iterable[tuple[str, str, bool]]) -> None:
        """The methods served (the closed set of `grpc_service`/`grpc_method`)."""
        self.methods = sorted(set(server_methods))

    # -- scrape -------------------------------------------------------------------------------

    async def read(self) -> Snapshot:
        """Read the scrape-time figures from Valkey; a failed read leaves its part None."""
        snap = Snapshot()
        cfg = self.config
        try:
            async with asyncio.timeout(READ_TIMEOUT_S):
                snap.now_ms = await self.store.time_ms()
                snap.lanes = await lane_depths(
                    self.store, range(cfg.flow_partitions), now_ms=snap.now_ms
                )
                snap.known_lanes = len(snap.lanes)
        except Exception as exc:
            snap.lanes = None
            self.scrape_failures.labels("lanes").inc()
            log.warning("metrics: lane read failed: %s", exc)
        try:
            async with asyncio.timeout(READ_TIMEOUT_S):
                snap.budgets = await self._top_budgets()
        except Exception as exc:
            snap.budgets = None
            self.scrape_failures.labels("budgets").inc()
            log.warning("metrics: budget read failed: %s", exc)
        return snap

    async def _top_budgets(self) -> list[tuple[str, str, int, int, int]]:
        n = self.config.budget_partitions

        async def status(part: int, bid: str) -> Any:
            return await budget_reads.budget_status(self.store, BudgetKeys.of(part, bid))

        rows, _ = await budget_reads.list_page(
            self.store, n, lambda p: BudgetKeys.of(p).policies, status, BUDGETS_READ, None
        )
        pairs: list[tuple[float, str, str, int, int, int]] = []
        for s in rows:
            for dim in set(s.hard_limits) | set(s.soft_limits):
                hard, soft = s.hard_limits.get(dim, 0), s.soft_limits.get(dim, 0)
                if hard or soft:
                    used = s.usage.get(dim, 0)
                    pairs.append((used / (hard or soft), s.budget_id, dim, used, hard, soft))
        pairs.sort(key=lambda p: (-p[0], p[1], p[2]))
        return [p[1:] for p in pairs[: self.budget_cap]]

    async def scrape(self) -> bytes:
        """One exposition: read Valkey, then render every family."""
        async with self._scrape_lock:
            self.snapshot = await self.read()
            return generate_latest(self.registry)

    # -- HTTP ---------------------------------------------------------------------------------

    async def serve(self, addr: str) -> int:
        host, port = parse_addr(addr)
        self._http = await asyncio.start_server(self._handle, host, port)
        self.port = int(self._http.sockets[0].getsockname()[1])
        self.host = "127.0.0.1" if host == "0.0.0.0" else host
        return self.port

    @property
    def url(self) -> str:
        """Where to scrape (every interface: shown as the loopback address)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    async def stop(self) -> None:
        """Stop listening; a scrape in progress gets a moment to finish."""
        if self._http is not None:
            http, self._http = self._http, None
            http.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await http.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(HTTP_TIMEOUT_S):
                request = (await reader.readline()).decode("latin-1").split()
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
                if len(request) < 2 or request[0] not in ("GET", "HEAD"):
                    status, body, ctype = "405 Method Not Allowed", b"GET only\n", "text/plain"
                elif request[1].split("?", 1)[0] not in ("/metrics", "/"):
                    status, body, ctype = "404 Not Found", b"see /metrics\n", "text/plain"
                else:
                    status, body, ctype = "200 OK", await self.scrape(), CONTENT_TYPE_LATEST
                head = (
                    f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                )
                writer.write(head.encode() + (b"" if request[:1] == ["HEAD"] else body))
                await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeError) as exc:
            log.debug("metrics: request dropped: %s", exc)
        finally:
            writer.close()

    # -- bounds -------------------------------------------------------------------------------

    def series_bounds(self) -> dict[str, int]:
        """The most series (samples of one scrape) each family can have, from the caps and
        closed label sets (docs/observability.md#series-bounds)."""
        methods = len(self.methods)
        streaming = sum(1 for *_, s in self.methods if s)
        lanes = self.lane_cap + 1  # top lanes + other
        counter_lanes = self.lane_cap + 2  # first lanes seen + other + unknown
        scanners = len(self.scanner_state)

        def hist(labelsets: int, buckets: Sequence[float]) -> int:
            return labelsets * (len(buckets) + 3)  # each bucket, +Inf, _sum, _count

        return {
            "flowfabric_grpc_server_handled": methods * len(CODES),
            "flowfabric_grpc_server_handling_seconds": hist(methods - streaming, RPC_BUCKETS),
            "flowfabric_grpc_server_open_streams": streaming,
            "flowfabric_fcall_duration_seconds": hist(len(self.functions), FCALL_BUCKETS),
            "flowfabric_claim_wait_seconds": hist(counter_lanes, WAIT_BUCKETS),
            "flowfabric_reclaims": counter_lanes,
            "flowfabric_lease_expiries": 1,
            "flowfabric_retries": 1,
            "flowfabric_terminal_outcomes": len(OUTCOMES),
            "flowfabric_scanner_cycle_duration_seconds": hist(scanners, CYCLE_BUCKETS),
            "flowfabric_scanner_cycle_failures": scanners,
            "flowfabric_metrics_read_failures": 2,
            "flowfabric_lane_executions": lanes * len(LANE_STATES),
            "flowfabric_lane_oldest_eligible_age_seconds": lanes,
            "flowfabric_blocked_executions": len(BLOCKED_REASONS),
            "flowfabric_lanes": 1,
            "flowfabric_budget_usage_ratio": self.budget_cap,
            "flowfabric_budget_usage": self.budget_cap,
            "flowfabric_budget_limit": 2 * self.budget_cap,
            "flowfabric_scanner_lag_seconds": scanners,
            "flowfabric_scanner_last_success_timestamp_seconds": scanners,
            "flowfabric_scanner_interval_seconds": scanners,
        }


def _code(exc: BaseException, context: Any) -> str:
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return "CANCELLED"
    if isinstance(exc, grpc.aio.AbortError):
        return _status(context) or "UNKNOWN"
    return "UNKNOWN"


def _status(context: Any) -> str | None:
    code = context.code()
    if code is None:
        return None
    if isinstance(code, grpc.StatusCode):
        return code.name
    return _CODE_BY_VALUE.get(int(code), "UNKNOWN")


class MetricsInterceptor(Interceptor):
    """Counts every served RPC by service, method and status code; times unary-response ones;
    tracks open server streams. Outermost, so auth denials are counted too."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler: Handler | None = await continuation(details)
        if handler is None:
            return handler  # an unknown method: no label for it
        service, _, method = details.method.lstrip("/").rpartition("/")
        return _instrument(handler, self.m, service, method)


def _instrument(handler: Handler, m: Metrics, service: str, method: str) -> Handler:

    def done(code: str) -> None:
        m.rpc_handled.labels(service, method, code).inc()

    async def unary(request: Any, context: Any) -> Any:
        behavior: Any = handler.unary_unary or handler.stream_unary
        started = time.perf_counter()
        try:
            reply = await behavior(request, context)
        except BaseException as exc:
            done(_code(exc, context))
            raise
        finally:
            m.rpc_seconds.labels(service, method).observe(time.perf_counter() - started)
        done(_status(context) or "OK")
        return reply

    async def streaming(request: Any, context: Any) -> AsyncIterator[Any]:
        behavior: Any = handler.unary_stream or handler.stream_stream
        gauge = m.open_streams.labels(service, method)
        gauge.inc()
        try:
            result = behavior(request, context)
            if hasattr(result, "__aiter__"):
                async for item in result:
                    yield item
            else:
                await result  # a handler that writes with context.write()
        except BaseException as exc:
            done(_code(exc, context))
            raise
        finally:
            gauge.dec()
        done(_status(context) or "OK")

    return rewrap(handler, unary, streaming)


def served_methods() -> list[tuple[str, str, bool]]:
    """(service, method, server-streaming) of every method the server registers."""
    from grpc_health.v1 import health_pb2

    from flowfabric.v1 import (
        admin_pb2,
        budget_pb2,
        execution_pb2,
        flow_pb2,
        schedule_pb2,
        signal_pb2,
        stream_pb2,
        worker_pb2,
    )  # fmt: skip

    modules = (admin_pb2, budget_pb2, execution_pb2, flow_pb2, schedule_pb2, signal_pb2,
               stream_pb2, worker_pb2, health_pb2)  # fmt: skip
    return [
        (svc.full_name, md.name, bool(md.server_streaming))
        for mod in modules
        for svc in mod.DESCRIPTOR.services_by_name.values()
        for md in svc.methods
    ]


async def start(
    config: Config, stores: Sequence[Store], scanners: ScannerSet | None
) -> Metrics | None:
    """The server's metrics, listening on FF_METRICS_ADDR; None when it is unset."""
    if not config.metrics_addr:
        return None
    metrics = Metrics(config, stores[0], library_functions(stores[0].library.source))
    metrics.register_methods(served_methods())
    metrics.attach(stores, scanners)
    await metrics.serve(config.metrics_addr)
    log.info("metrics on %s", metrics.url)
    return metrics


def library_functions(source: str) -> list[str]:
    """The names the Functions library registers (the `function` label set)."""
    return sorted(
        set(re.findall(r"""(?:register_function\(|function_name = )'(ff_\w+)'""", source))
    )
