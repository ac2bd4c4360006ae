"""Every RPC of the public API, found by walking the generated file descriptors."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor

# The generated modules that declare services (types_pb2 declares messages only).
SERVICE_MODULES = ("admin", "budget", "execution", "flow", "lane", "signal", "stream", "worker")


@dataclass(frozen=True)
class Rpc:
    """One method: its wire path, message classes and streaming shape."""

    service: str
    name: str
    request: Any  # the generated message class
    response: Any
    client_streaming: bool
    server_streaming: bool

    @property
    def path(self) -> str:
        return f"/flowfabric.v1.{self.service}/{self.name}"

    @property
    def label(self) -> str:
        return f"{self.service}.{self.name}"


def _rpc(service: str, method: MethodDescriptor) -> Rpc:
    return Rpc(
        service=service,
        name=method.name,
        request=message_factory.GetMessageClass(method.input_type),
        response=message_factory.GetMessageClass(method.output_type),
        client_streaming=method.client_streaming,
        server_streaming=method.server_streaming,
    )


def all_rpcs() -> list[Rpc]:
    out = []
    for name in SERVICE_MODULES:
        module = importlib.import_module(f"flowfabric.v1.{name}_pb2")
        for service in module.DESCRIPTOR.services_by_name.values():
            out.extend(_rpc(service.name, method) for method in service.methods)
    return sorted(out, key=lambda r: r.label)
