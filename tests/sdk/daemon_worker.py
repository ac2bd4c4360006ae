"""A worker process for the signal tests: `python daemon_worker.py ADDRESS TOKEN LANE TTL_MS`.

Its `daemon` handler prints `started <execution id>` and then sleeps for the seconds in the
payload's `sleep` (returning `done`). The program is what a user writes: `asyncio.run(main())`
awaiting `worker.run()`, with no signal handling of its own. INFO logs go to stderr.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from flowfabric import TaskContext, Worker


async def main(address: str, token: str, lane: str, ttl_ms: str) -> None:
    worker = Worker(
        address, token=token, lanes=[lane], concurrency=2, lease_ttl_ms=int(ttl_ms),
        claim_wait_ms=200, worker_id="daemon", shutdown_grace_s=10,
    )  # fmt: skip

    @worker.handler("daemon")
    async def daemon(ctx: TaskContext) -> str:
        print("started", ctx.execution_id, flush=True)
        await asyncio.sleep(ctx.json()["sleep"])
        return "done"

    async with worker:
        await worker.run()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    asyncio.run(main(*sys.argv[1:]))
