"""The embedded Valkey of `flowfabric serve` has one owner: the data-dir lock, the child dying
with the server, orphan stop, supervised restart, the generated password and private files."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from flowfabric.server.app import FlowFabricServer
from flowfabric.server.config import Config
from flowfabric.server.embedded import PID_FILE, ValkeyProcess, _is_our_valkey
from flowfabric.v1 import execution_pb2, execution_pb2_grpc

CLI = [sys.executable, "-c", "from flowfabric.cli import main; main()"]
ENV = {k: v for k, v in os.environ.items() if not k.startswith("FF_")}


def _serve(data_dir: Path, log: Path) -> tuple[subprocess.Popen[str], int]:
    with log.open("a") as stderr:
        proc = subprocess.Popen(
            [*CLI, "serve", "--data-dir", str(data_dir), "--listen-addr", "127.0.0.1:0"],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=ENV,
        )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("flowfabric listening on"), log.read_text()
    return proc, int(line.rsplit(":", 1)[1])


def _stop(proc: subprocess.Popen[str]) -> None:
    """SIGTERM: a clean exit 0, fast (no reconnect-retry wait on the embedded stop)."""
    proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    assert proc.wait(timeout=30) == 0
    assert time.monotonic() - started < 3
    assert proc.stdout is not None
    proc.stdout.close()


def _child_pid(data_dir: Path) -> int:
    return int((data_dir / PID_FILE).read_text())


def _gone(pid: int, data_dir: Path, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _is_our_valkey(pid, data_dir):
            return True
        time.sleep(0.05)
    return False


def _create(port: int) -> str:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = execution_pb2_grpc.ExecutionServiceStub(channel).CreateExecution(
            execution_pb2.CreateExecutionRequest(execution_kind="durable", input_payload=b"x")
        )
    return str(reply.created.execution_id)


def _exists(port: int, execution_id: str) -> bool:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        info = execution_pb2_grpc.ExecutionServiceStub(channel).GetExecution(
            execution_pb2.GetExecutionRequest(execution_id=execution_id)
        )
    return bool(info.execution.execution_kind == "durable")


def test_second_server_on_the_data_dir_fails_fast(tmp_path: Path) -> None:
    data = tmp_path / "d"
    first, _ = _serve(data, tmp_path / "a.log")
    try:
        child = _child_pid(data)
        started = time.monotonic()
        second = subprocess.run(
            [*CLI, "serve", "--data-dir", str(data), "--listen-addr", "127.0.0.1:0"],
            capture_output=True, text=True, timeout=30, env=ENV,
        )  # fmt: skip
        assert second.returncode == 1
        assert f"data dir {data} is in use" in second.stderr
        assert f"pid {first.pid}" in second.stderr
        assert time.monotonic() - started < 10
        assert _child_pid(data) == child, "no second child was started"
        assert first.poll() is None
    finally:
        _stop(first)


def test_kill_9_of_the_server_takes_the_child_with_it(tmp_path: Path) -> None:
    data = tmp_path / "d"
    proc, port = _serve(data, tmp_path / "a.log")
    execution_id = _create(port)
    child = _child_pid(data)
    proc.kill()
    proc.wait()
    assert proc.stdout is not None
    proc.stdout.close()
    assert _gone(child, data), "the child outlived its server"
    again, port = _serve(data, tmp_path / "b.log")
    try:
        assert _exists(port, execution_id)
    finally:
        _stop(again)


def test_an_orphan_on_the_data_dir_is_stopped_first(tmp_path: Path) -> None:
    data = tmp_path / "d"
    # an orphan started by hand, as an older version (no password, no death signal) leaves it
    orphan = ValkeyProcess(data).start()
    assert orphan.proc is not None
    with redis.Redis(port=orphan.port) as r:
        r.set("written-to-the-orphan", "1")
    proc, _ = _serve(data, tmp_path / "a.log")
    try:
        assert orphan.proc.wait(timeout=10) == 0, "stopped gracefully"
        assert _child_pid(data) != orphan.proc.pid
        password = (data / "valkey_password").read_text().strip()
        port = int(_cmdline_port(_child_pid(data)))
        with redis.Redis(port=port, password=password) as r:
            assert r.get("written-to-the-orphan") == b"1", "the orphan's AOF was flushed"
    finally:
        _stop(proc)


def _cmdline_port(pid: int) -> str:
    """Valkey's process title is `valkey-server 127.0.0.1:<port>`."""
    title = Path(f"/proc/{pid}/cmdline").read_bytes().decode()
    return title.split("\0")[0].rsplit(":", 1)[1].split()[0]


def test_password_and_private_files(tmp_path: Path) -> None:
    data = tmp_path / "d"
    proc, _ = _serve(data, tmp_path / "a.log")
    try:
        child = _child_pid(data)
        port = int(_cmdline_port(child))
        secret = (data / "valkey_password").read_text().strip()
        assert secret not in Path(f"/proc/{child}/cmdline").read_text()
        with redis.Redis(port=port) as r, pytest.raises(redis.exceptions.AuthenticationError):
            r.ping()
        with (
            redis.Redis(port=port, password="wrong") as r,
            pytest.raises(redis.exceptions.AuthenticationError),
        ):
            r.ping()
    finally:
        _stop(proc)
    assert data.stat().st_mode & 0o777 == 0o700
    password = data / "valkey_password"
    assert password.stat().st_mode & 0o777 == 0o600
    assert len(password.read_text().strip()) == 64
    aof = list((data / "appendonlydir").iterdir())
    assert aof
    for path in [*aof, data / "valkey.log", data / "appendonlydir", data / "valkey.conf"]:
        assert path.stat().st_mode & 0o077 == 0, path


def test_an_old_data_dir_without_a_password_gets_one(tmp_path: Path) -> None:
    data = tmp_path / "d"
    old = ValkeyProcess(data).start()
    with redis.Redis(port=old.port) as r:
        r.set("old", "1")
    old.stop()
    assert not (data / "valkey_password").exists()
    proc, _ = _serve(data, tmp_path / "a.log")
    try:
        password = (data / "valkey_password").read_text().strip()
        port = int(_cmdline_port(_child_pid(data)))
        with redis.Redis(port=port, password=password) as r:
            assert r.get("old") == b"1"
    finally:
        _stop(proc)


async def test_a_dead_child_is_restarted_with_health(tmp_path: Path) -> None:
    server = FlowFabricServer(
        Config(data_dir=tmp_path / "d", listen_addr="127.0.0.1:0", shutdown_grace_s=1)
    )
    server.health_ping_interval_s = 0.1
    port = await server.start()
    try:
        execution_id = await asyncio.to_thread(_create, port)
        assert server.embedded is not None and server.embedded.proc is not None
        old_pid = server.embedded.proc.pid
        await asyncio.sleep(1.1)  # the AOF is fsynced every second
        os.kill(old_pid, signal.SIGKILL)
        seen = []
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                status = (await stub.Check(health_pb2.HealthCheckRequest())).status
                if not seen or seen[-1] != status:
                    seen.append(status)
                if status == health_pb2.HealthCheckResponse.SERVING and len(seen) > 1:
                    break
                await asyncio.sleep(0.02)
        assert seen[-2:] == [
            health_pb2.HealthCheckResponse.NOT_SERVING,
            health_pb2.HealthCheckResponse.SERVING,
        ], seen
        assert server.embedded.proc.pid != old_pid
        assert await asyncio.to_thread(_exists, port, execution_id)
        await asyncio.to_thread(_create, port)  # the library and the secret are back
    finally:
        await server.stop()
