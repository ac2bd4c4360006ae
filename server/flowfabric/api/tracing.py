"""OpenTelemetry server spans (docs/observability.md#traces): one SERVER span per RPC, a child
of the caller's W3C `traceparent` / `tracestate` gRPC metadata when it sent one.

Imported only when tracing is on (`FF_OTEL`, or an OTLP endpoint configured): with it off the
interceptor has no hook and nothing imports OpenTelemetry. The spans go to the process's global
tracer provider; `configure()` installs one exporting over OTLP unless the process already has
one (an application embedding the server, or a test with an in-memory exporter).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from flowfabric.server.api.handlers import rewrap

if TYPE_CHECKING:
    from flowfabric.server.api.interceptors import Context, Handler

PROPAGATOR = TraceContextTextMapPropagator()
TRACER_NAME = "flowfabric.server"
_installed: Any = None  # the provider configure() installed
FLUSH_TIMEOUT_S = 2.0


def configure() -> None:
    """Install an SDK tracer provider with a batching OTLP exporter (configured by the standard
    `OTEL_EXPORTER_OTLP_*` variables) unless a provider is already set."""
    global _installed
    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": "flowfabric"}
    # not shut down at exit: that waits out the exporter's retries when the collector is gone;
    # server stop flushes instead (flush)
    provider = TracerProvider(resource=Resource.create(attributes), shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _installed = provider


def flush() -> None:
    """Export what the provider `configure()` installed still holds, waiting at most
    FLUSH_TIMEOUT_S (server stop): an unreachable collector must not hold up a shutdown, so the
    flush runs on a daemon thread that is left behind if it takes longer."""
    if _installed is None:
        return
    flusher = threading.Thread(
        target=_installed.force_flush, args=(int(FLUSH_TIMEOUT_S * 1000),), daemon=True,
        name="flowfabric-otel-flush",
    )  # fmt: skip
    flusher.start()
    flusher.join(FLUSH_TIMEOUT_S)


def _carrier(context: Context) -> dict[str, str]:
    out = {}
    for key, value in context.invocation_metadata() or ():
        if key in ("traceparent", "tracestate") and isinstance(value, str):
            out[key] = value
    return out


def _execution_id(request: Any) -> str:
    eid = getattr(request, "execution_id", "")
    return eid if isinstance(eid, str) else ""


def _end(span: trace.Span, context: Context, failed: BaseException | None) -> None:
    """The call's gRPC status on the span: the one its abort set (the error table's), else
    CANCELLED for a cancelled call, UNKNOWN for another escape, OK otherwise."""
    try:
        code = context.code()
    except Exception:
        code = None
    if not isinstance(code, grpc.StatusCode):
        if failed is None:
            code = grpc.StatusCode.OK
        elif isinstance(failed, asyncio.CancelledError):
            code = grpc.StatusCode.CANCELLED
        else:
            code = grpc.StatusCode.UNKNOWN
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code is not grpc.StatusCode.OK:
        span.set_status(Status(StatusCode.ERROR, code.name))


def wrap(handler: Handler, method: str) -> Handler:
    """`handler` with each call in a SERVER span named after the method."""
    tracer = trace.get_tracer(TRACER_NAME)
    name = method.lstrip("/")
    service, _, rpc = name.rpartition("/")
    attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": rpc}

    def start(request: Any, context: Context) -> trace.Span:
        span = tracer.start_span(
            name, context=PROPAGATOR.extract(_carrier(context)), kind=SpanKind.SERVER,
            attributes=attributes,
        )  # fmt: skip
        eid = _execution_id(request)
        if eid:
            span.set_attribute("flowfabric.execution_id", eid)
        return span

    async def unary(request: Any, context: Context) -> Any:
        behavior: Any = handler.unary_unary or handler.stream_unary
        span = start(request, context)
        failed: BaseException | None = None
        try:
            with trace.use_span(span, end_on_exit=False, record_exception=False,
                                set_status_on_exception=False):  # fmt: skip
                return await behavior(request, context)
        except BaseException as exc:
            failed = exc
            raise
        finally:
            _end(span, context, failed)
            span.end()

    async def streaming(request: Any, context: Context) -> AsyncIterator[Any]:
        # not made current: the context would have to survive the generator's suspensions
        behavior: Any = handler.unary_stream or handler.stream_stream
        span = start(request, context)
        failed: BaseException | None = None
        try:
            async for item in behavior(request, context):
                yield item
        except BaseException as exc:
            failed = exc
            raise
        finally:
            _end(span, context, failed)
            span.end()

    return rewrap(handler, unary, streaming)
