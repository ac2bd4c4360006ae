"""The server under fuzz, as a child process: `python -m tests.fuzz.server_proc <valkey-url>`.

A process of its own so its memory is measured apart from the fuzzer's (hypothesis keeps its own
growing state), with no background scanners, so nothing but the fuzzed requests writes to the
keyspace. It prints `{"port": N}` once serving, then answers one command per stdin line:
`idle` waits (up to IDLE_WAIT_S) until no RPC handler is running, so a call the fuzzer gave up
on has really ended before the next snapshot; `mem` waits likewise, then prints the Python heap
in use after a full collection (tracemalloc, started at boot) and the resident set size;
`mark` remembers the heap's allocation sites and `grown` prints the sites that grew most since
(to find what a growing heap holds); end of input stops the server.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import sys
import tracemalloc
from pathlib import Path

from flowfabric.server.app import FlowFabricServer
from flowfabric.server.config import Config

API_TOKEN = "fuzz-token"
HMAC_SECRET = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"
FLOW_PARTITIONS = 16


def config(valkey_url: str) -> Config:
    return Config(
        valkey_url=valkey_url,
        listen_addr="127.0.0.1:0",
        api_token=API_TOKEN,
        waitpoint_hmac_secret=HMAC_SECRET,
        flow_partitions=FLOW_PARTITIONS,
        shutdown_grace_s=1.0,
        boot_retry_s=5.0,
    )


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


# grpc.aio runs each RPC handler in a task whose coroutine has one of these names
HANDLER_COROUTINES = {"_handle_exceptions", "_schedule_rpc_coro"}
IDLE_WAIT_S = 35.0  # past the longest long poll (30 s)


def in_flight() -> int:
    return sum(t.get_coro().__qualname__ in HANDLER_COROUTINES for t in asyncio.all_tasks())


async def idle() -> dict[str, int]:
    """Wait until no handler runs; how long that took and how many still run (0 unless one
    outlived its caller by IDLE_WAIT_S)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    # polled: grpc.aio signals nothing when a handler task ends
    while in_flight() and loop.time() - started < IDLE_WAIT_S:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    return {"in_flight": in_flight(), "waited_ms": int((loop.time() - started) * 1000)}


async def memory() -> dict[str, int]:
    quiet = await idle()
    gc.collect()
    current, peak = tracemalloc.get_traced_memory()
    return {"heap": current, "heap_peak": peak, "rss": rss_bytes(), **quiet}


def grown(mark: tracemalloc.Snapshot | None) -> list[str]:
    gc.collect()
    now = tracemalloc.take_snapshot()
    if mark is None:
        return []
    return [str(stat) for stat in now.compare_to(mark, "lineno")[:15]]


async def main(valkey_url: str) -> None:
    tracemalloc.start(int(os.environ.get("FF_FUZZ_TRACE_FRAMES", "1")))
    server = FlowFabricServer(config(valkey_url), run_scanners=False)
    port = await server.start()
    print(json.dumps({"port": port}), flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    mark: tracemalloc.Snapshot | None = None
    try:
        while line := await reader.readline():
            command = line.strip()
            if command == b"mem":
                print(json.dumps(await memory()), flush=True)
            elif command == b"idle":
                print(json.dumps(await idle()), flush=True)
            elif command == b"mark":
                gc.collect()
                mark = tracemalloc.take_snapshot()
                print(json.dumps({"marked": True}), flush=True)
            elif command == b"grown":
                print(json.dumps({"grown": grown(mark)}), flush=True)
    finally:
        await server.stop()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(main(sys.argv[1]))
