"""The FCALL floor: FlowFabric's own Valkey Functions driven straight from Python, no gRPC.

Uses the server's wrappers (`flowfabric.server.valkey.functions.Functions` over `Store`):
the same KEYS/ARGV encoding, reply decoding and FCALL path the server uses, minus gRPC, the
scheduler's partition probe (ZRANGE pipeline) and the servicers.

Enqueue: `ff_create_execution` per job, `--enqueue-concurrency` (64) in flight; the ids go to
a file. Worker: one process, `slots` coroutines; each takes the next id from the list and runs
`ff_issue_claim_grant` + `ff_claim_execution` (lease 30 s, fresh lease and attempt ids), then
`ff_complete_execution` with the fence. So: 1 + 3 FCALLs per execution, with everything the
engine does inside them (lease, fencing, attempt record, result, indexes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import uuid
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common

LANE = "default"
PARTITIONS = 256


async def functions(url: str, pool: int):
    import redis.asyncio as aioredis

    from flowfabric.server.valkey.functions import Functions
    from flowfabric.server.valkey.store import Store

    store = Store.from_url(url.replace("redis://", "valkey://"))
    # a pool as large as the concurrency (Store.from_url uses the redis-py default)
    store.client = aioredis.Redis.from_url(
        url, max_connections=pool + 4, socket_timeout=10, health_check_interval=0
    )
    await store.ensure_library()
    return store, Functions(store)


def new_execution(partition: int):
    from flowfabric.server.valkey.functions import NewExecution
    from flowfabric.server.valkey.ids import mint_execution_id

    return NewExecution(
        execution_id=mint_execution_id(partition), namespace="default", lane_id=LANE,
        execution_kind="noop", input_payload=b"", priority=0, creator_identity="",
    )  # fmt: skip


async def create_all(url: str, jobs: int, concurrency: int, ids_path: str) -> None:
    from flowfabric.server.valkey.functions.execution import Created
    from flowfabric.server.valkey.ids import solo_partition

    store, fn = await functions(url, concurrency)
    part = solo_partition(LANE, PARTITIONS)
    ids: list[str] = []
    it = iter(range(jobs))

    async def one() -> None:
        for _ in it:
            x = new_execution(part)
            reply = await fn.execution.create_execution(x)
            assert isinstance(reply, Created), reply  # not a DUPLICATE
            ids.append(str(x.execution_id))

    await asyncio.gather(*(one() for _ in range(concurrency)))
    await store.close()
    Path(ids_path).write_text(json.dumps(ids))  # noqa: ASYNC240 (a few ms)


async def worker_main(args: argparse.Namespace) -> None:
    from flowfabric.server.valkey.functions import Claimer, Fence
    from flowfabric.server.valkey.ids import parse_execution_id

    board = common.Board(args.board, args.slots_total)
    progress = common.Progress(board, args.index)
    store, fn = await functions(args.url, args.slots)
    await asyncio.gather(*(store.client.ping() for _ in range(args.slots)))
    who = Claimer("bench-fcall", f"bench-fcall-{os.getpid()}", LANE)
    records: dict[str, list[float]] = {}
    keep = args.records is not None
    queue: asyncio.Queue[str] = asyncio.Queue()
    if args.ids:
        for eid in json.loads(Path(args.ids).read_text()):  # noqa: ASYNC240 (set-up)
            queue.put_nowait(eid)
    await common.async_ready_then_wait_go(
        board, args.index, lambda: common.dump_records(args.records, records)
    )
    feed = None
    if args.feed:  # latency mode: ids arrive on a Valkey list as they are created
        feed = args.feed

    async def one() -> None:
        while True:
            if feed is not None:
                got = await store.client.brpop([feed], timeout=1)
                if got is None:
                    continue
                raw = got[1].decode()
            else:
                try:
                    raw = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
            t0 = progress.started()
            eid = parse_execution_id(raw, PARTITIONS)
            await fn.scheduling.issue_claim_grant(eid, who, 10_000)
            c = await fn.scheduling.claim_execution(
                eid, who, str(uuid.uuid4()), 30_000, str(uuid.uuid4())
            )
            fence = Fence(c.lease_id, c.lease_epoch, c.attempt_id)
            await fn.execution.complete_execution(eid, fence, b"", "", "lease_holder")
            t1 = progress.finished()
            if keep:
                records[raw] = [t0, t1]

    await asyncio.gather(*(one() for _ in range(args.slots)))
    await asyncio.Event().wait()  # idle until the driver says stop


async def open_loop(url: str, rate: float, duration: float, feed: str) -> tuple[dict, float]:
    """Create at the offered rate and hand each id to the workers through a list (LPUSH):
    one extra command per job that the FCALL path itself would not need."""
    from flowfabric.server.valkey.ids import solo_partition

    store, fn = await functions(url, 256)
    part = solo_partition(LANE, PARTITIONS)

    async def send(i: int) -> str:
        x = new_execution(part)
        await fn.execution.create_execution(x)
        await store.client.lpush(feed, str(x.execution_id))
        return str(x.execution_id)

    try:
        return await common.open_loop_async(rate, duration, send)
    finally:
        await store.close()


def main() -> None:
    p = argparse.ArgumentParser()
    common.common_args(p)
    p.add_argument("--enqueue-concurrency", type=int, default=64)
    p.add_argument("--ids")
    p.add_argument("--feed")
    args = p.parse_args()
    if args.worker:
        asyncio.run(worker_main(args))
        return
    me = [sys.executable, os.path.abspath(__file__), "--worker", "--url", args.url,
          "--slots", str(args.slots)]  # fmt: skip
    if args.mode == "latency":
        feed = "bench:fcall:feed"
        out = common.run_latency(
            args,
            lambda: asyncio.run(open_loop(args.url, args.rate, args.duration, feed)),
            [[*me, "--feed", feed]],
        )
    else:
        ids_path = os.path.join(args.log_dir, "fcall-ids.json")
        os.makedirs(args.log_dir, exist_ok=True)
        out = common.run_burn(
            args,
            lambda: asyncio.run(
                create_all(args.url, args.jobs, args.enqueue_concurrency, ids_path)
            ),
            [[*me, "--ids", ids_path]],
            extra=lambda: {"enqueue_concurrency": args.enqueue_concurrency},
        )
    common.emit(out)


if __name__ == "__main__":
    main()
