"""OpenTelemetry traces end to end (docs/observability.md#traces): a real server with tracing on
(FF_OTEL), the SDK and a worker, all reporting to one in-memory exporter. A submit under the
caller's span → the server's span for CreateExecution → the worker's handler span, one trace;
a wide flow's members past the bound start new traces linked to the submitter's."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.util._once import Once

from flowfabric import Client, NotFound, Worker
from flowfabric.server.app import BootError, FlowFabricServer
from flowfabric.server.config import Config, ConfigError
from flowfabric.server.valkey.store import Store
from flowfabric.server.valkey.tracecontext import PARENTED_MEMBERS
from flowfabric.v1 import execution_pb2
from tests.api.util import expect_error, keyspace_size
from tests.conftest import API_TOKEN, HMAC_SECRET, Api
from tests.sdk.conftest import eventually, running

standalone = pytest.mark.parametrize("valkey_url", ["standalone"], indirect=True)
pytestmark = standalone

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    """A global SDK tracer provider exporting to memory for this test, then none again (the
    SDK traces only while the application has set a provider)."""
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace.set_tracer_provider(provider)
    yield memory
    provider.shutdown()
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace._TRACER_PROVIDER = None


@pytest.fixture
async def address(
    valkey_url: str, store: Store, exporter: InMemorySpanExporter
) -> AsyncIterator[str]:
    """A server with tracing on (FF_OTEL) on the test's keyspace."""
    config = Config(
        valkey_url=valkey_url, listen_addr="127.0.0.1:0", api_token=API_TOKEN,
        waitpoint_hmac_secret=HMAC_SECRET, shutdown_grace_s=1.0, boot_retry_s=5.0, otel=True,
    )  # fmt: skip
    server = FlowFabricServer(config, run_scanners=False)
    await server.start()
    yield f"127.0.0.1:{server.port}"
    await server.stop()


def ids(span: ReadableSpan) -> tuple[int, int]:
    assert span.context is not None
    return span.context.trace_id, span.context.span_id


