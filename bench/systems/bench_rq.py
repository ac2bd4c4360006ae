"""RQ 3.0: `Queue.enqueue` per job (sequential), `--procs` SimpleWorker processes (one job at a
time each, no fork per job), burst mode. A job moves to an intermediate list (BLMOVE) and the
StartedJobRegistry (with expiry); job timeout 180 s + worker heartbeats; an abandoned job is
retried if it has retries left (none by default), else it goes to the failed registry; the
result is kept 500 s (a per-job result stream + the job hash + the finished registry). No
fencing. `slots` = processes (one slot each).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common

PROGRESS: common.Progress | None = None
QUEUE = "bench"


def noop() -> None:
    PROGRESS.started()
    PROGRESS.finished()


def enqueue_all(url: str, jobs: int) -> None:
    from redis import Redis
    from rq import Queue

    q = Queue(QUEUE, connection=Redis.from_url(url))
    for _ in range(jobs):
        q.enqueue("bench_rq.noop")  # rq refuses functions of __main__


def worker_main(args: argparse.Namespace) -> None:
    global PROGRESS
    import time

    from redis import Redis
    from rq import Queue, SimpleWorker

    board = common.Board(args.board, args.slots_total)
    PROGRESS = common.Progress(board, args.index)
    import bench_rq  # what the job names; this file runs as __main__

    bench_rq.PROGRESS = PROGRESS
    conn = Redis.from_url(args.url)
    conn.ping()
    w = SimpleWorker([Queue(QUEUE, connection=conn)], connection=conn)
    common.worker_ready_then_wait_go(board, args.index)
    w.work(burst=True, with_scheduler=False, logging_level="WARNING")
    while True:  # idle until the driver says stop
        time.sleep(3600)


def main() -> None:
    p = argparse.ArgumentParser()
    common.common_args(p)
    p.add_argument("--procs", type=int, default=16)
    args = p.parse_args()
    if args.worker:
        worker_main(args)
        return
    me = [sys.executable, os.path.abspath(__file__), "--worker", "--url", args.url,
          "--slots", "1"]  # fmt: skip
    out = common.run_burn(
        args,
        lambda: enqueue_all(args.url, args.jobs),
        [list(me) for _ in range(args.procs)],
    )
    out["slots"] = args.procs
    common.emit(out)


if __name__ == "__main__":
    main()
