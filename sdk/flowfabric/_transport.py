"""The one way the SDK talks to the server: a channel, its stubs, deadlines and retries.

`Client`, `Worker` and the running task of a handler share one `Transport`: the channel
(target, TLS, keepalive, receive limit), the bearer token sent with every call, one stub per
service, the per-attempt deadline and the UNAVAILABLE retry policy. Unary calls go through
`unary`, server streams through `server_stream` (re-opened after UNAVAILABLE). Failures raise
the typed errors of `_errors.py`.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

import grpc

from flowfabric import _tracing
from flowfabric._errors import from_rpc_error
from flowfabric._retry import RETRY_CODES, Backoff, with_retries
from flowfabric.v1 import (
    admin_pb2_grpc,
    budget_pb2_grpc,
    execution_pb2_grpc,
    flow_pb2_grpc,
    lane_pb2_grpc,
    schedule_pb2_grpc,
    signal_pb2_grpc,
    stream_pb2_grpc,
    worker_pb2_grpc,
)

T = TypeVar("T")
M = TypeVar("M")


class _Paged(Protocol):
    @property
    def next_page_token(self) -> str: ...


P = TypeVar("P", bound=_Paged)


async def pages(fetch: Callable[[str], Awaitable[P]]) -> AsyncGenerator[P, None]:
    """Each reply of a paged listing: `fetch(page_token)`, from "" until a reply carries no
    next page token."""
    token = ""
    while True:
        reply = await fetch(token)
        yield reply
        if not reply.next_page_token:
            return
        token = reply.next_page_token


#: The SDK's receive limit, sized from the server's documented maxima: the largest reply is a
#: full ReadAttemptStream page (1000 frames of up to 64 KiB of payload, plus their fields);
#: everything else is smaller (an execution's payload and result are at most 1 MiB each, and
#: claims stay below CLAIM_REPLY_BYTES).
RECEIVE_LIMIT = 72 << 20

#: What a worker declares as its receive limit on claims (ClaimNext `max_reply_bytes`): the
#: server leases no more tasks than fit in one reply below it.
CLAIM_REPLY_BYTES = 16 << 20

#: Keepalive that survives idle connections and stays within the server's ping policy
#: (`min_ping_interval_without_data_ms` = 10 s, `permit_without_calls` = 1).
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", RECEIVE_LIMIT),
)


def _credentials(tls: bool | grpc.ChannelCredentials) -> grpc.ChannelCredentials | None:
    if isinstance(tls, grpc.ChannelCredentials):
        return tls
    return grpc.ssl_channel_credentials() if tls else None


#: The server address when none is given and FF_TARGET is unset.
DEFAULT_TARGET = "127.0.0.1:50051"


def default_target(target: str | None) -> str:
    """`target`, else FF_TARGET, else 127.0.0.1:50051 (as the CLI)."""
    return target or os.environ.get("FF_TARGET") or DEFAULT_TARGET


def default_token(token: str | None) -> str | None:
    """`token`, else FF_API_TOKEN (unset or empty: no token)."""
    return token if token is not None else (os.environ.get("FF_API_TOKEN") or None)


class Transport:
    """One grpc.aio channel with the stubs of every service and the SDK's call policy.

    Args:
        target: `host:port` of the FlowFabric server.
        token: Bearer token; None = no auth header.
        tls: False (plaintext), True (system roots) or explicit channel credentials.
        default_timeout: Deadline in seconds of each call attempt.
        interceptors: grpc.aio client interceptors, outermost first.
    """

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls: bool | grpc.ChannelCredentials = False,
        default_timeout: float = 10.0,
        interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
    ) -> None:
        creds = _credentials(tls)
        options = list(CHANNEL_OPTIONS)
        if creds is not None:
            self.channel = grpc.aio.secure_channel(
                target, creds, options=options, interceptors=interceptors
            )
        else:
            self.channel = grpc.aio.insecure_channel(
                target, options=options, interceptors=interceptors
            )
        self.target = target
        self.default_timeout = default_timeout
        self.metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        self.backoff = Backoff()
        self.executions = execution_pb2_grpc.ExecutionServiceStub(self.channel)
        self.workers = worker_pb2_grpc.WorkerServiceStub(self.channel)
        self.streams = stream_pb2_grpc.StreamServiceStub(self.channel)
        self.signals = signal_pb2_grpc.SignalServiceStub(self.channel)
        self.admin = admin_pb2_grpc.AdminServiceStub(self.channel)
        self.flows = flow_pb2_grpc.FlowServiceStub(self.channel)
        self.budgets = budget_pb2_grpc.BudgetServiceStub(self.channel)
        self.schedules = schedule_pb2_grpc.ScheduleServiceStub(self.channel)
        self.lanes = lane_pb2_grpc.LaneServiceStub(self.channel)

    async def close(self) -> None:
        await self.channel.close(None)

    async def unary(
        self,
        method: Callable[..., Awaitable[T]],
        request: Any,
        *,
        deadline: float | None = None,
        retry: bool = True,
        backoff: Backoff | None = None,
    ) -> T:
        """One unary (or client-streaming) RPC with a per-attempt deadline (seconds), the
        token and UNAVAILABLE retries (`retry=False` for a call a repeat could apply twice);
        failures raise typed errors."""
        timeout = deadline if deadline is not None else self.default_timeout

        def attempt() -> Awaitable[T]:
            return method(request, timeout=timeout, metadata=self.metadata + _tracing.metadata())

        return await with_retries(attempt, backoff or self.backoff, retry=retry)

    async def server_stream(
        self,
        method: Callable[..., Any],
        request: Callable[[], Any],
        *,
        end: float | None = None,
    ) -> AsyncGenerator[Any, None]:
        """A server stream, re-opened with a fresh `request()` after UNAVAILABLE (backoff,
        bounded attempts; a message received resets the count); other failures raise typed
        errors. `end` (monotonic) is the deadline of the whole stream across re-opens; None =
        no deadline."""
        retries = 0
        while True:
            remaining = None if end is None else max(end - time.monotonic(), 0.001)
            metadata = self.metadata + _tracing.metadata()
            call = method(request(), timeout=remaining, metadata=metadata)
            try:
                async for message in call:
                    retries = 0
                    yield message
                return
            except grpc.aio.AioRpcError as exc:
                error = from_rpc_error(exc)
                if error.code not in RETRY_CODES or retries >= self.backoff.max_attempts:
                    raise error from exc
            finally:
                call.cancel()
            await asyncio.sleep(self.backoff.delay(retries))
            retries += 1


class Connected:
    """The base of the client's service mixins: whatever talks to the server through one
    `Transport`."""

    _transport: Transport


def transport_of(owner: Connected) -> Transport:
    """The transport a client talks through, for the worker and the tasks it runs (they share
    the client's channel, token and call policy)."""
    return owner._transport
