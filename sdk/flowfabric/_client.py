"""The async client: submit executions, read and operate on them, watch them finish.

Reads return the API's own read models (`ExecutionInfo`, `ExecutionSnapshot`,
`ExecutionSummary`, `WatchExecutionResponse`); everything else returns a small frozen dataclass
or a plain value. Every call has a deadline, carries the bearer token and is retried on
UNAVAILABLE with exponential backoff — except a create without an idempotency key or an
execution id, which could be applied twice and is surfaced instead.

`Client` is composed of one mixin per service area (`_client_executions`, `_client_flows`,
`_client_streams`, `_client_signals`, `_client_budgets`, `_client_admin`), all on one
`Transport` (`_transport`).
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType

import grpc

from flowfabric._client_admin import AdminMixin
from flowfabric._client_budgets import BudgetsMixin
from flowfabric._client_executions import ExecutionsMixin
from flowfabric._client_flows import FlowsMixin
from flowfabric._client_lanes import LanesMixin
from flowfabric._client_schedules import SchedulesMixin
from flowfabric._client_signals import SignalsMixin
from flowfabric._client_streams import StreamsMixin
from flowfabric._models import (
    ExecutionState,
    Page,
    Payload,
    Submitted,
    Time,
    encode_payload,
    to_ms,
)
from flowfabric._transport import CHANNEL_OPTIONS, Transport, default_target, default_token

__all__ = [
    "CHANNEL_OPTIONS",
    "Client",
    "ExecutionState",
    "Page",
    "Payload",
    "Submitted",
    "Time",
    "encode_payload",
    "to_ms",
]


class Client(
    ExecutionsMixin, FlowsMixin, StreamsMixin, SignalsMixin, BudgetsMixin, SchedulesMixin,
    AdminMixin, LanesMixin,
):  # fmt: skip
    """Async FlowFabric client over one gRPC channel.

    Use `await Client.connect(target, token=...)` or `async with Client(target, ...) as c:`.

    Args:
        target: `host:port` of the FlowFabric server.
        token: Bearer token (`FF_API_TOKEN` of the server); None = no auth header.
        tls: False (plaintext), True (system roots) or explicit channel credentials.
        default_timeout: Deadline in seconds of each call attempt.
        interceptors: grpc.aio client interceptors, outermost first.
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        token: str | None = None,
        tls: bool | grpc.ChannelCredentials = False,
        default_timeout: float = 10.0,
        interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
    ) -> None:
        target = default_target(target)
        self._transport = Transport(
            target,
            token=default_token(token),
            tls=tls,
            default_timeout=default_timeout,
            interceptors=interceptors,
        )
        self.target = target

    @property
    def default_timeout(self) -> float:
        """Deadline in seconds of each call attempt."""
        return self._transport.default_timeout

    @default_timeout.setter
    def default_timeout(self, value: float) -> None:
        self._transport.default_timeout = value

    @classmethod
    async def connect(
        cls,
        target: str | None = None,
        *,
        token: str | None = None,
        tls: bool | grpc.ChannelCredentials = False,
        default_timeout: float = 10.0,
        interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
    ) -> Client:
        """A client for `target` (the channel connects lazily; calls retry while it comes up)."""
        return cls(
            target,
            token=token,
            tls=tls,
            default_timeout=default_timeout,
            interceptors=interceptors,
        )

    async def close(self) -> None:
        await self._transport.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