def named(spans: Sequence[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def worker_for(address: str, lane: str) -> Worker:
    worker = Worker(address, token=API_TOKEN, lanes=[lane], concurrency=16, handle_signals=False)

    @worker.handler("traced")
    async def traced(ctx: object) -> dict[str, bool]:
        with trace.get_tracer("test").start_as_current_span("inside the handler"):
            await asyncio.sleep(0)
        return {"ok": True}

    return worker


async def handler_spans(exporter: InMemorySpanExporter, n: int) -> list[ReadableSpan]:
    async def probe() -> list[ReadableSpan]:
        return named(exporter.get_finished_spans(), "handle traced")

    return await eventually(probe, lambda spans: len(spans) >= n)


async def test_submit_server_and_handler_spans_are_one_trace(
    address: str, exporter: InMemorySpanExporter
) -> None:
    lane = f"trace-{uuid.uuid4().hex[:8]}"
    tracer = trace.get_tracer("test")
    async with Client(address, token=API_TOKEN) as client:
        with tracer.start_as_current_span("caller") as caller:
            job = await client.submit("traced", {"n": 1}, lane=lane)
        async with running(worker_for(address, lane)):
            await client.wait(job.execution_id, timeout=10)
            (handler,) = await handler_spans(exporter, 1)
        missing = f"{job.execution_id.rsplit(':', 1)[0]}:{uuid.uuid4()}"
        with tracer.start_as_current_span("caller of a failing call"), pytest.raises(NotFound):
            await client.get(missing)

    spans = exporter.get_finished_spans()
    trace_id = caller.get_span_context().trace_id
    (submit,) = named(spans, "submit traced")
    assert submit.kind is SpanKind.PRODUCER
    assert submit.parent is not None and submit.parent.span_id == caller.get_span_context().span_id
    # the server's span for the create: a child of the submit span (traceparent metadata)
    (create,) = named(spans, "flowfabric.v1.ExecutionService/CreateExecution")
    assert create.kind is SpanKind.SERVER
    assert create.parent is not None and (create.parent.trace_id, create.parent.span_id) == ids(
        submit
    )
    assert create.attributes is not None and create.attributes["rpc.grpc.status_code"] == 0
    # the worker's handler span: a child of the submit span (the context stored at create)
    assert handler.kind is SpanKind.CONSUMER
    assert handler.parent is not None and (handler.parent.trace_id, handler.parent.span_id) == ids(
        submit
    )
    assert handler.attributes is not None
    assert handler.attributes["flowfabric.execution_id"] == job.execution_id
    assert handler.attributes["flowfabric.outcome"] == "returned"
    assert not handler.links
    # spans the handler opens are its children
    (inside,) = named(spans, "inside the handler")
    assert inside.parent is not None and inside.parent.span_id == ids(handler)[1]
    assert {ids(s)[0] for s in (submit, create, handler, inside)} == {trace_id}
    # a refused call: its span carries the status the error table gave it
    (get,) = named(spans, "flowfabric.v1.ExecutionService/GetExecution")
    assert get.attributes is not None
    assert get.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert get.attributes["flowfabric.execution_id"] == missing
    assert get.status.status_code is StatusCode.ERROR and get.parent is not None
    # calls outside any span carry no context: the worker's claims start traces of their own
    claims = named(spans, "flowfabric.v1.WorkerService/ClaimNext")
    assert claims and all(s.parent is None for s in claims)


async def test_flow_members_past_the_bound_link_instead_of_parent(
    address: str, exporter: InMemorySpanExporter
) -> None:
    lane = f"trace-{uuid.uuid4().hex[:8]}"
    width = PARENTED_MEMBERS + 3
    async with Client(address, token=API_TOKEN) as client:
        f = client.flow()
        members = [f.add("traced", {"i": i}, lane=lane) for i in range(width)]
        # the worker first: its long poll hears of the flow's partition as the submit lands
        async with running(worker_for(address, lane)):
            with trace.get_tracer("test").start_as_current_span("caller"):
                flow = await f.submit()
            spans = await handler_spans(exporter, width)

    (submit,) = named(exporter.get_finished_spans(), "submit flow dag")
    by_eid = {s.attributes["flowfabric.execution_id"]: s for s in spans if s.attributes}
    for i, handle in enumerate(members):
        span = by_eid[flow[handle]]
        assert span.attributes is not None
        assert span.attributes["flowfabric.flow_id"] == flow.flow_id
        if i < PARENTED_MEMBERS:  # in the submitter's trace, its child
            assert span.parent is not None
            assert (span.parent.trace_id, span.parent.span_id) == ids(submit)
            assert not span.links
        else:  # the root of a new trace, linked to the submit span
            assert span.parent is None
            assert ids(span)[0] != ids(submit)[0]
            (link,) = span.links
            assert (link.context.trace_id, link.context.span_id) == ids(submit)


@pytest.mark.parametrize(
    ("carrier", "field"),
    [
        ({"traceparent": "00-abc-def-01"}, "trace_context.traceparent"),
        ({"traceparent": "00-" + "0" * 32 + "-b7ad6b7169203331-01"}, "trace_context.traceparent"),
        ({"tracestate": "a=b"}, "trace_context.traceparent"),
        ({"traceparent": TRACEPARENT, "baggage": "x=1"}, "trace_context"),
        ({"traceparent": TRACEPARENT, "tracestate": "k=" + "v" * 600}, "trace_context.tracestate"),
        ({"traceparent": TRACEPARENT, "tracestate": "novalue"}, "trace_context.tracestate"),
        ({"traceparent": TRACEPARENT, "tracestate": "k=\x01"}, "trace_context.tracestate"),
    ],
)
async def test_a_bad_trace_context_is_invalid_and_writes_nothing(
    api: Api, carrier: dict[str, str], field: str
) -> None:
    request = execution_pb2.CreateExecutionRequest(
        execution_kind="traced", input_payload=b"{}", trace_context=carrier
    )
    before = await keyspace_size(api.store)
    info = await expect_error(
        api.execution.CreateExecution(request, metadata=api.metadata),
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid_input",
    )
    assert info.metadata["field"] == field
    assert await keyspace_size(api.store) == before


OFF = """
import asyncio, importlib.abc, sys

class NoOpenTelemetry(importlib.abc.MetaPathFinder):  # as if the otel extra were not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "opentelemetry":
            raise ImportError(name)

sys.meta_path.insert(0, NoOpenTelemetry())
from flowfabric import Client, NotFound, Worker
from flowfabric.server.app import FlowFabricServer
from flowfabric.server.config import Config

async def main(url):
    config = Config(valkey_url=url, listen_addr="127.0.0.1:0", waitpoint_hmac_secret="00" * 32,
                    shutdown_grace_s=1.0)
    server = FlowFabricServer(config, run_scanners=False)
    await server.start()
    address = f"127.0.0.1:{server.port}"
    worker = Worker(address, lanes=["untraced"], handle_signals=False, claim_wait_ms=100)

    @worker.handler("untraced")
    async def untraced(ctx):
        return b"done"

    async with Client(address) as client, worker:
        running = asyncio.create_task(worker.run())
        job = await client.submit("untraced", b"", lane="untraced")
        await client.wait(job.execution_id, timeout=10)
        assert await client.result(job.execution_id) == b"done"
        worker.stop()
        await running
    await server.stop()
    print(sorted(m for m in sys.modules if "opentelemetry" in m or m.endswith(".tracing")))

asyncio.run(main(sys.argv[1]))
"""


async def test_without_the_extra_nothing_needs_opentelemetry(valkey_url: str, store: Store) -> None:
    """OpenTelemetry not importable and tracing off: a server, a submit, a claim and a
    completion work, and the server's tracing module is never loaded."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", OFF, valkey_url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert out.decode().strip().splitlines()[-1] == "[]"


def test_tracing_switch(valkey_url: str) -> None:
    """FF_OTEL decides; unset, a standard OTLP endpoint variable turns tracing on."""
    base = {"FF_VALKEY_URL": valkey_url, "FF_WAITPOINT_HMAC_SECRET": HMAC_SECRET}
    assert not Config.from_env(base).otel
    assert Config.from_env({**base, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}).otel
    assert Config.from_env({**base, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4317"}).otel
    assert Config.from_env({**base, "FF_OTEL": "1"}).otel
    endpoint_but_off = {**base, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "FF_OTEL": "0"}
    assert not Config.from_env(endpoint_but_off).otel
    with pytest.raises(ConfigError, match="FF_OTEL"):
        Config.from_env({**base, "FF_OTEL": "maybe"})


async def test_tracing_on_without_the_extra_refuses_to_boot(
    valkey_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "opentelemetry.sdk" else real(name, *a),
    )
    config = Config(valkey_url=valkey_url, waitpoint_hmac_secret=HMAC_SECRET, otel=True)
    with pytest.raises(BootError, match="otel"):
        await FlowFabricServer(config).start()
