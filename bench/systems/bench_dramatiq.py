"""Dramatiq 2.2 with the Redis broker: `send()` per job (sequential; one EVALSHA), one worker
process with `worker_threads = slots`. Its Lua `fetch` moves up to 32 (prefetch) message ids
into a per-worker ack set; `ack` (Lua) per job; per-worker heartbeats; a dead worker's ack set
is requeued after 60 s by random maintenance. No result (no Results middleware), no fencing.
Default middleware.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common
import dramatiq
from dramatiq.brokers.redis import RedisBroker

PROGRESS: common.Progress | None = None
broker = RedisBroker(url=common.url_from_argv())
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name="bench", max_retries=0)
def noop() -> None:
    PROGRESS.started()
    PROGRESS.finished()


def enqueue_all(jobs: int) -> None:
    for _ in range(jobs):
        noop.send()


def worker_main(args: argparse.Namespace) -> None:
    global PROGRESS
    import time

    from dramatiq import Worker

    board = common.Board(args.board, args.slots_total)
    PROGRESS = common.Progress(board, args.index)
    broker.client.ping()
    w = Worker(broker, worker_threads=args.slots)
    common.worker_ready_then_wait_go(board, args.index)
    w.start()
    while True:
        time.sleep(3600)


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
