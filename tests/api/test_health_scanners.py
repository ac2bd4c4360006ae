"""Health follows the critical scanners: NOT_SERVING while lease expiry makes no progress for
several intervals, SERVING again once it moves (docs/architecture.md#health)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from flowfabric.server.app import FlowFabricServer
from flowfabric.server.config import Config
from flowfabric.server.embedded import ValkeyProcess
from flowfabric.server.valkey.keys import PartitionKeys
from tests.conftest import API_TOKEN, HMAC_SECRET

STUCK = "{fp:0}:stuck-member"


async def _until(health: Any, want: int) -> None:
    deadline = time.monotonic() + 20  # a safety net, not an assertion on timing
    while True:
        got = (await health.Check(health_pb2.HealthCheckRequest(service=""))).status
        if got == want:
            return
        assert time.monotonic() < deadline, f"health is {got}, want {want}"
        await asyncio.sleep(0.05)


async def test_a_stuck_lease_expiry_scanner_turns_health_not_serving_until_it_moves(
    valkey_standalone: ValkeyProcess,
) -> None:
    config = Config(
        valkey_url=valkey_standalone.url, listen_addr="127.0.0.1:0", api_token=API_TOKEN,
        waitpoint_hmac_secret=HMAC_SECRET, shutdown_grace_s=1.0,
        scanner_intervals_ms={"FF_LEASE_EXPIRY_INTERVAL_MS": 200},
    )  # fmt: skip
    server = FlowFabricServer(config)
    server.health_ping_interval_s = 0.1
    await server.start()
    assert server.scanners is not None
    scanner = next(s for s in server.scanners.scanners if s.name == "lease_expiry")
    real_action, release, entered = scanner.action, asyncio.Event(), asyncio.Event()

    async def hang(member: str, now: int, lane: str | None) -> None:
        if member != STUCK:
            await real_action(member, now, lane)
            return
        entered.set()
        await release.wait()  # as an FCALL that never answers would

    scanner.action = hang
    index = PartitionKeys.of(0).lease_expiry
    with redis.Redis(port=valkey_standalone.port) as r:
        r.zadd(index, {STUCK: 1})
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    health = health_pb2_grpc.HealthStub(channel)
    serving, not_serving = (
        health_pb2.HealthCheckResponse.SERVING,
        health_pb2.HealthCheckResponse.NOT_SERVING,
    )
    try:
        await asyncio.wait_for(entered.wait(), 20)
        await _until(health, not_serving)
        assert server.scanners.stalled() == ["lease_expiry"]
        with redis.Redis(port=valkey_standalone.port) as r:
            r.zrem(index, STUCK)
        release.set()
        await _until(health, serving)
        assert server.scanners.stalled() == []
    finally:
        release.set()
        await channel.close()
        await server.stop()
