"""Celery 5.7 with kombu's Redis transport: `delay()` per job (sequential, 1 LPUSH), one worker
process, thread pool with `concurrency = slots`, `task_acks_late` (the message is parked in the
`unacked` hash + `unacked_index` zset until the task returns; visibility timeout 3600 s),
`task_ignore_result` (no result stored), default prefetch multiplier (4). Mingle, gossip and
heartbeat are off (they only cost start-up time here).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common
from celery import Celery

PROGRESS: common.Progress | None = None
URL = common.url_from_argv()

app = Celery("bench", broker=URL)
app.conf.update(
    task_acks_late=True,
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    task_default_queue="bench",
)


@app.task(name="noop")
def noop() -> None:
    PROGRESS.started()
    PROGRESS.finished()


def enqueue_all(jobs: int) -> None:
    for _ in range(jobs):
        noop.delay()


def worker_main(args: argparse.Namespace) -> None:
    global PROGRESS
    board = common.Board(args.board, args.slots_total)
    PROGRESS = common.Progress(board, args.index)
    w = app.Worker(
        pool="threads", concurrency=args.slots, without_mingle=True, without_gossip=True,
        without_heartbeat=True, loglevel="WARNING", quiet=True, queues=["bench"],
    )  # fmt: skip
    with app.connection_for_write() as conn:
        conn.ensure_connection()
    common.worker_ready_then_wait_go(board, args.index)
    w.start()


def main() -> None:
    p = argparse.ArgumentParser()
    common.common_args(p)
    args = p.parse_args()
    if args.worker:
        worker_main(args)
        return
    me = [sys.executable, os.path.abspath(__file__), "--worker", "--url", args.url,
          "--slots", str(args.slots)]  # fmt: skip
    out = common.run_burn(args, lambda: enqueue_all(args.jobs), [me])
    common.emit(out)


if __name__ == "__main__":
    main()
