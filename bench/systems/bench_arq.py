"""arq 0.28 (asyncio, Redis): `enqueue_job` per job (sequential), one worker process with
`max_jobs = slots`. arq keeps the job in the queue zset until it finishes (at-least-once),
takes an `in-progress` key with a TTL under WATCH/MULTI, stores the result (keep_result 3600 s).

arq polls its queue zset: each poll reads up to `queue_read_limit` (max(5 x max_jobs, 100))
ids, starts them as slots free up, then sleeps `poll_delay` (default 0.5 s) minus the time the
iteration took. `--poll-delay` sets it (the harness passes 0.01; see bench/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common

PROGRESS: common.Progress | None = None


async def noop(ctx) -> None:
    PROGRESS.started()
    PROGRESS.finished()


async def enqueue_all(url: str, jobs: int) -> None:
    from arq import create_pool
    from arq.connections import RedisSettings

    pool = await create_pool(RedisSettings.from_dsn(url))
    for _ in range(jobs):
        await pool.enqueue_job("noop")
    await pool.aclose()


async def worker_main(args: argparse.Namespace) -> None:
    global PROGRESS
    from arq import create_pool
    from arq.connections import RedisSettings
    from arq.worker import Worker, func

    board = common.Board(args.board, args.slots_total)
    PROGRESS = common.Progress(board, args.index)
    settings = RedisSettings.from_dsn(args.url)
    pool = await create_pool(settings)
    await pool.ping()
    worker = Worker(
        functions=[func(noop, name="noop")], redis_pool=pool, redis_settings=settings,
        max_jobs=args.slots, handle_signals=False, poll_delay=args.poll_delay,
    )  # fmt: skip
    await common.async_ready_then_wait_go(board, args.index)
    await worker.async_run()


def main() -> None:
    p = argparse.ArgumentParser()
    common.common_args(p)
    p.add_argument("--poll-delay", type=float, default=0.01)
    args = p.parse_args()
    if args.worker:
        asyncio.run(worker_main(args))
        return
    me = [sys.executable, os.path.abspath(__file__), "--worker", "--url", args.url,
          "--slots", str(args.slots), "--poll-delay", str(args.poll_delay)]  # fmt: skip
    out = common.run_burn(
        args, lambda: asyncio.run(enqueue_all(args.url, args.jobs)), [me],
        extra=lambda: {"poll_delay_s": args.poll_delay},
    )  # fmt: skip
    common.emit(out)


if __name__ == "__main__":
    main()
