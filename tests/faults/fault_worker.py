"""A worker process for the fault suite: `python fault_worker.py ADDRESS --worker-id ID ...`.

Its `job` handler appends one line per run to `--runs` (`<unix s> <execution id>
<attempt index> <attempt type> <worker id>`, flushed at once, so a kill -9 loses none), sleeps
for the payload's `sleep_ms` (or `--sleep-ms`) and returns `done`; with `fail_first` in the
payload its first attempt raises, so the execution's retry policy runs. It prints `ready` once
registered. The program is what a user writes: SIGTERM drains it, SIGKILL is the crash.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from pathlib import Path

from flowfabric import TaskContext, Worker


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("address")
    p.add_argument("--worker-id", required=True)
    p.add_argument("--instance-id", default=None)
    p.add_argument("--lane", default="default")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--lease-ttl-ms", type=int, default=2000)
    p.add_argument("--sleep-ms", type=int, default=100)
    p.add_argument("--runs", type=Path, required=True)
    return p.parse_args(argv)


async def main(argv: list[str]) -> None:
    args = _args(argv)
    worker = Worker(
        args.address, lanes=[args.lane], concurrency=args.concurrency,
        lease_ttl_ms=args.lease_ttl_ms, worker_id=args.worker_id,
        worker_instance_id=args.instance_id, claim_wait_ms=500, shutdown_grace_s=5,
        default_timeout=5.0,
    )  # fmt: skip
    runs = args.runs.open("a", buffering=1)

    @worker.handler("job")
    async def job(ctx: TaskContext) -> str:
        runs.write(
            f"{time.time():.3f} {ctx.execution_id} {ctx.attempt_index} {ctx.attempt_type} "
            f"{args.worker_id}\n"
        )
        spec = ctx.json() if ctx.payload else {}
        await asyncio.sleep(spec.get("sleep_ms", args.sleep_ms) / 1000)
        if spec.get("fail_first") and ctx.attempt_type == "initial":
            raise RuntimeError("the first attempt fails on purpose")
        return "done"

    async with worker:
        print("ready", flush=True)
        await worker.run()
    runs.close()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(main(sys.argv[1:]))
