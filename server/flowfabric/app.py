"""Boot, serve and shut down, in the order docs/architecture.md#configuration-and-boot write down.

Boot: with no Valkey URL, lock the data dir (one server per dir), stop an orphaned child, start
the embedded Valkey with its password (supervised from then on: restarted if it exits) →
connect (retrying for FF_BOOT_RETRY_S) → version gate → partition config (atomic first write)
→ Functions library → waitpoint HMAC secret on every
partition → servicers, health SERVING, reflection, interceptors → bind.
Shutdown (safe to call twice): health NOT_SERVING → stop accepting and drain in-flight RPCs
within the grace period → stop background tasks → close Valkey → stop the embedded Valkey
with a persisting shutdown (SIGTERM), then release the data dir lock.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from flowfabric.server.api import limits, logs, reflection
from flowfabric.server.api.dashboard import DashboardServer
from flowfabric.server.api.interceptors import FlowFabricInterceptor
from flowfabric.server.api.servicers import (
    admin,
    budget,
    execution,
    flow,
    lane,
    schedule,
    signal,
    stream,
    worker,
)
from flowfabric.server.api.servicers.base import ServerContext
from flowfabric.server.api.streams import StreamSlots
from flowfabric.server.api.watches import SignalWatches
from flowfabric.server.config import Config, ConfigError, redact_url
from flowfabric.server.embedded import (
    ValkeyProcess,
    lock_data_dir,
    stop_orphan,
    unlock_data_dir,
)
from flowfabric.server.engine.aio import cancel_and_wait
from flowfabric.server.engine.budget_admission import BudgetCheck, BudgetReleaser
from flowfabric.server.engine.budgets import budget_jobs
from flowfabric.server.engine.bulk import BulkJobs, BulkRunner
from flowfabric.server.engine.events import EventHub
from flowfabric.server.engine.flows import (
    FlowCanceller,
    FlowProjector,
    FollowUpResolver,
    flow_scanners,
)
from flowfabric.server.engine.keystore import embedded_password, install_secret, resolve_secret
from flowfabric.server.engine.lane_partitions import LanePartitions
from flowfabric.server.engine.lifecycle import lifecycle_scanners
from flowfabric.server.engine.quota_admission import AdmissionReleaser, QuotaCheck
from flowfabric.server.engine.ready import ReadyHints
from flowfabric.server.engine.scanners import ScannerSet
from flowfabric.server.engine.scheduler import Scheduler
from flowfabric.server.engine.schedules import ScheduleEngine
from flowfabric.server.engine.suspension import suspension_scanners
from flowfabric.server.engine.unblock import Unblocker
from flowfabric.server.valkey.durability import Durability
from flowfabric.server.valkey.errors import FlowFabricError
from flowfabric.server.valkey.functions import Functions
from flowfabric.server.valkey.keys import PARTITION_CONFIG
from flowfabric.server.valkey.store import Store, is_transport_error
from flowfabric.server.valkey.workers import WorkerRegistry
from flowfabric.v1 import (
    admin_pb2,
    budget_pb2,
    budget_pb2_grpc,
    execution_pb2,
    flow_pb2,
    flow_pb2_grpc,
    lane_pb2,
    lane_pb2_grpc,
    schedule_pb2,
    schedule_pb2_grpc,
    signal_pb2,
    signal_pb2_grpc,
    stream_pb2,
    stream_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)

if TYPE_CHECKING:
    from flowfabric.server.api.metrics import Metrics

log = logging.getLogger("flowfabric.server")
# `flowfabric serve` sets up logging through the boot module (main imports app only)
configure_logging = logs.configure

HEALTH_PING_INTERVAL_S = 2.0
EMBEDDED_WATCH_INTERVAL_S = 0.2
EMBEDDED_RESTART_MAX_DELAY_S = 5.0
# The health service name whose status says whether FF_DURABILITY's promise can be kept now
# (docs/durability.md#boot-and-health); "" stays about reaching Valkey at all.
DURABILITY_HEALTH = "flowfabric.durability"


class BootError(RuntimeError):
    """Boot cannot continue (exit code 1)."""


class FlowFabricServer:
    """One server process: `await start()`, then `await stop()` (idempotent)."""

    def __init__(self, config: Config, *, run_scanners: bool = True) -> None:
        self.config = config
        self.run_scanners = run_scanners
        self.hub: EventHub | None = None
        self.canceller: FlowCanceller | None = None
        self.scheduler: Scheduler | None = None
        self.ready: ReadyHints | None = None
        self.follow_ups: FollowUpResolver | None = None
        self.releaser: AdmissionReleaser | None = None
        self.budget_releaser: BudgetReleaser | None = None
        self.unblocker: Unblocker | None = None
        self.scanners: ScannerSet | None = None
        self.embedded: ValkeyProcess | None = None
        self.store: Store | None = None
        self.stream_store: Store | None = None  # dedicated pool for blocking stream reads
        self.streams: stream.StreamServicer | None = None
        self.signal_watches: SignalWatches | None = None
        self.admin: admin.AdminServicer | None = None
        self.executions: execution.ExecutionServicer | None = None
        self.dashboard: DashboardServer | None = None
        self.dashboard_port: int | None = None  # set when FF_DASHBOARD is on (docs/dashboard.md)
        # the quick start's default dashboard: a taken port is a warning, not a boot failure
        self.dashboard_optional = False
        self.server: grpc.aio.Server | None = None
        self.metrics: Metrics | None = None  # FF_METRICS_ADDR (docs/observability.md)
        # grpc_health ships no stubs for its aio module
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self.port: int | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = False
        self.health_ping_interval_s = HEALTH_PING_INTERVAL_S
        self._lock_fd: int | None = None
        self._embedded_down = False  # the supervisor is restarting the embedded Valkey
        self._secret = ""
        self._durability_problems: list[str] = []

    # -- boot ---------------------------------------------------------------------------------

    def _preflight(self) -> tuple[str, str | None]:
        """The checks of the configuration before anything starts: the waitpoint secret, the
        embedded Valkey's password, the durability mode, the tracing extra."""
        cfg = self.config
        try:
            secret = resolve_secret(cfg)
            password = embedded_password(cfg.data_dir) if cfg.embedded else None
        except ConfigError as exc:
            raise BootError(str(exc)) from None
        problem = cfg.durability_problem()
        if problem:
            raise BootError(problem)
        if cfg.otel and importlib.util.find_spec("opentelemetry.sdk") is None:
            raise BootError(
                "tracing is on (FF_OTEL or OTEL_EXPORTER_OTLP_ENDPOINT) but OpenTelemetry is not "
                "installed: install the `otel` extra (flowfabric[otel]), or set FF_OTEL=0"
            )
        return secret, password

    async def start(self) -> int:
        cfg = self.config
        if cfg.embedded:
            # first of all: one server per data dir (the lock dies with this process)
            self._lock_fd = lock_data_dir(cfg.data_dir.resolve())
        secret, password = self._preflight()
        self._secret = secret
        if cfg.embedded:
            data_dir = cfg.data_dir.resolve()
            await asyncio.to_thread(stop_orphan, data_dir)
            # FF_DURABILITY=fsync: Valkey fsyncs every write before it replies
            # (docs/durability.md#fsync)
            fsync = "always" if cfg.durability == "fsync" else "everysec"
            self.embedded = await asyncio.to_thread(
                ValkeyProcess(data_dir, password=password, appendfsync=fsync).start
            )
            log.info("embedded Valkey on 127.0.0.1:%s (data in %s)", self.embedded.port, data_dir)
        url = cfg.resolved_valkey_url(self.embedded.url if self.embedded else None)
        self.store = await self._connect(url)
        self.stream_store = await self._connect(url)
        version = await self._retry(self.store.check_version, "Valkey version check")
        assert isinstance(version, tuple)
        await self._partition_config(self.store)
        await self._retry(self.store.ensure_library, "Functions library load")
        fn = Functions(self.store, secret)
        try:
            await install_secret(fn.keystore, cfg.flow_partitions, secret)
        except FlowFabricError as exc:
            raise BootError(f"installing the waitpoint HMAC secret failed: {exc.code}") from exc
        await self._durability(self.store)
        # every lane's partitions, one set for creates and claims
        # (docs/lifecycle.md#lanes-across-a-cluster)
        lane_parts = LanePartitions(cfg.flow_partitions, self.store, cfg.lane_spread)
        ctx = ServerContext(config=cfg, store=self.store, functions=fn, lane_partitions=lane_parts)
        self.hub = EventHub(self.store)
        self.ready = ReadyHints(self.hub, cfg.flow_partitions)
        self.follow_ups = FollowUpResolver(fn, cfg.flow_partitions)
        self.ready.on_pending(self.follow_ups.schedule)
        self.releaser = AdmissionReleaser(fn, cfg.quota_partitions)
        self.ready.on_released(self.releaser.schedule)
        self.budget_releaser = BudgetReleaser(fn, cfg.budget_partitions)
        self.ready.on_released(self.budget_releaser.schedule)
        await self.ready.start()
        self.scheduler = Scheduler(
            fn, self.store, cfg.flow_partitions, self.hub, self.ready, cfg.tenant_weights,
            lane_parts,
        )  # fmt: skip
        # capabilities (the default, in-slot), then budgets, then the quota
        # (docs/lifecycle.md#admission)
        self.scheduler.admission.register(BudgetCheck(self.store, cfg.budget_partitions, fn))
        self.quota_check = QuotaCheck(self.store, fn, cfg.quota_partitions)
        self.scheduler.admission.register(self.quota_check)
        # blocked work is woken by the event that clears it (docs/budgets.md#waking-blocked-work)
        self.unblocker = Unblocker(
            self.store, fn, cfg.flow_partitions, cfg.budget_partitions, cfg.quota_partitions,
            self.scheduler.wake_local,
        )  # fmt: skip
        self.scheduler.admission.after_block(self.unblocker.blocked)
        self.releaser.after_release(self.unblocker.released)
        self.quota_check.after_refund(self.unblocker.released)
        self.budget_releaser.after_release(self.unblocker.budget_freed)
        registry = WorkerRegistry(self.store)
        self.scanners = lifecycle_scanners(
            cfg, self.store, fn, registry, self.scheduler.wake_local, self.unblocker
        )
        for scanner in suspension_scanners(cfg, self.store, fn):
            self.scanners.add(scanner)
        self.canceller = FlowCanceller(self.store, fn)
        for scanner in flow_scanners(cfg, fn, self.canceller, self.scheduler.wake_local):
            self.scanners.add(scanner)
        self.scanners.cycles += budget_jobs(cfg, self.store, fn, self.unblocker.budget_reset)
        # periodic work (docs/schedules.md)
        self.schedules = ScheduleEngine(self.store, fn, cfg.flow_partitions)
        self.scanners.cycles.append(self.schedules)
        # bulk cancel / replay jobs (docs/lanes.md#bulk-actions)
        self.bulk_jobs = BulkJobs(self.store, fn, cfg.flow_partitions, cfg.bulk_page_size)
        self.bulk_runner = BulkRunner(
            self.bulk_jobs, lease_ms=cfg.bulk_lease_ms, page_pause_ms=cfg.bulk_page_pause_ms
        )
        self.bulk_runner.on_created = self.scheduler.wake_local
        self.scanners.cycles.append(self.bulk_runner)
        self.scanners.cycles.append(
            FlowProjector(
                self.store, fn, cfg.flow_partitions, cfg.interval_ms("FF_FLOW_PROJECTOR_INTERVAL_S")
            )
        )
        if cfg.metrics_addr:  # prometheus_client is imported only when metrics are asked for
            from flowfabric.server.api import metrics

            scanned = self.scanners if self.run_scanners else None
            self.metrics = await metrics.start(cfg, [self.store, self.stream_store], scanned)
        self.server = self._build_server(ctx, ".".join(map(str, version)), registry)
        self.port = self._bind(self.server)
        await self.server.start()
        await self._start_dashboard(ctx)
        if self.run_scanners:
            self.scanners.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self._tasks.append(asyncio.create_task(self._health_loop(), name="health"))
        if self.embedded is not None:
            self._tasks.append(asyncio.create_task(self._supervise_embedded(), name="embedded"))
        if not cfg.api_token:
            log.warning(
                "FF_API_TOKEN is unset: every RPC is unauthenticated, including "
                "ListPendingWaitpoints (returns signal credentials), GetExecutionResult and "
                "AdminService"
            )
        log.info("flowfabric serving on port %s", self.port)
        return self.port

    async def _start_dashboard(self, ctx: ServerContext) -> None:
        """The web dashboard on its own port, when FF_DASHBOARD names one (docs/dashboard.md)."""
        addr = self.config.dashboard_addr
        if addr is None:
            return
        assert self.executions is not None and self.streams is not None
        self.dashboard = DashboardServer(addr, ctx, self.executions, self.streams)
        try:
            self.dashboard_port = await self.dashboard.start()
        except OSError as exc:
            self.dashboard = None
            if not self.dashboard_optional:
                raise BootError(str(exc)) from None
            log.warning("%s; serving without it (set FF_DASHBOARD=host:port)", exc)
            return
        log.info("dashboard on http://%s/", self.dashboard_url_host())

    def dashboard_url_host(self) -> str:
        """`host:port` of the running dashboard, for its URL."""
        assert self.config.dashboard_addr is not None
        host = self.config.dashboard_addr.rpartition(":")[0].strip("[]")
        if host in ("", "0.0.0.0", "::"):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"{host}:{self.dashboard_port}"

    async def _durability(self, store: Store) -> None:
        """Check that the primaries can keep FF_DURABILITY's promise, then make writing calls
        wait for it (docs/durability.md#boot-and-health). Boot's own writes (partition config,
        HMAC secret) are idempotent and redone at every boot, so they do not wait."""
        cfg = self.config
        store.durability = Durability(
            cfg.durability,  # type: ignore[arg-type]  # validated by durability_problem
            cfg.durability_replicas,
            cfg.durability_timeout_ms,
        )
        problems = await self._retry(store.durability_problems, "durability check")
        assert isinstance(problems, list)
        if problems and cfg.durability == "fsync":
            raise BootError("; ".join(problems))
        for problem in problems:
            log.warning("durability: %s", problem)
        await self._set_durability_health(problems)
        log.info(
            "durability %s%s", cfg.durability,
            f" ({cfg.durability_replicas} replicas, {cfg.durability_timeout_ms} ms)"
            if cfg.durability == "replicated" else "",
        )  # fmt: skip

    async def _set_durability_health(self, problems: list[str]) -> None:
        status = health_pb2.HealthCheckResponse
        await self.health.set(DURABILITY_HEALTH, status.NOT_SERVING if problems else status.SERVING)
        self._durability_problems = problems

    async def _check_durability(self) -> None:
        """The health loop's re-check: a failover may promote a node configured differently,
        and replicas come and go."""
        assert self.store is not None
        if self.config.durability == "os":
            return
        try:
            problems = await self.store.durability_problems()
        except Exception as exc:
            problems = [f"durability check failed: {exc}"]
        if problems != self._durability_problems:
            for problem in problems:
                log.warning("durability: %s; health %s NOT_SERVING", problem, DURABILITY_HEALTH)
            if not problems:
                log.warning("durability: promise kept again; health %s SERVING", DURABILITY_HEALTH)
        await self._set_durability_health(problems)

    async def _connect(self, url: str) -> Store:
        store = Store.from_url(url)

        async def connect() -> None:
            if store.cluster:
                await store.client.initialize()
            if not await store.client.ping():
                raise BootError("PING did not answer PONG")

        await self._retry(connect, f"connect to Valkey at {redact_url(url)}")
        return store

    async def _retry(self, step: Callable[[], Awaitable[object]], what: str) -> object:
        """Retry transient failures with backoff 200 ms doubling to 5 s, for FF_BOOT_RETRY_S."""
        deadline = time.monotonic() + self.config.boot_retry_s
        delay = 0.2
        while True:
            try:
                return await step()
            except Exception as exc:
                if not is_transport_error(exc) or time.monotonic() + delay > deadline:
                    raise BootError(f"{what} failed: {exc}") from exc
                log.warning("%s failed (%s); retrying in %.1fs", what, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _partition_config(self, store: Store) -> None:
        """First boot writes the counts atomically; later boots must agree
        (docs/architecture.md#partition-counts)."""
        cfg = self.config
        want = {
            "num_flow_partitions": str(cfg.flow_partitions),
            "num_budget_partitions": str(cfg.budget_partitions),
            "num_quota_partitions": str(cfg.quota_partitions),
        }
        pipe = store.client.pipeline(transaction=True)
        for name, value in want.items():
            pipe.hsetnx(PARTITION_CONFIG, name, value)
        pipe.hgetall(PARTITION_CONFIG)
        stored_raw = (await store.run_pipeline(pipe))[-1]
        stored = {k.decode(): v.decode() for k, v in stored_raw.items()}
        if any(stored.get(k) != v for k, v in want.items()):
            raise BootError(
                "partition counts are fixed at deployment time: the keyspace has "
                f"{stored}, this server is configured with {want}"
            )

    def _build_server(
        self, ctx: ServerContext, valkey_version: str, registry: WorkerRegistry
    ) -> grpc.aio.Server:
        trace = None
        if self.config.otel:  # docs/observability.md#traces; imports OpenTelemetry only then
            from flowfabric.server.api import tracing

            tracing.configure()
            trace = tracing.wrap
        server = grpc.aio.server(
            interceptors=[
                *([self.metrics.interceptor()] if self.metrics is not None else []),
                FlowFabricInterceptor(self.config.api_token, self.config.admin_token, trace),
            ],
            options=[
                ("grpc.max_receive_message_length", limits.GRPC_MAX_RECEIVE),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
                ("grpc.http2.max_pings_without_data", 0),
                # gRPC binds with SO_REUSEPORT by default: a second server on a taken port would
                # silently share it (each with its own store), so binding must fail instead
                ("grpc.so_reuseport", 0),
            ],
        )
        from flowfabric.v1 import admin_pb2_grpc, execution_pb2_grpc

        assert self.scheduler is not None
        self.executions = execution.ExecutionServicer(
            ctx,
            self.hub,
            self.scheduler.wake_local,
            intake=self.scheduler.lane_controls.check_intake,
        )
        execution_pb2_grpc.add_ExecutionServiceServicer_to_server(self.executions, server)
        worker_pb2_grpc.add_WorkerServiceServicer_to_server(
            worker.WorkerServicer(ctx, self.scheduler, registry), server
        )
        self.admin = admin.AdminServicer(ctx, valkey_version)
        admin_pb2_grpc.add_AdminServiceServicer_to_server(self.admin, server)
        assert self.store is not None and self.hub is not None
        self.signal_watches = SignalWatches(self.store, self.hub)
        signal_pb2_grpc.add_SignalServiceServicer_to_server(
            signal.SignalServicer(ctx, self.signal_watches), server
        )
        assert self.stream_store is not None
        self.streams = stream.StreamServicer(
            ctx, self.hub, self.stream_store, StreamSlots(self.config.max_concurrent_stream_ops)
        )
        stream_pb2_grpc.add_StreamServiceServicer_to_server(self.streams, server)
        flow_pb2_grpc.add_FlowServiceServicer_to_server(
            flow.FlowServicer(ctx, self.hub, self.canceller, self.scheduler.wake_local), server
        )
        budgets = budget.BudgetServicer(ctx)
        if self.unblocker is not None:
            budgets.on_reset = self.unblocker.budget_reset
        budget_pb2_grpc.add_BudgetServiceServicer_to_server(budgets, server)
        schedule_pb2_grpc.add_ScheduleServiceServicer_to_server(
            schedule.ScheduleServicer(ctx, self.schedules), server
        )
        lane_pb2_grpc.add_LaneServiceServicer_to_server(
            lane.LaneServicer(ctx, self.scheduler.lane_controls, self.bulk_jobs), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = [
            m.DESCRIPTOR.services_by_name[s].full_name
            for m, s in [
                (execution_pb2, "ExecutionService"),
                (worker_pb2, "WorkerService"),
                (signal_pb2, "SignalService"),
                (stream_pb2, "StreamService"),
                (flow_pb2, "FlowService"),
                (budget_pb2, "BudgetService"),
                (schedule_pb2, "ScheduleService"),
                (lane_pb2, "LaneService"),
                (admin_pb2, "AdminService"),
            ]
        ]
        reflection.enable(
            [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name], server
        )
        return server

    def _bind(self, server: grpc.aio.Server) -> int:
        addr = self.config.listen_addr
        host = addr.rsplit(":", 1)[0].strip("[]")
        if host not in ("127.0.0.1", "localhost", "::1") and not self.config.api_token:
            log.warning(
                "LISTENING ON %s WITHOUT FF_API_TOKEN: anyone who can reach this address can "
                "drive the engine",
                addr,
            )
        creds = None
        if self.config.tls_cert and self.config.tls_key:
            creds = grpc.ssl_server_credentials(
                [(self.config.tls_key.read_bytes(), self.config.tls_cert.read_bytes())]
            )
        try:
            if creds is not None:
                port = server.add_secure_port(addr, creds)
            else:
                port = server.add_insecure_port(addr)
        except RuntimeError as exc:  # grpc raises when the address is taken
            raise BootError(f"cannot bind {addr}: {exc}") from None
        if port == 0:
            raise BootError(f"cannot bind {addr}")
        return int(port)

    async def _health_loop(self) -> None:
        """NOT_SERVING after two failed pings in a row, or while a critical scanner has made
        no progress for several intervals; SERVING again when both are well
        (docs/architecture.md#health)."""
        failures = 0
        stalled: list[str] = []
        assert self.store is not None
        while True:
            await asyncio.sleep(self.health_ping_interval_s)
            if self._embedded_down:
                continue  # the supervisor owns health until the restarted Valkey is ready
            if await self.store.ping():
                if failures >= 2:
                    log.warning("Valkey reachable again")
                failures = 0
                now_stalled = self.scanners.stalled() if self.scanners is not None else []
                if now_stalled and now_stalled != stalled:
                    log.error("scanners stalled: %s; health NOT_SERVING", ", ".join(now_stalled))
                elif stalled and not now_stalled:
                    log.warning("scanners progressing again; health SERVING")
                stalled = now_stalled
                status = health_pb2.HealthCheckResponse
                await self.health.set("", status.NOT_SERVING if stalled else status.SERVING)
                await self._check_durability()
            else:
                failures += 1
                if failures == 2:
                    log.error("Valkey unreachable; health NOT_SERVING")
                if failures >= 2:
                    await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)

    async def _supervise_embedded(self) -> None:
        """Restart the embedded Valkey when it exits: same port, data dir and password, backoff
        200 ms doubling to 5 s; then reload the library and re-install the HMAC secret as boot
        does. Health is NOT_SERVING from the exit until the restart is complete."""
        embedded, store = self.embedded, self.store
        assert embedded is not None and store is not None
        while True:
            await asyncio.sleep(EMBEDDED_WATCH_INTERVAL_S)
            if embedded.alive() or self._stopped:
                continue
            code = embedded.proc.returncode if embedded.proc is not None else None
            log.error("embedded Valkey exited (code %s); restarting it; health NOT_SERVING", code)
            self._embedded_down = True
            await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
            delay = 0.2
            while not self._stopped:
                try:
                    if not embedded.alive():
                        await asyncio.to_thread(embedded.start)
                    await store.ensure_library()
                    await install_secret(
                        Functions(store, self._secret).keystore,
                        self.config.flow_partitions,
                        self._secret,
                    )
                    break
                except Exception as exc:
                    log.error("embedded Valkey restart failed (%s); retrying in %.1fs", exc, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, EMBEDDED_RESTART_MAX_DELAY_S)
            if self._stopped:
                return
            self._embedded_down = False
            await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
            log.warning("embedded Valkey restarted on port %s; health SERVING", embedded.port)

    # -- shutdown -----------------------------------------------------------------------------

    async def _stop_background(self) -> None:
        if self.ready is not None:
            await self.ready.stop()
        if self.follow_ups is not None:
            await self.follow_ups.stop()  # deps_pending keeps the rest for the reconciler
        if self.budget_releaser is not None:
            await self.budget_releaser.stop()  # the budget reconciler returns what is left
        if self.releaser is not None:
            await self.releaser.stop()  # the quota reconciler frees what is left
        if self.unblocker is not None:
            await self.unblocker.stop()  # the unblock scanner returns what is left
        if self.canceller is not None:
            await self.canceller.stop(self.config.shutdown_grace_s)  # the backlog keeps the rest
        if self.scanners is not None:
            await self.scanners.stop()

    async def _end_live_feeds(self) -> None:
        if self.streams is not None:
            self.streams.shutdown()  # live tails end with UNAVAILABLE shutting_down
        if self.signal_watches is not None:
            self.signal_watches.shutdown()  # likewise the signal and waitpoint watches
        if self.dashboard is not None:
            await self.dashboard.stop()  # its live feeds end with the watches above

    async def stop(self, grace: float | None = None) -> None:
        if self._stopped:
            return
        self._stopped = True
        grace = self.config.shutdown_grace_s if grace is None else grace
        await self.health.enter_graceful_shutdown()
        if self.scheduler is not None:
            self.scheduler.closing.set()  # long-polling claims answer NoWork now
        await self._end_live_feeds()
        if self.server is not None:
            await self.server.stop(grace)
        await self._stop_background()
        if self.metrics is not None:
            await self.metrics.stop()
        if self.hub is not None:
            await self.hub.stop()
        await cancel_and_wait(self._tasks)
        if self.store is not None:
            await self.store.close()
        if self.stream_store is not None:
            await self.stream_store.close()
        if self.embedded is not None:
            await asyncio.to_thread(self.embedded.stop)
        if self.config.otel:
            from flowfabric.server.api import tracing

            await asyncio.to_thread(tracing.flush)  # export the spans still batched
        if self._lock_fd is not None:
            unlock_data_dir(self._lock_fd)
            self._lock_fd = None
        log.info("flowfabric stopped")
