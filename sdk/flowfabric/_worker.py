"""The asyncio worker: claim, run handlers with automatic lease renewal, report outcomes.

Order of life: `start` (RegisterWorker, heartbeat every lease_ttl/3) → `run` (ClaimNext long
polls for the free slots, one task per claimed execution) → `stop` (no more claims; in-flight
handlers get `shutdown_grace_s`, then are cancelled and their executions released at once with
DelayExecution(now) for another worker) → DeregisterWorker.

On the main thread `run` turns SIGTERM and SIGINT into that order: the first signal is `stop`
(a graceful drain), a second one forces the exit: every handler is cancelled at once and every
unfinished execution released, all within `FORCED_EXIT_S`; `run` then returns normally either
way (no KeyboardInterrupt), so `asyncio.run(main())` ends with status 0.

A handler's outcome becomes exactly one terminal call, retried on UNAVAILABLE with the same
lease handle; the server reconciles a retry whose first call committed (`replayed = true`).
Completions of handlers that finish while another completion is in flight share the next
CompleteExecutions call (`batch_completions`); each handler still gets its own outcome.
That call also claims new work for the slots its completions free, plus any free slot no
other call has reserved (`claim_with_completions`), as long as the last claim filled every
slot it asked for (work is queued) or a completed task is a flow member (its completion may
release dependents, claimable at once); the server claims after the completions
committed, so the worker never holds more than `concurrency` leases, and a busy worker keeps
its slots full without a ClaimNext round trip per cycle. The ClaimNext long poll claims only
the slots no call has reserved.
A handler that suspended (`TaskSuspended`) has none: its lease is already released, and a
resumed claim fetches the signals that resumed it (GetResumeSignals) before the handler re-runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import FrameType, TracebackType
from typing import Any, TypeVar

import grpc

from flowfabric import _tracing
from flowfabric._batching import MAX_ITEMS as MAX_COMPLETION_ITEMS
from flowfabric._batching import CompletionBatcher
from flowfabric._client import Client, encode_payload
from flowfabric._errors import LEASE_LOST_REASONS, FlowFabricError, HandlerError
from flowfabric._retry import Backoff
from flowfabric._running import RunningTask
from flowfabric._signals import Signal
from flowfabric._task import TaskContext
from flowfabric._transport import CLAIM_REPLY_BYTES, Transport, transport_of
from flowfabric.v1 import types_pb2, worker_pb2

log = logging.getLogger("flowfabric.worker")

HandlerResult = bytes | str | Mapping[str, Any] | Sequence[Any] | None
Handler = Callable[[TaskContext], Coroutine[Any, Any, HandlerResult]]
H = TypeVar("H", bound=Handler)

MAX_CLAIM_BATCH = 100
MAX_REASON_CHARS = 4_000
# The traceback sent as FailExecutionRequest.failure_details keeps its last this many bytes
# (the frames nearest the raise); docs/lifecycle.md#why-did-it-fail.
MAX_TRACEBACK_BYTES = 8_192
#: Terminal calls keep retrying UNAVAILABLE for about half a minute (the lease is renewed
#: meanwhile), so a short server outage does not turn finished work into a re-run.
TERMINAL_BACKOFF = Backoff(max_attempts=10)
#: The fail's own retry policy for a non-retryable error: no retries, whatever is stored.
NO_RETRIES = '{"max_retries":0}'
#: After a second signal: how long handlers (cancelled at once) have to hand their executions
#: back, and a claim in flight to answer, before whatever is left is abandoned to lease expiry.
FORCED_EXIT_S = 1.5
#: The signals `run` drains on (the first) and exits fast on (the second).
SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT)
FATAL_CLAIM_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)


def default_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


@dataclass(frozen=True)
class WorkerStats:
    """Counters of one worker since it started.

    Attributes:
        claimed: Executions claimed.
        completed: Completed (CompleteExecution answered OK).
        failed: Attempts failed (FailExecution or a non-retryable end answered OK).
        released: Handed back unfinished on shutdown (DelayExecution to now).
        suspended: Handlers that ended by suspending (`TaskContext.suspend`).
        lease_lost: Handlers stopped, or outcomes refused, because the lease was lost.
        replayed: Terminal calls answered by the server's replay reconciliation.
    """

    claimed: int = 0
    completed: int = 0
    failed: int = 0
    released: int = 0
    suspended: int = 0
    lease_lost: int = 0
    replayed: int = 0


class _Counters:
    def __init__(self) -> None:
        self.values = dict.fromkeys(WorkerStats.__dataclass_fields__, 0)

    def add(self, name: str, n: int = 1) -> None:
        self.values[name] += n

    def snapshot(self) -> WorkerStats:
        return WorkerStats(**self.values)


class _SignalRouter:
    """The one process-wide SIGTERM/SIGINT handler of every worker running on the main thread:
    installed when the first starts running, the previous handlers restored when the last
    returns, so workers that start and end in any order never leave a stale handler behind."""

    def __init__(self) -> None:
        self._workers: dict[Worker, tuple[asyncio.AbstractEventLoop, Callable[[int], None]]] = {}
        self._previous: dict[signal.Signals, Any] = {}

    def add(
        self, worker: Worker, loop: asyncio.AbstractEventLoop, on_signal: Callable[[int], None]
    ) -> None:
        if not self._workers:
            for sig in SHUTDOWN_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        self._workers[worker] = (loop, on_signal)

    def remove(self, worker: Worker) -> None:
        if self._workers.pop(worker, None) is None or self._workers:
            return
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Python runs this on the main thread between bytecodes: hand it to each loop
        for loop, on_signal in list(self._workers.values()):
            loop.call_soon_threadsafe(on_signal, signum)


class Worker:
    """Runs registered handlers for the executions it claims.

    ```python
    worker = Worker("localhost:50051", token=..., lanes=["default"], concurrency=16)

    @worker.handler("resize")
    async def resize(ctx: TaskContext) -> dict:
        await ctx.progress(50, "half way")
        return {"ok": True}

    async with worker:
        await worker.run()          # until worker.stop()
    ```

    Args:
        target: `host:port` of the server, or a `Client` to share (then `token`, `tls` and
            `default_timeout` are the client's and the worker does not close it).
        lanes: Lanes to claim from (at least one).
        capabilities: Capability tokens advertised and matched against executions' routing
            requirements.
        concurrency: Handlers running at once (slots).
        lease_ttl_ms: Lease TTL; renewed every ttl/3 while a handler runs.
        worker_id: Worker pool name.
        worker_instance_id: Unique per process; default `<hostname>-<pid>-<random>`.
        claim_wait_ms: How long one ClaimNext long-polls for work (at most 30000).
        batch: Claim up to every free slot in one ClaimNext (`max_tasks`).
        batch_completions: Send the completions of handlers that finish while another
            completion is in flight together, in one CompleteExecutions call (at most 64);
            a completion with none in flight is sent at once. False = one CompleteExecution
            per handler.
        claim_with_completions: With `batch_completions`, each CompleteExecutions call also
            claims work for the slots it frees (and the free slots not already being
            claimed). False = claims only through ClaimNext.
        completion_calls: With `batch_completions`, CompleteExecutions calls in flight at
            once (a completion is sent at once while fewer are in flight, else it joins the
            next call), each of at most concurrency / completion_calls items: the slots
            split into groups, so one group runs handlers while another's call is at the
            server.
        shutdown_grace_s: On stop, how long in-flight handlers may finish before they are
            cancelled and their executions released.
        handle_signals: While `run` runs on the main thread, the first SIGTERM or SIGINT
            stops the worker gracefully (as `stop`) and a second one forces a fast exit
            (handlers cancelled, unfinished executions released at once); the previous
            handlers are restored when `run` returns. False = leave signals alone.
        token: Bearer token (when `target` is an address).
        tls: TLS for the channel (when `target` is an address).
        default_timeout: Per-call deadline in seconds (when `target` is an address).
    """

    def __init__(
        self,
        target: str | Client | None = None,
        *,
        lanes: Iterable[str] = ("default",),
        capabilities: Iterable[str] = (),
        concurrency: int = 16,
        lease_ttl_ms: int = 30_000,
        worker_id: str = "flowfabric-worker",
        worker_instance_id: str | None = None,
        claim_wait_ms: int = 1_000,
        batch: bool = True,
        batch_completions: bool = True,
        claim_with_completions: bool = True,
        completion_calls: int = 2,
        shutdown_grace_s: float = 10.0,
        handle_signals: bool = True,
        token: str | None = None,
        tls: bool | grpc.ChannelCredentials = False,
        default_timeout: float = 10.0,
    ) -> None:
        self.lanes = tuple(lanes)
        if not self.lanes:
            raise ValueError("a worker needs at least one lane")
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if lease_ttl_ms < 3:
            raise ValueError("lease_ttl_ms must be at least 3")
        if completion_calls < 1:
            raise ValueError("completion_calls must be at least 1")
        if not 0 <= claim_wait_ms <= 30_000:
            raise ValueError("claim_wait_ms must be 0..30000")
        self.capabilities = tuple(capabilities)
        self.concurrency = concurrency
        self.lease_ttl_ms = lease_ttl_ms
        self.worker_id = worker_id
        self.worker_instance_id = worker_instance_id or default_instance_id()
        self.claim_wait_ms = claim_wait_ms
        self.batch = batch
        self.batch_completions = batch_completions
        self.claim_with_completions = claim_with_completions
        self.completion_calls = completion_calls
        self.shutdown_grace_s = shutdown_grace_s
        self.handle_signals = handle_signals
        self._target = target
        self._client_options: dict[str, Any] = {
            "token": token,
            "tls": tls,
            "default_timeout": default_timeout,
        }
        self._client: Client | None = target if isinstance(target, Client) else None
        self._handlers: dict[str, Handler] = {}
        self._running: dict[asyncio.Task[None], RunningTask] = {}
        # Slot accounting: a running task whose completion is in a call that claims for its
        # slot is `handed` (its slot belongs to that call's reservation until the reply);
        # `_claiming` = max_tasks of the ClaimNext in flight; `_ahead` = slots reserved by
        # CompleteExecutions calls in flight.
        self._handed: set[asyncio.Task[None]] = set()
        self._claiming = 0
        self._ahead = 0
        # Did the last claim fill every slot it asked for? Only then do completion calls claim
        # too: a claim that finds nothing costs the server a full probe, so when the queue
        # is (nearly) empty the ClaimNext long poll alone waits for work.
        self._work_likely = False
        self._slot_free = asyncio.Event()
        self._stopping = asyncio.Event()
        self._drained = asyncio.Event()
        # A forced exit (second signal): set, with the loop time it started, by `_force`.
        self._forced = asyncio.Event()
        self._forced_at: float | None = None
        self._signals_seen = 0
        self._heartbeat: asyncio.Task[None] | None = None
        self._completions: CompletionBatcher | None = None
        self._started = False
        self._run_active = False
        self._counters = _Counters()
        self._pool: Any = None  # the plain-def tasks' threads, made at the first one

    # -- registration -------------------------------------------------------------------------

    def handler(self, kind: str) -> Callable[[H], H]:
        """Decorator registering `async def fn(ctx) -> bytes | str | dict | list | None`."""

        def register(fn: H) -> H:
            if kind in self._handlers:
                raise ValueError(f"a handler for {kind!r} is already registered")
            if not asyncio.iscoroutinefunction(fn):
                raise TypeError(f"the handler for {kind!r} must be an async function")
            self._handlers[kind] = fn
            return fn

        return register

    def task(self, kind: Any = None, **options: Any) -> Any:
        """`@worker.task` / `@worker.task("kind", lane=...)`: a function (async or plain) as a
        task of this worker (docs/tasks.md); returns the `Task`."""
        from flowfabric._tasks import Task

        if callable(kind):
            return self.add_task(Task(kind, None, options))
        return lambda fn: self.add_task(Task(fn, kind, options))

    def add_task(self, task: Any) -> Any:
        """Run `task` (a `Task`, e.g. from the module-level `task` decorator) on this worker;
        its plain-`def` functions share a pool of `concurrency` threads."""
        if task.kind in self._handlers:
            raise ValueError(f"a handler for {task.kind!r} is already registered")
        self._handlers[task.kind] = task.handler(self._thread_pool)
        return task

    def _thread_pool(self) -> Any:
        from concurrent.futures import ThreadPoolExecutor

        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.concurrency, "flowfabric-task")
        return self._pool

    @property
    def kinds(self) -> list[str]:
        """The kinds this worker has handlers for."""
        return sorted(self._handlers)

    @property
    def stats(self) -> WorkerStats:
        return self._counters.snapshot()

    @property
    def client(self) -> Client:
        if self._client is None:
            raise RuntimeError("the worker is not started")
        return self._client

    @property
    def _transport(self) -> Transport:
        """The client's transport: every call of the worker and its tasks goes through it."""
        return transport_of(self.client)

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect (if given an address), RegisterWorker and start heartbeating."""
        if self._started:
            return
        if self._client is None:
            assert not isinstance(self._target, Client)
            self._client = await Client.connect(self._target, **self._client_options)
        request = worker_pb2.RegisterWorkerRequest(
            worker_id=self.worker_id,
            worker_instance_id=self.worker_instance_id,
            capabilities=list(self.capabilities),
            lane_ids=list(self.lanes),
            lease_ttl_ms=self.lease_ttl_ms,
        )
        try:
            reply = await self._transport.unary(self._transport.workers.RegisterWorker, request)
        except BaseException:
            if not isinstance(self._target, Client):
                await self.client.close()
                self._client = None
            raise
        interval = (reply.heartbeat_interval_ms or self.lease_ttl_ms // 3) / 1000
        claims = self if self.claim_with_completions else None
        # the slots split into `completion_calls` groups whose calls alternate at the server
        per_call = min(MAX_COMPLETION_ITEMS, -(-self.concurrency // self.completion_calls))
        self._completions = CompletionBatcher(
            self._transport,
            TERMINAL_BACKOFF,
            claims=claims,
            max_in_flight=self.completion_calls,
            max_items=per_call,
        )
        self._heartbeat = asyncio.create_task(self._heartbeat_forever(max(interval, 0.05)))
        self._started = True
        log.info("worker %s registered (lanes %s)", self.worker_instance_id, self.lanes)

    def stop(self) -> None:
        """Stop claiming; `run` then drains in-flight handlers and returns.

        Call it on the worker's event loop. `run` calls it itself on SIGTERM or SIGINT when
        it runs on the main thread (`handle_signals`).
        """
        self._stopping.set()

    async def run(self) -> None:
        """Claim and run tasks until `stop()` (or a signal); then finish or release in-flight
        work.

        With `handle_signals` on the main thread, SIGTERM and SIGINT are handled while this
        runs: the first stops the worker gracefully, a second forces a fast exit. Either way
        this returns normally once the in-flight work is finished or released.

        Raises:
            FlowFabricError: A claim was refused for a reason retrying cannot fix (bad lanes or
                capabilities, authentication).
        """
        restore = self._install_signal_handlers()
        try:
            if not self._started:
                async with self:
                    await self._run_started()
            else:
                await self._run_started()
        finally:
            restore()

    async def _run_started(self) -> None:
        if self._run_active:
            raise RuntimeError("the worker is already running")
        self._run_active = True
        self._drained.clear()
        try:
            await self._claim_loop()
        finally:
            await self._drain()
            self._run_active = False
            self._drained.set()

    def _install_signal_handlers(self) -> Callable[[], None]:
        """SIGTERM/SIGINT → `_on_signal` on this loop while `run` runs; returns what undoes
        it. Only on the main thread (where Python runs signal handlers)."""
        if not self.handle_signals or threading.current_thread() is not threading.main_thread():
            return lambda: None
        _SIGNALS.add(self, asyncio.get_running_loop(), self._on_signal)
        return lambda: _SIGNALS.remove(self)

    def _on_signal(self, signum: int) -> None:
        self._signals_seen += 1
        name = signal.Signals(signum).name
        if self._signals_seen == 1:
            log.info(
                "%s: stopping %s gracefully (%d in flight, up to %g s to finish); send it "
                "again to exit at once",
                name,
                self.worker_instance_id,
                len(self._running),
                self.shutdown_grace_s,
            )
            self.stop()
        elif self._forced_at is None:
            log.warning(
                "%s again: cancelling %d handler(s) and releasing their executions",
                name,
                len(self._running),
            )
            self._force()

    def _force(self) -> None:
        """The fast exit: stop claiming, cancel every handler now (each releases its
        execution), and give all of it `FORCED_EXIT_S`."""
        self.stop()
        self._forced_at = asyncio.get_running_loop().time()
        self._forced.set()
        for run in self._running.values():
            run.cancel_for_shutdown()

    async def _wait_tasks(self, tasks: set[asyncio.Task[Any]], within: float) -> set[Any]:
        """Wait up to `within` s for `tasks`, or less once a forced exit began (its deadline
        counts); the tasks not done."""
        loop = asyncio.get_running_loop()
        end = loop.time() + within
        pending = set(tasks)
        while pending:
            if self._forced_at is not None:
                end = min(end, self._forced_at + FORCED_EXIT_S)
            remaining = end - loop.time()
            if remaining <= 0:
                break
            waits: set[asyncio.Future[Any]] = set(pending)
            forced = None
            if self._forced_at is None:
                forced = asyncio.ensure_future(self._forced.wait())
                waits.add(forced)
            try:
                done, _ = await asyncio.wait(
                    waits, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                if forced is not None:
                    forced.cancel()
            pending.difference_update(done)
        return pending

    async def run_until(self, stop_event: asyncio.Event) -> None:
        """`run` until `stop_event` is set."""
        waiter = asyncio.create_task(stop_event.wait())
        waiter.add_done_callback(lambda _: self.stop())
        try:
            await self.run()
        finally:
            waiter.cancel()

    async def shutdown(self) -> None:
        """Stop, drain, DeregisterWorker and close the channel (if the worker opened it).
        After a forced exit every step is bounded by `FORCED_EXIT_S`."""
        self.stop()
        if self._run_active:
            await self._drained.wait()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
            self._heartbeat = None
        if self._completions is not None:
            if self._forced_at is None:
                await self._completions.aclose()
            else:  # a call still in flight ends with the channel
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._completions.aclose(), FORCED_EXIT_S)
            if self._running:  # brought by a call whose callers had given up: drain them too
                await self._drain()
            self._completions = None
        if self._started and self._client is not None:
            deadline = min(self._client.default_timeout, 5.0)
            if self._forced_at is not None:
                deadline = min(deadline, FORCED_EXIT_S)
            try:
                await self._transport.unary(
                    self._transport.workers.DeregisterWorker,
                    worker_pb2.DeregisterWorkerRequest(
                        worker_id=self.worker_id, worker_instance_id=self.worker_instance_id
                    ),
                    deadline=deadline,
                    retry=False,
                )
            except FlowFabricError as exc:
                log.warning("deregistering %s failed: %r", self.worker_instance_id, exc)
        if self._pool is not None:  # plain-def tasks' threads (docs/tasks.md)
            self._pool.shutdown(wait=False)
            self._pool = None
        self._started = False
        # a later start() may run again
        self._stopping.clear()
        self._forced.clear()
        self._forced_at = None
        self._signals_seen = 0
        if self._client is not None and not isinstance(self._target, Client):
            await self._client.close()
            self._client = None

    async def __aenter__(self) -> Worker:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.shutdown()

    async def _heartbeat_forever(self, interval: float) -> None:
        request = worker_pb2.HeartbeatRequest(
            worker_id=self.worker_id,
            worker_instance_id=self.worker_instance_id,
            capabilities=list(self.capabilities),
            lease_ttl_ms=self.lease_ttl_ms,
        )
        while True:
            await asyncio.sleep(interval)
            try:
                await self._transport.unary(self._transport.workers.Heartbeat, request, retry=False)
            except FlowFabricError as exc:
                log.warning("heartbeat of %s failed: %r", self.worker_instance_id, exc)

    # -- claiming -----------------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        failures = 0
        backoff = Backoff(max_attempts=1 << 30)
        while not self._stopping.is_set():
            free = self._free()
            if free <= 0:
                self._slot_free.clear()
                await self._first(self._slot_free.wait())
                continue
            max_tasks = min(free, MAX_CLAIM_BATCH) if self.batch else 1
            self._claiming += max_tasks  # reserved from now: a completion call must not take them
            error: FlowFabricError | None = None
            try:
                tasks = await self._claim_unless_stopped(max_tasks)
            except FlowFabricError as exc:
                tasks, error = [], exc
            finally:
                self._claiming -= max_tasks
            if error is not None:
                if error.code in FATAL_CLAIM_CODES or error.reason == "unknown_lane":
                    raise error
                log.warning("claim failed (%d in a row): %r", failures + 1, error)
                await self._first(asyncio.sleep(backoff.delay(failures)))
                failures += 1
                continue
            failures = 0
            self._work_likely = len(tasks) >= max_tasks
            for task in tasks:
                self._spawn(task)

    async def _first(self, aw: Awaitable[Any]) -> None:
        """Await `aw` or the stop request, whichever comes first."""
        main = asyncio.ensure_future(aw)
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({main, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for fut in (main, stop):
                fut.cancel()

    async def _claim_unless_stopped(self, max_tasks: int) -> list[types_pb2.ClaimedTask]:
        """One ClaimNext; on stop the long poll is still awaited (bounded by the grace) so
        nothing it claimed is stranded until lease expiry."""
        claim = asyncio.ensure_future(self._claim(max_tasks))
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({claim, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not claim.done():
                await self._wait_tasks({claim}, self.shutdown_grace_s)
        except asyncio.CancelledError:
            claim.cancel()
            raise
        finally:
            stop.cancel()
        if not claim.done():
            claim.cancel()
            return []
        return claim.result()

    def _free(self) -> int:
        """Slots neither running an unhanded task nor reserved by a call in flight."""
        busy = len(self._running) - len(self._handed) + self._claiming + self._ahead
        return self.concurrency - busy

    def _claim_request(self, max_tasks: int, wait_ms: int) -> worker_pb2.ClaimNextRequest:
        return worker_pb2.ClaimNextRequest(
            worker_id=self.worker_id,
            worker_instance_id=self.worker_instance_id,
            lane_ids=list(self.lanes),
            capabilities=list(self.capabilities),
            lease_ttl_ms=self.lease_ttl_ms,
            wait_ms=wait_ms,
            max_tasks=max_tasks,
            max_reply_bytes=CLAIM_REPLY_BYTES,
        )

    async def _claim(self, max_tasks: int) -> list[types_pb2.ClaimedTask]:
        request = self._claim_request(max_tasks, self.claim_wait_ms)
        reply = await self._transport.unary(
            self._transport.workers.ClaimNext,
            request,
            deadline=self.claim_wait_ms / 1000 + self.client.default_timeout,
            retry=False,
        )
        which = reply.WhichOneof("outcome")
        if which == "task":
            return [reply.task]
        if which == "batch":
            return list(reply.batch.tasks)
        return []

    # -- claiming with completions (CompletionBatcher's ClaimAhead) -----------------------------

    def reserve(self, owners: list[Any]) -> tuple[worker_pb2.ClaimNextRequest, Any] | None:
        """The claim for a CompleteExecutions call completing `owners`' executions: their
        slots plus the free ones; those slots are reserved until `settle`."""
        if self._stopping.is_set() or not self._run_active:
            return None
        handed = [t for t in owners if t in self._running and t not in self._handed]
        # A flow member's completion releases its dependents in the same call, and the claim
        # runs after it: claiming then starts a child without waiting for a ClaimNext wake-up.
        releases = any(self._running[t].task.HasField("flow_id") for t in handed)
        if not (self._work_likely or releases):
            return None
        self._handed.update(handed)
        slots = self._free()
        if not self.batch:
            slots = min(slots, 1)
        slots = min(slots, MAX_CLAIM_BATCH)
        if slots <= 0:
            self._handed.difference_update(handed)
            return None
        self._ahead += slots
        return self._claim_request(slots, 0), (handed, slots)

    def settle(self, ticket: Any, claimed: list[types_pb2.ClaimedTask], sent: bool) -> None:
        """The reply of a call `reserve` claimed for: spawn its tasks, free the reservation.
        A call that failed hands its slots back to their tasks (still completing)."""
        handed, slots = ticket
        self._ahead -= slots
        if not sent:
            self._handed.difference_update(handed)
        else:
            self._work_likely = len(claimed) >= slots
        for task in claimed:
            self._spawn(task)
        self._slot_free.set()

    def _spawn(self, claimed: types_pb2.ClaimedTask) -> None:
        self._counters.add("claimed")
        run = RunningTask(claimed, self.client)
        if self._forced_at is not None:
            run.shutdown_cancel = True  # claimed as the worker exits: hand it straight back
        task = asyncio.create_task(self._run_task(run))
        self._running[task] = run

        def done(t: asyncio.Task[None]) -> None:
            self._running.pop(t, None)
            self._handed.discard(t)
            self._slot_free.set()

        task.add_done_callback(done)

    # -- running one task ---------------------------------------------------------------------

    async def _run_task(self, run: RunningTask) -> None:
        renew = asyncio.create_task(run.renew_forever())
        kind = run.task.execution_kind
        try:
            fn = self._handlers.get(kind)
            if fn is None:
                error = HandlerError(
                    f"no handler for kind {kind!r} on worker {self.worker_id} "
                    f"(registered: {sorted(self._handlers)})",
                    category="unknown_kind",
                    non_retryable=True,
                )
                await self._fail(run, error)
                return
            if run.shutdown_cancel:
                await self._release(run)
                return
            if run.task.resumed and not await self._load_resume_signals(run):
                return
            with _tracing.handling(run.task) as span:  # docs/observability.md#traces
                handler: asyncio.Task[HandlerResult] = asyncio.create_task(fn(TaskContext(run)))
                run.handler = handler
                await asyncio.wait({handler})
                _tracing.outcome(span, handler, run.suspended)
                await self._finish(run, handler)
        except Exception:
            log.exception("worker error on %s", run.execution_id)
        finally:
            renew.cancel()
            run.stop_background()

    async def _load_resume_signals(self, run: RunningTask) -> bool:
        """Before a resumed handler runs: the signals that met its suspension's condition
        (GetResumeSignals). False when the task cannot run (lease lost, or failed)."""
        request = worker_pb2.GetResumeSignalsRequest(lease=run.lease)
        try:
            reply = await self._transport.unary(self._transport.workers.GetResumeSignals, request)
        except FlowFabricError as exc:
            if exc.reason in LEASE_LOST_REASONS:
                run.lose(exc.reason)
                self._counters.add("lease_lost")
                return False
            log.error("resume signals of %s unavailable: %r", run.execution_id, exc)
            error = HandlerError(
                f"resume signals unavailable: {exc.reason or exc.code.name}",
                category="resume_signals_unavailable",
            )
            await self._fail(run, error)
            return False
        run.resume_signals = [Signal.from_proto(record) for record in reply.signals]
        return True

    async def _finish(self, run: RunningTask, handler: asyncio.Task[HandlerResult]) -> None:
        if run.suspended is not None:
            # the lease is released: nothing to complete, fail or flush
            self._counters.add("suspended")
            if handler.cancelled() or handler.exception() is not run.suspended:
                log.warning(
                    "handler of %s went on after suspending (its outcome is ignored)",
                    run.execution_id,
                )
            return
        if not run.lease_lost.is_set():
            await run.flush_for_terminal()  # emitted frames land before the stream closes
        if handler.cancelled():
            if run.lease_lost.is_set():
                self._counters.add("lease_lost")
            else:
                await self._release(run)
            return
        exc = handler.exception()
        if exc is None:
            await self._complete(run, handler.result())
        else:
            await self._fail(run, exc)

    async def _terminal(self, run: RunningTask, rpc: str, request: Any) -> Any | None:
        """One terminal call, retried on UNAVAILABLE with the same handle; None if refused.
        A completion goes through the batcher (same retries, its own outcome)."""
        try:
            if rpc == "CompleteExecution" and self._completions and self.batch_completions:
                reply = await self._completions.complete(request, asyncio.current_task())
            else:
                method = getattr(self._transport.workers, rpc)
                reply = await self._transport.unary(method, request, backoff=TERMINAL_BACKOFF)
        except FlowFabricError as exc:
            if exc.reason in LEASE_LOST_REASONS:
                self._counters.add("lease_lost")
                log.warning("%s of %s refused: %r", rpc, run.execution_id, exc)
            else:
                log.error("%s of %s failed: %r", rpc, run.execution_id, exc)
            return None
        if reply.replayed:
            self._counters.add("replayed")
        return reply

    async def _complete(self, run: RunningTask, result: HandlerResult) -> None:
        try:
            data, encoding = encode_payload(result)
        except (TypeError, ValueError) as exc:  # a result JSON cannot encode fails the attempt
            await self._fail(run, exc)
            return
        request = worker_pb2.CompleteExecutionRequest(lease=run.lease)
        if data is not None:
            request.result_payload = data
        if encoding is not None:
            request.result_encoding = encoding
        if await self._terminal(run, "CompleteExecution", request):
            self._counters.add("completed")

    async def _fail(self, run: RunningTask, exc: BaseException) -> None:
        if isinstance(exc, HandlerError):
            reason, category = exc.message or exc.category, exc.category
        else:
            reason, category = f"{type(exc).__name__}: {exc}", type(exc).__name__
        details = failure_details(exc)
        if details:
            log.warning("handler for %s failed (%s)", run.execution_id, category, exc_info=exc)
        else:
            log.warning("task %s failed (%s): %s", run.execution_id, category, reason)
        reason = reason[:MAX_REASON_CHARS]
        request = worker_pb2.FailExecutionRequest(
            lease=run.lease,
            failure_reason=reason,
            failure_category=category,
            failure_details=details,
        )
        non_retryable = isinstance(exc, HandlerError) and exc.non_retryable
        if non_retryable:
            # A retry policy given with the fail replaces the stored one for this call only.
            request.retry_policy_json = NO_RETRIES
        elif isinstance(exc, HandlerError) and exc.retry_after_ms is not None:
            request.retry_after_ms = exc.retry_after_ms
        reply = await self._terminal(run, "FailExecution", request)
        if reply is None:
            return
        self._counters.add("failed")
        if non_retryable and reply.WhichOneof("outcome") != "terminal_failed":
            log.error(
                "non-retryable failure of %s was scheduled for retry: the server ignored "
                "FailExecutionRequest.retry_policy_json",
                run.execution_id,
            )

    async def _release(self, run: RunningTask) -> None:
        """Hand an unfinished execution back at once (same attempt, claimable by any worker
        once the delayed promoter runs)."""
        request = worker_pb2.DelayExecutionRequest(
            lease=run.lease, delay_until=int(time.time() * 1000)
        )
        if await self._terminal(run, "DelayExecution", request):
            self._counters.add("released")

    async def _drain(self) -> None:
        """Give in-flight handlers the grace, then cancel them (they release their work).
        Tasks a completion call in flight at stop brings are drained too, in the same grace."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.shutdown_grace_s
        seen: set[asyncio.Task[None]] = set()
        while running := {t: c for t, c in self._running.items() if t not in seen}:
            seen.update(running)
            log.info("draining %d in-flight task(s)", len(running))
            timeout = max(deadline - loop.time(), 0)
            pending = await self._wait_tasks(set(running), timeout)
            for task in pending:
                running[task].cancel_for_shutdown()
            if pending:
                # a handler that swallows cancellation is abandoned: its lease expires
                stuck = await self._wait_tasks(pending, self.client.default_timeout)
                for task in stuck:
                    task.cancel()


_SIGNALS = _SignalRouter()


def failure_details(exc: BaseException) -> str:
    """The traceback of a raised exception, cut to its last MAX_TRACEBACK_BYTES bytes; "" for
    one never raised (an unknown kind, a refused resume)."""
    if exc.__traceback__ is None:
        return ""
    text = "".join(traceback.format_exception(exc))
    data = text.encode()
    if len(data) <= MAX_TRACEBACK_BYTES:
        return text
    marker = "...(traceback cut)\n"
    tail = data[-(MAX_TRACEBACK_BYTES - len(marker)) :].decode(errors="ignore")
    return marker + tail
