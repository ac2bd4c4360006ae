"""OpenTelemetry in the SDK (docs/observability.md#traces), the usual library convention: the
SDK depends on the OpenTelemetry API only, and traces only once the application has set a
tracer provider. Until then (or without OpenTelemetry installed) every helper here is a no-op
that imports nothing: it looks in `sys.modules`, and an application that configured a provider
has imported `opentelemetry.trace` already.

What it does when on:
- every call carries the current context as `traceparent` / `tracestate` gRPC metadata, so the
  server's span for it joins the caller's trace;
- `submit`, `submit_many` and a flow's `submit()` run in a PRODUCER span and store its context
  on the executions (`trace_context`), and
- the worker runs each handler in a CONSUMER span, a child of that stored context, or (a wide
  flow's later members, `ClaimedTask.trace_link`) the root of a new trace linked to it.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

TRACER_NAME = "flowfabric"
_propagator: Any = None


def _trace() -> Any:
    """The `opentelemetry.trace` module when the application has set a tracer provider."""
    mod = sys.modules.get("opentelemetry.trace")
    if mod is None or isinstance(mod.get_tracer_provider(), mod.ProxyTracerProvider):
        return None
    return mod


def _w3c() -> Any:
    global _propagator
    if _propagator is None:
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        _propagator = TraceContextTextMapPropagator()
    return _propagator


def carrier() -> dict[str, str]:
    """The current span's W3C context (`traceparent`, `tracestate`); {} when off or none."""
    if _trace() is None:
        return {}
    out: dict[str, str] = {}
    _w3c().inject(out)
    return out


def metadata() -> tuple[tuple[str, str], ...]:
    """`carrier()` as gRPC metadata, for every call."""
    if _trace() is None:
        return ()
    return tuple(carrier().items())


@contextlib.contextmanager
def producing(name: str, **attributes: Any) -> Iterator[dict[str, str]]:
    """A PRODUCER span around a submit, current while it runs; yields its `carrier()` for the
    request's `trace_context` ({} when tracing is off)."""
    trace = _trace()
    if trace is None:
        yield {}
        return
    tracer = trace.get_tracer(TRACER_NAME)
    attrs = {f"flowfabric.{k}": v for k, v in attributes.items() if v not in (None, "")}
    with tracer.start_as_current_span(name, kind=trace.SpanKind.PRODUCER, attributes=attrs):
        yield carrier()


@contextlib.contextmanager
def handling(task: Any) -> Iterator[Any]:
    """The CONSUMER span of one claimed task's handler (a `types_pb2.ClaimedTask`), current
    while it runs; yields the span, or None when tracing is off."""
    trace = _trace()
    if trace is None:
        yield None
        return
    from opentelemetry.context import Context

    parent = Context()  # a new trace unless the submitter's context is the parent
    links = []
    if task.trace_context:
        submitted = _w3c().extract(dict(task.trace_context))
        if task.trace_link:
            linked = trace.get_current_span(submitted).get_span_context()
            if linked.is_valid:
                links.append(trace.Link(linked, {"flowfabric.link": "submitter"}))
        else:
            parent = submitted
    lease = task.lease
    attrs = {
        "flowfabric.execution_id": lease.execution_id,
        "flowfabric.execution_kind": task.execution_kind,
        "flowfabric.lane_id": lease.lane_id,
        "flowfabric.attempt_index": lease.attempt_index,
    }
    if task.HasField("flow_id"):
        attrs["flowfabric.flow_id"] = task.flow_id
    tracer = trace.get_tracer(TRACER_NAME)
    with tracer.start_as_current_span(
        f"handle {task.execution_kind}", context=parent, kind=trace.SpanKind.CONSUMER,
        links=links, attributes=attrs,
    ) as span:  # fmt: skip
        yield span


def outcome(span: Any, handler: Any, suspended: BaseException | None) -> None:
    """Mark the handler span with how the handler task ended (failed, cancelled, suspended)."""
    if span is None:
        return
    from opentelemetry.trace import Status, StatusCode

    if handler.cancelled():
        span.set_attribute("flowfabric.outcome", "cancelled")
        return
    exc = handler.exception()
    if exc is None:
        span.set_attribute("flowfabric.outcome", "returned")
    elif exc is suspended:
        span.set_attribute("flowfabric.outcome", "suspended")
    else:
        span.set_attribute("flowfabric.outcome", "raised")
        span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
