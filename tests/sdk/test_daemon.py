"""A worker as a daemon: SIGTERM/SIGINT drain it, a second signal exits fast and hands the
unfinished execution back at once, Ctrl-C prints no traceback; progress and frames ride out a
server restart."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from flowfabric import Client, ExecutionState, TaskContext, Worker
from flowfabric.server.app import FlowFabricServer
from flowfabric.server.config import Config
from flowfabric.server.valkey.store import Store
from tests.conftest import API_TOKEN, HMAC_SECRET, Api
from tests.sdk.conftest import running

LANE = "sdk-daemon"
SCRIPT = Path(__file__).with_name("daemon_worker.py")


class WorkerProcess:
    """`daemon_worker.py` in a subprocess; stderr goes to a file for the assertions."""

    def __init__(self, proc: asyncio.subprocess.Process, stderr: Path) -> None:
        self.proc = proc
        self.stderr_path = stderr

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    async def started(self) -> str:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 30)
        words = line.decode().split()
        assert words[:1] == ["started"], self.stderr
        return words[1]

    async def exit_code(self, within: float) -> int:
        return await asyncio.wait_for(self.proc.wait(), within)


async def spawn(address: str, tmp_path: Path, ttl_ms: int = 30_000) -> WorkerProcess:
    stderr = tmp_path / "worker.err"
    with stderr.open("w") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(SCRIPT), address, API_TOKEN, LANE, str(ttl_ms),
            stdout=asyncio.subprocess.PIPE, stderr=err,
        )  # fmt: skip
    return WorkerProcess(proc, stderr)


@pytest.fixture
async def reaped() -> AsyncIterator[list[WorkerProcess]]:
    """Worker processes a test started; killed at the end if still running."""
    procs: list[WorkerProcess] = []
    yield procs
    for p in procs:
        if p.proc.returncode is None:
            p.proc.kill()
            await p.proc.wait()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_first_signal_lets_the_handler_finish_and_exits_0(
    api: Api, client: Client, tmp_path: Path, reaped: list[WorkerProcess], sig: signal.Signals
) -> None:
    eid = (await client.submit("daemon", {"sleep": 1.0}, lane=LANE)).execution_id
    worker = await spawn(api.address, tmp_path)
    reaped.append(worker)
    assert await worker.started() == eid
    worker.proc.send_signal(sig)
    assert await worker.exit_code(within=10) == 0, worker.stderr
    assert await client.state(eid) is ExecutionState.COMPLETED
    assert await client.result(eid) == b"done"
    err = worker.stderr
    assert err.count(f"{sig.name}: stopping") == 1, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err


async def test_second_signal_exits_fast_and_releases_the_lease(
    engine_api: Api, tmp_path: Path, reaped: list[WorkerProcess]
) -> None:
    async with Client(engine_api.address, token=API_TOKEN) as client:
        eid = (await client.submit("daemon", {"sleep": 600}, lane=LANE)).execution_id
        worker = await spawn(engine_api.address, tmp_path, ttl_ms=60_000)
        reaped.append(worker)
        assert await worker.started() == eid
        worker.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)  # draining: the handler would sleep on for minutes
        assert worker.proc.returncode is None
        sent = time.monotonic()
        worker.proc.send_signal(signal.SIGTERM)
        assert await worker.exit_code(within=5) == 0, worker.stderr
        assert time.monotonic() - sent < 3.0, worker.stderr
        assert "Traceback" not in worker.stderr, worker.stderr

        # handed back, not left to the 60 s lease: another worker takes it at once
        survivor = Worker(client, lanes=[LANE], concurrency=1, claim_wait_ms=200)
        resumed: list[bool] = []

        @survivor.handler("daemon")
        async def finish(ctx: TaskContext) -> str:
            resumed.append(ctx.resumed)
            return "finished by the survivor"

        async with running(survivor):
            assert await client.wait(eid, timeout=10) is ExecutionState.COMPLETED
        assert resumed == [True]
        assert await client.result(eid) == b"finished by the survivor"


async def _server(valkey_url: str, port: int = 0) -> FlowFabricServer:
    config = Config(
        valkey_url=valkey_url,
        listen_addr=f"127.0.0.1:{port}",
        api_token=API_TOKEN,
        waitpoint_hmac_secret=HMAC_SECRET,
        shutdown_grace_s=0.5,
        boot_retry_s=5.0,
    )
    server = FlowFabricServer(config, run_scanners=False)
    await server.start()
    return server


async def test_progress_and_frames_ride_out_a_server_restart(valkey_url: str, store: Store) -> None:
    server = await _server(valkey_url)
    port = server.port
    assert port is not None
    frames = 60
    halfway = asyncio.Event()
    try:
        async with Client(f"127.0.0.1:{port}", token=API_TOKEN) as client:
            eid = (await client.submit("chatty", b"{}", lane=LANE)).execution_id
            worker = Worker(client, lanes=[LANE], concurrency=1, claim_wait_ms=200)

            @worker.handler("chatty")
            async def chatty(ctx: TaskContext) -> str:
                for i in range(frames):
                    await ctx.emit("token", f"t{i}")
                    await ctx.progress(100 * i // frames, f"frame {i}")
                    if i == 10:
                        halfway.set()
                    await asyncio.sleep(0.05)
                return "spoke through it"

            async with running(worker):
                await asyncio.wait_for(halfway.wait(), 20)
                await server.stop()
                await asyncio.sleep(1.0)
                server = await _server(valkey_url, port)
                assert await client.wait(eid, timeout=30) is ExecutionState.COMPLETED
            assert await client.result(eid) == b"spoke through it"
            page = await client.read_stream(eid, limit=1000)
            assert [f.payload.decode() for f in page.frames] == [f"t{i}" for i in range(frames)]
            assert worker.stats.completed == 1 and worker.stats.lease_lost == 0
    finally:
        await server.stop()


class LoseFirstAppendReply(grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[misc]
    """Lets the first AppendFrames call append its frames, then reports UNAVAILABLE to the
    caller as if the reply had been lost."""

    def __init__(self) -> None:
        self.appends = 0

    async def intercept_stream_unary(
        self, continuation: Any, details: Any, request_iterator: Any
    ) -> Any:
        call = await continuation(details, request_iterator)
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        if method.endswith("/AppendFrames"):
            self.appends += 1
            if self.appends == 1:
                await call
                raise grpc.aio.AioRpcError(
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.aio.Metadata(),
                    grpc.aio.Metadata(),
                    details="injected: reply lost",
                )
        return call


async def test_frames_retried_after_a_lost_reply_land_once(api: Api, client: Client) -> None:
    eid = (await client.submit("frames", b"{}", lane=LANE)).execution_id
    lossy = LoseFirstAppendReply()
    async with Client(api.address, token=API_TOKEN, interceptors=[lossy]) as worker_client:
        worker = Worker(worker_client, lanes=[LANE], concurrency=1, claim_wait_ms=100)
        appended: list[int] = []

        @worker.handler("frames")
        async def frames(ctx: TaskContext) -> None:
            for batch in range(2):
                for i in range(5):
                    await ctx.emit("token", f"b{batch}-{i}")
                await ctx.flush()
            appended.append(ctx.frames_appended)

        async with running(worker):
            assert await client.wait(eid, timeout=10) is ExecutionState.COMPLETED
    page = await client.read_stream(eid, limit=100)
    want = [f"b{b}-{i}" for b in range(2) for i in range(5)]
    assert [f.payload.decode() for f in page.frames] == want
    assert appended == [10] and lossy.appends == 2


class DropMoreFrames(grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[misc]
    """Clears AppendFramesRequest.frames on the way out: what a server that predates the field
    sees (it parses past an unknown field and appends `frame` only)."""

    def __init__(self) -> None:
        self.dropped = 0

    async def intercept_stream_unary(
        self, continuation: Any, details: Any, request_iterator: Any
    ) -> Any:
        async def stripped() -> AsyncIterator[Any]:
            async for message in request_iterator:
                if message.frames:
                    self.dropped += len(message.frames)
                    del message.frames[:]
                yield message

        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        if method.endswith("/AppendFrames"):
            return await continuation(details, stripped())
        return await continuation(details, request_iterator)


async def test_frames_fall_back_to_one_per_message_on_a_server_without_frames(
    api: Api, client: Client
) -> None:
    eid = (await client.submit("frames", b"{}", lane=LANE)).execution_id
    old = DropMoreFrames()
    async with Client(api.address, token=API_TOKEN, interceptors=[old]) as worker_client:
        worker = Worker(worker_client, lanes=[LANE], concurrency=1, claim_wait_ms=100)
        appended: list[int] = []

        @worker.handler("frames")
        async def frames(ctx: TaskContext) -> None:
            for batch in range(2):
                for i in range(4):
                    await ctx.emit("token", f"b{batch}-{i}")
                await ctx.flush()
            appended.append(ctx.frames_appended)

        async with running(worker):
            assert await client.wait(eid, timeout=10) is ExecutionState.COMPLETED
    page = await client.read_stream(eid, limit=100)
    assert [f.payload.decode() for f in page.frames] == [
        f"b{b}-{i}" for b in range(2) for i in range(4)
    ]
    # the first batch went packed (3 frames lost on the way), the rest one per message
    assert appended == [8] and old.dropped == 3


async def test_workers_in_one_process_share_the_signal_and_restore_it(client: Client) -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    first = Worker(client, lanes=[LANE], claim_wait_ms=100)
    second = Worker(client, lanes=[LANE], claim_wait_ms=100)
    async with first, second:
        runs = [asyncio.create_task(first.run()), asyncio.create_task(second.run())]
        await asyncio.sleep(0.2)
        assert signal.getsignal(signal.SIGTERM) is not before[signal.SIGTERM]
        signal.raise_signal(signal.SIGTERM)  # the workers' handler, not the default (exit)
        await asyncio.wait_for(asyncio.gather(*runs), 10)  # both drained and returned
    assert {s: signal.getsignal(s) for s in before} == before
