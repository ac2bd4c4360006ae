"""Traces over real OTLP (docs/observability.md#traces): a stand-in collector (the OTLP gRPC
TraceService, from the `otel` extra's protos), a server with only OTEL_EXPORTER_OTLP_ENDPOINT
set (so the server installs its own provider and exporter) on an embedded Valkey, one submit
and one claim; then it prints the spans the collector received and exits 1 if the server's
spans did not arrive. Not part of the suite: it boots a server and waits on a batch export.

    .venv/bin/python scripts/otlp_smoke.py
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[tuple[str, str]] = []  # (service.name, span name)

    async def Export(self, request: Any, context: Any) -> Any:
        for rs in request.resource_spans:
            service = next(
                (a.value.string_value for a in rs.resource.attributes if a.key == "service.name"),
                "",
            )
            for ss in rs.scope_spans:
                self.spans += [(service, s.name) for s in ss.spans]
        return trace_service_pb2.ExportTraceServiceResponse()


async def main() -> int:
    collector = Collector()
    otlp = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, otlp)
    port = otlp.add_insecure_port("127.0.0.1:0")
    await otlp.start()
    os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{port}"
    os.environ["OTEL_EXPORTER_OTLP_INSECURE"] = "true"
    os.environ["OTEL_BSP_SCHEDULE_DELAY"] = "200"

    from flowfabric import Client
    from flowfabric.server.app import FlowFabricServer
    from flowfabric.server.config import Config

    with tempfile.TemporaryDirectory() as data:
        config = Config.load(["--data-dir", data, "--listen-addr", "127.0.0.1:0"])
        assert config.otel, "OTEL_EXPORTER_OTLP_ENDPOINT should turn tracing on"
        server = FlowFabricServer(config)
        await server.start()
        try:
            async with Client(f"127.0.0.1:{server.port}") as client:
                await client.submit("smoke", {"n": 1})
                await client.list()
        finally:
            await server.stop()
    for _ in range(50):
        if any(name.endswith("/CreateExecution") for _, name in collector.spans):
            break
        await asyncio.sleep(0.1)
    await otlp.stop(None)
    for service, name in collector.spans:
        print(f"{service}: {name}")
    ok = ("flowfabric", "flowfabric.v1.ExecutionService/CreateExecution") in collector.spans
    print("OK" if ok else "FAILED: no CreateExecution span from service flowfabric")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
