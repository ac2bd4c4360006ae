"""FF_DURABILITY end to end (docs/durability.md): each mode answers correctly; `replicated` waits
with few, batched WAITAOFs, answers UNAVAILABLE `durability_timeout` when the replica is gone
(the write applied, a retry replays it), and follows a Cluster failover to the new primary."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis.crc import key_slot

from flowfabric.server.app import DURABILITY_HEALTH, BootError, FlowFabricServer
from flowfabric.server.config import Config, ConfigError
from flowfabric.server.embedded import ValkeyProcess
from flowfabric.v1 import execution_pb2 as pb
from flowfabric.v1 import execution_pb2_grpc
from tests.api.util import error_info
from tests.conftest import API_TOKEN, HMAC_SECRET

C = grpc.StatusCode
META = (("authorization", f"Bearer {API_TOKEN}"),)


# -- configuration -------------------------------------------------------------------------------


def test_defaults_and_parsing() -> None:
    base = {"FF_VALKEY_URL": "valkey://127.0.0.1:1", "FF_WAITPOINT_HMAC_SECRET": HMAC_SECRET}
    cfg = Config.from_env(base)
    assert (cfg.durability, cfg.durability_replicas, cfg.durability_timeout_ms) == ("os", 1, 1000)
    cfg = Config.from_env(
        {**base, "FF_DURABILITY": "Replicated", "FF_DURABILITY_REPLICAS": "2",
         "FF_DURABILITY_TIMEOUT_MS": "250"}
    )  # fmt: skip
    assert (cfg.durability, cfg.durability_replicas, cfg.durability_timeout_ms) == (
        "replicated", 2, 250,
    )  # fmt: skip
    assert Config.load(["--durability", "fsync"], env=base).durability == "fsync"


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("FF_DURABILITY", "disk"),
        ("FF_DURABILITY_REPLICAS", "-1"),
        ("FF_DURABILITY_REPLICAS", "many"),
        ("FF_DURABILITY_TIMEOUT_MS", "0"),
        ("FF_DURABILITY_TIMEOUT_MS", "600000"),
    ],
)
def test_bad_values_name_the_variable(var: str, value: str) -> None:
    env = {"FF_VALKEY_URL": "valkey://127.0.0.1:1", "FF_WAITPOINT_HMAC_SECRET": HMAC_SECRET}
    with pytest.raises(ConfigError, match=var):
        Config.from_env({**env, var: value})


def test_replicated_needs_an_external_valkey() -> None:
    with pytest.raises(ConfigError, match="FF_DURABILITY=replicated"):
        Config.from_env({"FF_DURABILITY": "replicated"})


# -- helpers -------------------------------------------------------------------------------------


def waitaof_calls(port: int) -> int:
    with redis.Redis(port=port) as r:
        stats = r.info("commandstats")
    return int(stats.get("cmdstat_waitaof", {}).get("calls", 0))


def wait_replicas(port: int, want: int, timeout: float = 20.0) -> None:
    """Until the primary on `port` has `want` online replicas with nothing left to copy."""
    deadline = time.monotonic() + timeout
    with redis.Redis(port=port) as r:
        while True:
            info = r.info("replication")
            online = [
                v for k, v in info.items()
                if k.startswith("slave") and isinstance(v, dict) and v.get("state") == "online"
            ]  # fmt: skip
            if len(online) >= want and all(
                v["offset"] == info["master_repl_offset"] for v in online
            ):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"replicas not in sync: {info}")
            time.sleep(0.05)


def wait_aof_settled(port: int, timeout: float = 20.0) -> None:
    """Until a replica has finished the AOF rewrite it starts after its initial sync (until
    then it does not acknowledge on disk)."""
    deadline = time.monotonic() + timeout
    with redis.Redis(port=port) as r:
        while True:
            info = r.info("persistence")
            if not info["aof_rewrite_in_progress"] and not info["aof_rewrite_scheduled"]:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"AOF rewrite still running: {info}")
            time.sleep(0.05)


def server_config(url: str, **over: object) -> Config:
    fields: dict[str, object] = {
        "valkey_url": url, "listen_addr": "127.0.0.1:0", "api_token": API_TOKEN,
        "waitpoint_hmac_secret": HMAC_SECRET, "shutdown_grace_s": 1.0, "boot_retry_s": 5.0,
    }  # fmt: skip
    fields.update(over)
    return Config(**fields)  # type: ignore[arg-type]


async def create(
    stub: execution_pb2_grpc.ExecutionServiceStub, eid: str
) -> pb.CreateExecutionResponse:
    return await stub.CreateExecution(  # type: ignore[no-any-return]
        pb.CreateExecutionRequest(execution_id=eid, execution_kind="demo"), metadata=META
    )


def new_eid(partition: int = 3) -> str:
    return f"{{fp:{partition}}}:{uuid.uuid4()}"


class Served:
    def __init__(self, server: FlowFabricServer, channel: grpc.aio.Channel) -> None:
        self.server = server
        self.channel = channel
        self.execution = execution_pb2_grpc.ExecutionServiceStub(channel)
        self.health = health_pb2_grpc.HealthStub(channel)


async def serve(config: Config) -> Served:
    server = FlowFabricServer(config, run_scanners=False)
    server.health_ping_interval_s = 0.1
    await server.start()
    return Served(server, grpc.aio.insecure_channel(f"127.0.0.1:{server.port}"))


async def close(served: Served) -> None:
    await served.channel.close()
    await served.server.stop()


# -- os and fsync --------------------------------------------------------------------------------


async def test_os_mode_never_waits(valkey_standalone: ValkeyProcess) -> None:
    served = await serve(server_config(valkey_standalone.url))
    try:
        before = waitaof_calls(valkey_standalone.port)
        assert (await create(served.execution, new_eid())).WhichOneof("outcome") == "created"
        assert waitaof_calls(valkey_standalone.port) == before
    finally:
        await close(served)


async def test_fsync_embedded_runs_appendfsync_always(tmp_path: Path) -> None:
    config = Config(
        data_dir=tmp_path / "d", listen_addr="127.0.0.1:0", api_token=API_TOKEN,
        durability="fsync", shutdown_grace_s=1,
    )  # fmt: skip
    served = await serve(config)
    try:
        assert served.server.embedded is not None
        with redis.Redis(port=served.server.embedded.port,
                         password=served.server.embedded.password) as r:  # fmt: skip
            cfg = r.config_get("append*")
            assert (cfg["appendonly"], cfg["appendfsync"]) == ("yes", "always")
        assert (await create(served.execution, new_eid())).WhichOneof("outcome") == "created"
    finally:
        await close(served)


async def test_fsync_refuses_an_external_valkey_without_it(
    valkey_standalone: ValkeyProcess,
) -> None:
    server = FlowFabricServer(server_config(valkey_standalone.url, durability="fsync"))
    with pytest.raises(BootError, match="appendfsync always"):
        await server.start()
    await server.stop()


@pytest.fixture(scope="module")
def fsync_valkey() -> Iterator[ValkeyProcess]:
    # started from the main thread, like the session fixtures (no fork from a worker thread
    # while gRPC's threads run)
    valkey = ValkeyProcess(appendfsync="always").start()
    yield valkey
    valkey.stop()


async def test_fsync_accepts_an_external_valkey_with_it(fsync_valkey: ValkeyProcess) -> None:
    served = await serve(server_config(fsync_valkey.url, durability="fsync"))
    try:
        assert (await create(served.execution, new_eid())).WhichOneof("outcome") == "created"
        assert waitaof_calls(fsync_valkey.port) == 0  # Valkey fsyncs before replying; no wait
    finally:
        await close(served)


# -- replicated, standalone primary + 1 replica --------------------------------------------------


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[ValkeyProcess, ValkeyProcess]]:
    primary = ValkeyProcess().start()  # AOF everysec: the primary's own fsync is not waited for
    replica = ValkeyProcess(appendfsync="always", replica_of=primary.port).start()
    wait_replicas(primary.port, 1)
    wait_aof_settled(replica.port)
    yield primary, replica
    replica.stop()
    primary.stop()


@pytest.fixture
async def replicated(pair: tuple[ValkeyProcess, ValkeyProcess]) -> AsyncIterator[Served]:
    primary, _ = pair
    with redis.Redis(port=primary.port) as r:
        r.flushall()
    served = await serve(
        # generous: a shared, loaded machine; only the replica-gone test waits it out
        server_config(primary.url, durability="replicated", durability_timeout_ms=2000)
    )
    yield served
    await close(served)


async def test_replicated_waits_in_batched_rounds(
    replicated: Served, pair: tuple[ValkeyProcess, ValkeyProcess]
) -> None:
    primary, _ = pair
    before = waitaof_calls(primary.port)
    assert (await create(replicated.execution, new_eid())).WhichOneof("outcome") == "created"
    one = waitaof_calls(primary.port)
    assert one == before + 1
    calls = 64
    replies = await asyncio.gather(
        *(create(replicated.execution, new_eid(p % 256)) for p in range(calls))
    )
    assert all(r.WhichOneof("outcome") == "created" for r in replies)
    rounds = waitaof_calls(primary.port) - one
    print(f"{calls} concurrent creates, {rounds} WAITAOF rounds")
    assert 1 <= rounds < calls, rounds  # many calls shared each wait


async def test_reads_do_not_wait(
    replicated: Served, pair: tuple[ValkeyProcess, ValkeyProcess]
) -> None:
    primary, _ = pair
    eid = new_eid()
    await create(replicated.execution, eid)
    before = waitaof_calls(primary.port)
    await replicated.execution.GetExecution(pb.GetExecutionRequest(execution_id=eid), metadata=META)
    assert waitaof_calls(primary.port) == before


async def test_replica_gone_answers_unavailable_and_a_retry_replays(
    replicated: Served, pair: tuple[ValkeyProcess, ValkeyProcess]
) -> None:
    primary, replica = pair
    await asyncio.to_thread(replica.stop)
    try:
        eid = new_eid()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await create(replicated.execution, eid)
        assert caught.value.code() == C.UNAVAILABLE
        info = error_info(caught.value)
        assert info.reason == "durability_timeout"
        assert "0 of 1 replicas acknowledged" in (caught.value.details() or "")
        assert info.metadata["retryable"] == "true"
        # the transition is applied
        got = await replicated.execution.GetExecution(
            pb.GetExecutionRequest(execution_id=eid), metadata=META
        )
        assert got.execution.execution_id == eid
        # health says the promise cannot be kept, while the server itself is serving
        status = health_pb2.HealthCheckResponse
        down, up = status.NOT_SERVING, status.SERVING
        await _until_health(replicated, DURABILITY_HEALTH, down)
        await _until_health(replicated, "", up)
    finally:
        replica.start()  # from the main thread: see fsync_valkey
        await asyncio.to_thread(wait_replicas, primary.port, 1)
        await asyncio.to_thread(wait_aof_settled, replica.port)
    again = await create(replicated.execution, eid)
    assert again.WhichOneof("outcome") == "duplicate"  # the retry replays the applied create
    await _until_health(replicated, DURABILITY_HEALTH, health_pb2.HealthCheckResponse.SERVING)


async def test_replicated_without_enough_replicas_warns_at_boot(
    pair: tuple[ValkeyProcess, ValkeyProcess], caplog: pytest.LogCaptureFixture
) -> None:
    primary, _ = pair
    served = await serve(
        server_config(primary.url, durability="replicated", durability_replicas=2,
                      durability_timeout_ms=100)
    )  # fmt: skip
    try:
        assert "has 1 online replicas" in caplog.text
        status = await served.health.Check(health_pb2.HealthCheckRequest(service=DURABILITY_HEALTH))
        assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        await close(served)


async def _until_health(served: Served, service: str, want: int) -> None:
    deadline = time.monotonic() + 10
    while True:
        got = (await served.health.Check(health_pb2.HealthCheckRequest(service=service))).status
        if got == want:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"health {service!r} is {got}, want {want}")
        await asyncio.sleep(0.05)


# -- replicated on a Cluster: 3 primaries + 3 replicas, then a failover --------------------------


class ReplicatedCluster:
    """Three primaries and one replica each, every node with AOF `always` (a replica promoted
    by the failover must be able to acknowledge on disk, and so must the demoted primary)."""

    def __init__(self) -> None:
        def node() -> ValkeyProcess:
            return ValkeyProcess(cluster=True, appendfsync="always")

        self.primaries = [node() for _ in range(3)]
        self.replicas = [node() for _ in range(3)]

    @property
    def url(self) -> str:
        return f"{self.primaries[0].url}?cluster=1"

    def start(self) -> ReplicatedCluster:
        nodes = self.primaries + self.replicas
        for n in nodes:
            n.start()
        bounds = [round(i * 16384 / 3) for i in range(4)]
        first = self.primaries[0]
        clients = [redis.Redis(port=n.port, decode_responses=True) for n in nodes]
        try:
            for i, c in enumerate(clients[:3]):
                c.execute_command("CLUSTER", "ADDSLOTSRANGE", bounds[i], bounds[i + 1] - 1)  # type: ignore[no-untyped-call]
            for c in clients[1:]:
                c.execute_command("CLUSTER", "MEET", "127.0.0.1", first.port, first.bus_port)  # type: ignore[no-untyped-call]
            self._until(lambda: all(_known(c) == 6 for c in clients), "nodes to meet")
            for p, r in zip(clients[:3], clients[3:], strict=True):
                primary_id = p.execute_command("CLUSTER", "MYID")  # type: ignore[no-untyped-call]
                r.execute_command("CLUSTER", "REPLICATE", primary_id)  # type: ignore[no-untyped-call]
            self._until(lambda: all(_ok(c) for c in clients), "cluster_state ok")
        finally:
            for c in clients:
                c.close()
        for p in self.primaries:
            wait_replicas(p.port, 1)
        for r in self.replicas:
            wait_aof_settled(r.port)
        return self

    @staticmethod
    def _until(check: object, what: str) -> None:
        deadline = time.monotonic() + 30
        while not check():  # type: ignore[operator]
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster: timed out waiting for {what}")
            time.sleep(0.1)

    def stop(self) -> None:
        for n in self.primaries + self.replicas:
            n.stop()


def _known(c: redis.Redis) -> int:
    info = c.execute_command("CLUSTER", "INFO")  # type: ignore[no-untyped-call]
    return int(str(info).split("cluster_known_nodes:")[1].split()[0])


def _ok(c: redis.Redis) -> bool:
    return "cluster_state:ok" in str(c.execute_command("CLUSTER", "INFO"))  # type: ignore[no-untyped-call]


def _role(port: int) -> str:
    with redis.Redis(port=port) as r:
        return str(r.info("replication")["role"])


@pytest.fixture(scope="module")
def replicated_cluster() -> Iterator[ReplicatedCluster]:
    cluster = ReplicatedCluster().start()
    yield cluster
    cluster.stop()


async def test_replicated_cluster_waits_per_node_and_follows_a_failover(
    replicated_cluster: ReplicatedCluster,
) -> None:
    cl = replicated_cluster
    served = await serve(server_config(cl.url, durability="replicated", durability_timeout_ms=1000))
    try:
        ports = [p.port for p in cl.primaries]
        before = [waitaof_calls(p) for p in ports]
        calls = 96
        replies = await asyncio.gather(
            *(create(served.execution, new_eid(p % 256)) for p in range(calls))
        )
        assert all(r.WhichOneof("outcome") == "created" for r in replies)
        rounds = [waitaof_calls(p) - b for p, b in zip(ports, before, strict=True)]
        assert all(r >= 1 for r in rounds), rounds  # every primary waited for its own writes
        assert sum(rounds) < calls, rounds

        # a manual failover of the first shard: its replica becomes the primary
        old, new = cl.primaries[0], cl.replicas[0]
        with redis.Redis(port=new.port) as r:
            r.execute_command("CLUSTER", "FAILOVER")  # type: ignore[no-untyped-call]
        deadline = time.monotonic() + 30
        while _role(new.port) != "master" or _role(old.port) != "slave":
            assert time.monotonic() < deadline, "failover did not happen"
            await asyncio.sleep(0.1)
        await asyncio.to_thread(wait_replicas, new.port, 1)
        await asyncio.to_thread(wait_aof_settled, old.port)
        promoted_before = waitaof_calls(new.port)
        # the partitions of the failed-over shard: a call may answer UNAVAILABLE while the slot
        # map is stale (its write reached a node the waiter did not watch); the retry succeeds
        moved = [p for p in range(256) if key_slot(f"{{fp:{p}}}".encode()) < 16384 // 3][:8]
        for p in moved:
            eid = new_eid(p)
            for _attempt in range(20):
                try:
                    reply = await create(served.execution, eid)
                    break
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == C.UNAVAILABLE, exc
                    await asyncio.sleep(0.2)
            else:
                raise AssertionError(f"create on partition {p} never succeeded after failover")
            assert reply.WhichOneof("outcome") in ("created", "duplicate")
        assert waitaof_calls(new.port) > promoted_before  # the waiter follows the new primary
    finally:
        await close(served)
