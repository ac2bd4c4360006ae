"""saq 0.26 (asyncio, Redis): `Queue.enqueue` per job (one EVALSHA), one worker process with
`concurrency = slots`. Dequeue is BLMOVE queued → active list, LREM on finish; the job (with its
result) is kept 600 s (SETEX); every status change PUBLISHes; stuck jobs are swept from the
active list every 60 s; default job timeout 10 s. No fencing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common

PROGRESS: common.Progress | None = None
QUEUE = "bench"


async def noop(ctx) -> None:
    PROGRESS.started()
    PROGRESS.finished()


async def enqueue_all(url: str, jobs: int) -> None:
    from saq import Queue

    queue = Queue.from_url(url, name=QUEUE)
    await queue.connect()
    for _ in range(jobs):
        await queue.enqueue("noop")
    await queue.disconnect()


async def worker_main(args: argparse.Namespace) -> None:
    global PROGRESS
    from saq import Queue, Worker

    board = common.Board(args.board, args.slots_total)
    PROGRESS = common.Progress(board, args.index)
    queue = Queue.from_url(args.url, name=QUEUE)
    await queue.connect()
    worker = Worker(queue, functions=[noop], concurrency=args.slots)
    await common.async_ready_then_wait_go(board, args.index)
    await worker.start()


def main() -> None:
    p = argparse.ArgumentParser()
    common.common_args(p)
    args = p.parse_args()
    if args.worker:
        asyncio.run(worker_main(args))
        return
    me = [sys.executable, os.path.abspath(__file__), "--worker", "--url", args.url,
          "--slots", str(args.slots)]  # fmt: skip
    out = common.run_burn(args, lambda: asyncio.run(enqueue_all(args.url, args.jobs)), [me])
    common.emit(out)


if __name__ == "__main__":
    main()
