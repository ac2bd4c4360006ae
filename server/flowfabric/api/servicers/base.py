"""What every servicer shares: the server context and the not-yet-delivered RPC marker."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from flowfabric.server.config import Config
from flowfabric.server.engine.lane_partitions import LanePartitions
from flowfabric.server.valkey.errors import FlowFabricError, not_implemented
from flowfabric.server.valkey.functions import Functions
from flowfabric.server.valkey.ids import ExecutionId, parse_execution_id
from flowfabric.server.valkey.store import Store


@dataclass
class ServerContext:
    """Shared by every servicer: configuration, the store and the function wrappers."""

    config: Config
    store: Store
    functions: Functions
    # every lane's partitions, shared with the scheduler (None: one partition per lane)
    lane_partitions: LanePartitions | None = None

    @property
    def partitions(self) -> int:
        return self.config.flow_partitions

    def execution_id(self, value: str, field: str = "execution_id") -> ExecutionId:
        return parse_execution_id(value, self.partitions, field)


T = TypeVar("T", bound=type)


def pending(service_descriptor: Any, delivered_by: str) -> Callable[[T], T]:
    """Give every RPC of the service the class does not implement a clear UNIMPLEMENTED answer.

    The generated base class answers a bare "Method not implemented!"; ours names the RPC and
    the work that will deliver it, through the same error path as every other failure.
    """

    def decorate(cls: T) -> T:
        # Implemented by the class or one of its own bases (mixins), not the generated servicer.
        own = [k for k in cls.__mro__ if not k.__module__.endswith("_pb2_grpc")]
        for method in service_descriptor.methods:
            if any(method.name in k.__dict__ for k in own):
                continue
            rpc_name = f"{service_descriptor.name}.{method.name}"
            error = partial(not_implemented, rpc_name, delivered_by)
            setattr(
                cls, method.name, _streaming(error) if method.server_streaming else _unary(error)
            )
        return cls

    return decorate


# A new error per call: raising one shared exception instance again and again would chain every
# call's frames onto its __traceback__ (and with them each request), a leak that grows per call.
def _unary(error: Callable[[], FlowFabricError]) -> Callable[..., Any]:
    async def rpc(self: Any, request: Any, context: Any) -> Any:
        raise error()

    return rpc


def _streaming(error: Callable[[], FlowFabricError]) -> Callable[..., Any]:
    async def rpc(self: Any, request: Any, context: Any) -> AsyncIterator[Any]:
        raise error()
        yield  # pragma: no cover - makes this an async generator

    return rpc
