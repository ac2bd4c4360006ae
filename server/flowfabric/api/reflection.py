"""Server reflection that resolves every symbol grpcurl asks for (docs/architecture.md#reflection).

The stock servicer looks symbols up with `DescriptorPool.FindFileContainingSymbol`, which in
the protobuf runtime finds services and messages but not methods, so
`grpcurl describe flowfabric.v1.SignalService.WatchSignals` answered "Symbol not found". The
pool handed to it here falls back to the method's service file.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha import reflection

__all__ = ["enable"]


class _MethodAwarePool:
    """The default descriptor pool, with method names resolvable to their file."""

    def __init__(self, pool: descriptor_pool.DescriptorPool) -> None:
        self._pool = pool

    def FindFileContainingSymbol(self, full_name: str) -> Any:  # the pool API's name
        try:
            return self._pool.FindFileContainingSymbol(full_name)
        except KeyError:
            # a method: the file of its service (KeyError again if it is not one either)
            return self._pool.FindMethodByName(full_name).containing_service.file

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)


def enable(service_names: list[str], server: grpc.aio.Server) -> None:
    """Register reflection for `service_names` (plus reflection itself) on `server`."""
    pool = _MethodAwarePool(descriptor_pool.Default())
    reflection.enable_server_reflection(
        [*service_names, reflection.SERVICE_NAME],
        server,
        pool=pool,  # type: ignore[arg-type]
    )
