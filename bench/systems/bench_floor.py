"""The raw Valkey floor: a minimal job queue from Python (redis-py asyncio, hiredis).

Enqueue: one LPUSH per job (sequential, one producer). Worker: one process, `slots` coroutines,
each BRPOP → HSET state running → HSET state done. No ack (BRPOP removes the job: a crash
loses it), no lease, no result, no fencing. 1 + 3 commands per job.

Latency mode: the worker runs first; the producer LPUSHes "<id>" at a fixed offered rate and
each coroutine records when it popped the job and when the second write returned.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common

QUEUE = "floor:queue"


def job_key(jid: str) -> str:
    return f"floor:job:{jid}"


async def worker_main(args: argparse.Namespace) -> None:
    import redis.asyncio as aioredis

    board = common.Board(args.board, args.slots_total)
    progress = common.Progress(board, args.index)
    slots = args.slots
    r = aioredis.Redis.from_url(args.url, max_connections=slots + 2)
    # open every connection before go
    await asyncio.gather(*(r.ping() for _ in range(slots)))
    records: dict[str, list[float]] = {}
    keep = args.records is not None
    await common.async_ready_then_wait_go(
        board, args.index, lambda: common.dump_records(args.records, records)
    )

    async def one() -> None:
        while True:
            got = await r.brpop([QUEUE], timeout=1)
            if got is None:
                continue
            t0 = progress.started()
            jid = got[1].decode()
            await r.hset(job_key(jid), "state", "running")
            await r.hset(job_key(jid), "state", "done")
            t1 = progress.finished()
            if keep:
                records[jid] = [t0, t1]

    await asyncio.gather(*(one() for _ in range(slots)))


async def producer_burn(url: str, jobs: int) -> None:
    import redis.asyncio as aioredis

    r = aioredis.Redis.from_url(url)
    for i in range(jobs):
        await r.lpush(QUEUE, str(i))
    await r.aclose()


async def producer_open_loop(url: str, rate: float, duration: float) -> tuple[dict, float]:
    import redis.asyncio as aioredis

    r = aioredis.Redis.from_url(url, max_connections=256)
    await r.ping()

    async def send(i: int) -> int:
        await r.lpush(QUEUE, str(i))
        return i

    try:
        return await common.open_loop_async(rate, duration, send)
    finally:
        await r.aclose()


def main() -> None:
    p = argparse.ArgumentParser()
    common.common_args(p)
    args = p.parse_args()
    if args.worker:
        asyncio.run(worker_main(args))
        return
    me = [sys.executable, os.path.abspath(__file__), "--worker", "--url", args.url,
          "--slots", str(args.slots)]  # fmt: skip
    if args.mode == "latency":
        out = common.run_latency(
            args, lambda: asyncio.run(producer_open_loop(args.url, args.rate, args.duration)), [me]
        )
    else:
        out = common.run_burn(args, lambda: asyncio.run(producer_burn(args.url, args.jobs)), [me])
    common.emit(out)


if __name__ == "__main__":
    main()
