"""A blocking wrapper of `Client` for scripts and non-async code.

It owns a private event loop running in a daemon thread; each method submits the matching
coroutine to that loop and waits for it. Safe to call from several threads.
"""

from __future__ import annotations

import asyncio
import builtins
import threading
from collections.abc import AsyncGenerator, Coroutine, Iterator, Mapping
from types import TracebackType
from typing import Any, TypeVar

import grpc

from flowfabric._client import Client, ExecutionState, Page, Payload, Submitted, Time
from flowfabric._retry import RetryPolicy
from flowfabric._signals import (
    Duration,
    SecretRotation,
    Signal,
    SignalDelivery,
    Waitpoint,
    WaitpointEvent,
    WaitpointKids,
)
from flowfabric.v1 import execution_pb2, types_pb2

T = TypeVar("T")


class SyncClient:
    """Blocking FlowFabric client; the same methods as `Client`, without `await`.

    Args:
        target: `host:port` of the FlowFabric server.
        token: Bearer token; None = no auth header.
        tls: False (plaintext), True (system roots) or explicit channel credentials.
        default_timeout: Deadline in seconds of each call attempt.
    """

    def __init__(
        self,
        target: str,
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
            Client.connect(target, token=token, tls=tls, default_timeout=default_timeout)
        )

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._closed:
            coro.close()
            raise RuntimeError("the client is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

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

    def submit(
        self,
        kind: str,
        payload: Payload = b"",
        *,
        lane: str = "default",
        priority: int = 0,
        delay_until: Time | None = None,
        deadline: Time | None = None,
        policy: types_pb2.ExecutionPolicy | RetryPolicy | None = None,
        tags: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        namespace: str = "default",
        execution_id: str | None = None,
        payload_encoding: str | None = None,
    ) -> Submitted:
        return self._run(
            self._client.submit(
                kind,
                payload,
                lane=lane,
                priority=priority,
                delay_until=delay_until,
                deadline=deadline,
                policy=policy,
                tags=tags,
                idempotency_key=idempotency_key,
                namespace=namespace,
                execution_id=execution_id,
                payload_encoding=payload_encoding,
            )
        )

    def get(self, execution_id: str) -> types_pb2.ExecutionInfo:
        return self._run(self._client.get(execution_id))

    def state(self, execution_id: str) -> ExecutionState:
        return self._run(self._client.state(execution_id))

    def describe(self, execution_id: str) -> types_pb2.ExecutionSnapshot:
        return self._run(self._client.describe(execution_id))

    def result(self, execution_id: str) -> bytes:
        return self._run(self._client.result(execution_id))

    def cancel(self, execution_id: str, reason: str = "") -> ExecutionState:
        return self._run(self._client.cancel(execution_id, reason))

    def replay(self, execution_id: str) -> ExecutionState:
        return self._run(self._client.replay(execution_id))

    def change_priority(self, execution_id: str, priority: int) -> None:
        self._run(self._client.change_priority(execution_id, priority))

    def list(
        self,
        *,
        lane: str = "default",
        state: str | int = "eligible",
        limit: int = 50,
        page_token: str = "",
        partition: int | None = None,
    ) -> Page:
        return self._run(
            self._client.list(
                lane=lane, state=state, limit=limit, page_token=page_token, partition=partition
            )
        )

    def list_all(
        self,
        *,
        lane: str = "default",
        state: str | int = "eligible",
        page_size: int = 200,
        partition: int | None = None,
    ) -> Iterator[types_pb2.ExecutionSummary]:
        token = ""
        while True:
            page = self.list(
                lane=lane, state=state, limit=page_size, page_token=token, partition=partition
            )
            yield from page.executions
            if not page.next_page_token:
                return
            token = page.next_page_token

    def watch(
        self, execution_id: str, *, timeout: float | None = None
    ) -> Iterator[execution_pb2.WatchExecutionResponse]:
        return self._iterate(self._client.watch(execution_id, timeout=timeout))

    def _iterate(self, stream: AsyncGenerator[T, None]) -> Iterator[T]:
        """An async generator of the client, stepped on the private loop."""

        async def step() -> tuple[bool, T | None]:
            try:
                return True, await anext(stream)
            except StopAsyncIteration:
                return False, None

        try:
            while True:
                more, item = self._run(step())
                if not more:
                    return
                yield item  # type: ignore[misc]
        finally:
            if not self._closed:
                self._run(stream.aclose())

    def wait(self, execution_id: str, timeout: float | None = None) -> ExecutionState:
        return self._run(self._client.wait(execution_id, timeout))

    def resume(self, execution_id: str, *, delay: Duration = 0) -> ExecutionState:
        return self._run(self._client.resume(execution_id, delay=delay))

    def deliver_signal(
        self,
        execution_id: str,
        waitpoint_id: str,
        name: str,
        token: str,
        payload: Payload | None = None,
        **options: Any,
    ) -> SignalDelivery:
        """`Client.deliver_signal`; `options` are its keyword arguments."""
        return self._run(
            self._client.deliver_signal(execution_id, waitpoint_id, name, token, payload, **options)
        )

    def signal(
        self, execution_id: str, name: str, payload: Payload | None = None, **options: Any
    ) -> SignalDelivery:
        return self._run(self._client.signal(execution_id, name, payload, **options))

    def list_waitpoints(self, execution_id: str) -> builtins.list[Waitpoint]:
        return self._run(self._client.list_waitpoints(execution_id))

    def find_waitpoint(self, execution_id: str, name: str | None = None) -> Waitpoint:
        return self._run(self._client.find_waitpoint(execution_id, name))

    def watch_signals(
        self, execution_id: str, waitpoint_id: str | None = None, *, after: str | int | None = None
    ) -> Iterator[Signal]:
        return self._iterate(self._client.watch_signals(execution_id, waitpoint_id, after=after))

    def watch_waitpoints(self, execution_id: str) -> Iterator[WaitpointEvent]:
        return self._iterate(self._client.watch_waitpoints(execution_id))

    def rotate_waitpoint_secret(
        self, kid: str, secret_hex: str, *, grace: Duration | None = None
    ) -> SecretRotation:
        return self._run(self._client.rotate_waitpoint_secret(kid, secret_hex, grace=grace))

    def waitpoint_kids(self, partition: int | None = None) -> WaitpointKids:
        return self._run(self._client.waitpoint_kids(partition))
