"""`flowfabric serve` as a real process: boots on the embedded Valkey, stops cleanly on SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from flowfabric.server.config import Config, ConfigError

CLI = [sys.executable, "-c", "from flowfabric.cli import main; main()"]


def test_serve_boots_embedded_and_stops_on_sigterm(tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    with (
        log.open("w") as stderr,
        subprocess.Popen(
            [*CLI, "serve", "--data-dir", str(tmp_path / "d"), "--listen-addr", "127.0.0.1:0"],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        ) as proc,
    ):
        _serve_and_stop(proc, log)
    # the embedded Valkey was stopped with its data on disk
    assert (tmp_path / "d" / "appendonlydir").is_dir()


def _serve_and_stop(proc: subprocess.Popen[str], log: Path) -> None:
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("flowfabric listening on 127.0.0.1:"), log.read_text()
        port = int(line.rsplit(":", 1)[1])
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bad_configuration_exits_1_naming_the_variable(tmp_path: Path) -> None:
    done = subprocess.run(
        [*CLI, "serve", "--flow-partitions", "zero"], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 1
    assert "FF_FLOW_PARTITIONS" in done.stderr


def test_config_from_env_and_flags() -> None:
    env = {"FF_LISTEN_ADDR": "127.0.0.1:1", "FF_LANES": "a,b", "FF_API_TOKEN": ""}
    cfg = Config.load(["--listen-addr", "127.0.0.1:2"], env=env)
    assert cfg.listen_addr == "127.0.0.1:2"  # a flag wins over the environment
    assert cfg.lanes == ("a", "b")
    assert cfg.api_token is None  # empty string = unset
    assert cfg.embedded
    assert cfg.interval_ms("FF_LEASE_EXPIRY_INTERVAL_MS") == 1500
    assert (
        Config.load([], env={"FF_UNBLOCK_INTERVAL_S": "7"}).interval_ms("FF_UNBLOCK_INTERVAL_S")
        == 7000
    )
    for bad in (
        {"FF_LANES": "a,a"},
        {"FF_TLS_CERT": "x"},
        {"FF_WAITPOINT_HMAC_SECRET": "abc"},
        {"FF_LEASE_EXPIRY_INTERVAL_MS": "10"},
    ):
        try:
            Config.load([], env=bad)
        except ConfigError as exc:
            assert next(iter(bad)) in str(exc) or "FF_TLS" in str(exc)
        else:
            raise AssertionError(f"{bad} was accepted")
