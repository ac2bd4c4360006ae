"""A blocking wrapper of `Client` for scripts and non-async code.

It owns a private event loop running in a daemon thread; each method submits the matching
coroutine of the wrapped `Client` to that loop and waits for it, and each async iterator
becomes an iterator stepped on that loop. Safe to call from several threads.

The methods are derived from `Client`'s, not written again: `blocking(Client.get)` is a method
with `get`'s parameters that returns what `get`'s coroutine returns, and `blocking_iter`
does the same for async iterators, and `blocking_builder` for the flow builder (whose
`submit()` then blocks), so type checkers see the real signatures.
`tests/sdk/test_sync.py` checks that every public `Client` method has its counterpart here.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from types import TracebackType
from typing import Any, ClassVar, Concatenate, ParamSpec, TypeVar

import grpc

from flowfabric._client import Client
from flowfabric._flows import FlowBuilder

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


async def _coroutine(awaitable: Awaitable[T]) -> T:
    return await awaitable


def blocking(fn: Callable[Concatenate[Any, P], Awaitable[R]]) -> Callable[Concatenate[Any, P], R]:
    """The blocking method of `SyncClient` for the coroutine method `fn` of the client."""

    def method(self: Any, /, *args: P.args, **kwargs: P.kwargs) -> R:
        sync: SyncClient = self
        return sync._run(_coroutine(fn(sync._client, *args, **kwargs)))

    functools.update_wrapper(method, fn)
    return method


def blocking_iter(
    fn: Callable[Concatenate[Any, P], AsyncIterator[R]],
) -> Callable[Concatenate[Any, P], Iterator[R]]:
    """The iterator method of `SyncClient` for the async-iterator method `fn` of the client."""

    def method(self: Any, /, *args: P.args, **kwargs: P.kwargs) -> Iterator[R]:
        sync: SyncClient = self
        return sync._iterate(fn(sync._client, *args, **kwargs))

    functools.update_wrapper(method, fn)
    return method


def blocking_builder(
    fn: Callable[Concatenate[Any, P], FlowBuilder[Awaitable[R]]],
) -> Callable[Concatenate[Any, P], FlowBuilder[R]]:
    """The method of `SyncClient` for the client's builder method `fn` (`flow`): the same
    builder, whose `submit()` blocks."""

    def method(self: Any, /, *args: P.args, **kwargs: P.kwargs) -> FlowBuilder[R]:
        sync: SyncClient = self
        builder = fn(sync._client, *args, **kwargs)
        return builder.map_submit(lambda sent: sync._run(_coroutine(sent)))

    functools.update_wrapper(method, fn)
    return method


class SyncClient:
    """Blocking FlowFabric client; the same methods as `Client`, without `await`.

    Args:
        target: `host:port` of the FlowFabric server.
        token: Bearer token; None = no auth header.
        tls: False (plaintext), True (system roots) or explicit channel credentials.
        default_timeout: Deadline in seconds of each call attempt.
    """

    #: The client class wrapped (the CLI wraps a subclass that adds its own calls).
    _client_class: ClassVar[type[Client]] = Client

    def __init__(
        self,
        target: str | None = None,
        *,
        token: str | None = None,
        tls: bool | grpc.ChannelCredentials = False,
        default_timeout: float = 10.0,
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="flowfabric-sync-client", daemon=True
        )
        self._thread.start()
        self._closed = False
        self._client: Client = self._run(
            self._client_class.connect(
                target, token=token, tls=tls, default_timeout=default_timeout
            )
        )

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._closed:
            coro.close()
            raise RuntimeError("the client is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _iterate(self, stream: AsyncIterator[T]) -> Iterator[T]:
        """An async iterator of the client, stepped on the private loop."""

        async def step() -> tuple[bool, T | None]:
            try:
                return True, await anext(stream)
            except StopAsyncIteration:
                return False, None

        async def close() -> None:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()

        try:
            while True:
                more, item = self._run(step())
                if not more:
                    return
                yield item  # type: ignore[misc]
        finally:
            if not self._closed:
                self._run(close())

    def close(self) -> None:
        """Close the channel and stop the private loop. Safe to call twice."""
        if self._closed:
            return
        self._run(self._client.close())
        self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ExecutionService
    submit = blocking(Client.submit)
    submit_many = blocking(Client.submit_many)
    get = blocking(Client.get)
    describe = blocking(Client.describe)
    why = blocking(Client.why)
    state = blocking(Client.state)
    result = blocking(Client.result)
    cancel = blocking(Client.cancel)
    replay = blocking(Client.replay)
    change_priority = blocking(Client.change_priority)
    resume = blocking(Client.resume)
    list_all = blocking_iter(Client.list_all)
    watch = blocking_iter(Client.watch)
    wait = blocking(Client.wait)
    # FlowService
    submit_flow = blocking(Client.submit_flow)
    describe_flow = blocking(Client.describe_flow)
    wait_flow = blocking(Client.wait_flow)
    cancel_flow = blocking(Client.cancel_flow)
    describe_edge = blocking(Client.describe_edge)
    edges = blocking_iter(Client.edges)
    watch_flow = blocking_iter(Client.watch_flow)
    flow_members = blocking(Client.flow_members)
    replay_flow = blocking(Client.replay_flow)

    flow = blocking_builder(Client.flow)

    # StreamService
    read_stream = blocking(Client.read_stream)
    tail = blocking_iter(Client.tail)
    # SignalService
    deliver_signal = blocking(Client.deliver_signal)
    # `**options` could take a `self=` keyword, which mypy will not match to `Concatenate`
    signal = blocking(Client.signal)  # type: ignore[arg-type]
    list_waitpoints = blocking(Client.list_waitpoints)
    find_waitpoint = blocking(Client.find_waitpoint)
    watch_signals = blocking_iter(Client.watch_signals)
    watch_waitpoints = blocking_iter(Client.watch_waitpoints)
    # BudgetService
    create_budget = blocking(Client.create_budget)
    budget = blocking(Client.budget)
    budgets = blocking_iter(Client.budgets)
    report_usage = blocking(Client.report_usage)
    reset_budget = blocking(Client.reset_budget)
    create_quota_policy = blocking(Client.create_quota_policy)
    quota_policy = blocking(Client.quota_policy)
    quota_policies = blocking_iter(Client.quota_policies)
    # ScheduleService
    create_schedule = blocking(Client.create_schedule)
    schedule = blocking(Client.schedule)
    schedules = blocking_iter(Client.schedules)
    pause_schedule = blocking(Client.pause_schedule)
    resume_schedule = blocking(Client.resume_schedule)
    delete_schedule = blocking(Client.delete_schedule)
    trigger_schedule = blocking(Client.trigger_schedule)
    # LaneService
    pause_lane = blocking(Client.pause_lane)
    resume_lane = blocking(Client.resume_lane)
    drain_lane = blocking(Client.drain_lane)
    lane = blocking(Client.lane)
    lanes = blocking(Client.lanes)
    bulk_cancel = blocking(Client.bulk_cancel)
    bulk_replay = blocking(Client.bulk_replay)
    bulk_action = blocking(Client.bulk_action)
    bulk_actions = blocking_iter(Client.bulk_actions)
    cancel_bulk_action = blocking(Client.cancel_bulk_action)
    # AdminService
    rotate_waitpoint_secret = blocking(Client.rotate_waitpoint_secret)
    waitpoint_kids = blocking(Client.waitpoint_kids)
    # last: the name `list` shadows the builtin in the rest of the class body
    list = blocking(Client.list)
