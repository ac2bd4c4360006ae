"""What each transition costs inside Valkey: commands and CPU per Function call.

    .venv/bin/python bench/transitions.py [--jobs 2000]

Drives the server's own Function wrappers (no gRPC, no server) against a fresh valkey-server
through the S1 path: create, claim grant, claim, renew, append one frame, complete. Around
each phase it resets and reads `INFO commandstats`, so the commands a Function runs inside
Valkey are counted by name (calls from Lua are counted like any others). Prints, per
transition: the commands per call (reads and writes apart), the top commands, and Valkey
microseconds per call (the FCALL's own `usec`, which includes what it ran). Use it before and
after a change to a Function; the figures are counts, so they do not depend on machine load,
except the microseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "systems"))
from bench_fcall import LANE, PARTITIONS, functions, new_execution

from flowfabric.server.embedded import ValkeyProcess

# commands that only read; everything else a Function runs counts as a write
READS = {
    "hget", "hmget", "hgetall", "hexists", "get", "exists", "zscore", "zrange", "zrangebyscore",
    "zcard", "scard", "smembers", "sismember", "type", "time", "xlen", "xinfo", "ttl", "pttl",
    "llen", "lrange", "strlen", "hlen", "zrank", "zcount", "mget",
}  # fmt: skip


async def stats(client) -> dict[str, tuple[int, int]]:  # type: ignore[no-untyped-def]
    raw = await client.info("commandstats")
    return {k.removeprefix("cmdstat_"): (v["calls"], v["usec"]) for k, v in raw.items()}


async def main(jobs: int) -> None:
    from flowfabric.server.valkey.functions import Claimer, Fence
    from flowfabric.server.valkey.functions.stream import Frame
    from flowfabric.server.valkey.ids import solo_partition

    valkey = ValkeyProcess(persistent=False).start()
    store, fn = await functions(valkey.url.replace("valkey://", "redis://"), 8)
    r = store.client
    who = Claimer("bench", "bench-1", LANE)
    part = solo_partition(LANE, PARTITIONS)
    xs = [new_execution(part) for _ in range(jobs)]
    claims: list = []  # type: ignore[type-arg]
    rows = []

    async def phase(name: str, calls) -> None:  # type: ignore[no-untyped-def]
        await r.config_resetstat()
        for c in calls:
            await c()
        after = await stats(r)
        inner = Counter({k: v[0] for k, v in after.items()
                         if k not in ("fcall", "config|resetstat", "info")})  # fmt: skip
        fcall_calls, fcall_usec = after.get("fcall", (0, 0))
        n = max(fcall_calls, 1)
        writes = sum(v for k, v in inner.items() if k.split("|")[0] not in READS)
        reads = sum(inner.values()) - writes
        top = ", ".join(f"{k} {v / n:.1f}" for k, v in inner.most_common(6))
        rows.append((name, fcall_calls / jobs, reads / n, writes / n, fcall_usec / n, top))

    def each(fn_of):  # type: ignore[no-untyped-def]
        return [(lambda i=i: fn_of(i)) for i in range(jobs)]

    try:
        await phase("create", each(lambda i: fn.execution.create_execution(xs[i])))
        await phase("claim grant", each(lambda i: fn.scheduling.issue_claim_grant(
            xs[i].execution_id, who, 10_000)))  # fmt: skip

        async def claim(i: int) -> None:
            c = await fn.scheduling.claim_execution(
                xs[i].execution_id, who, str(uuid.uuid4()), 30_000, str(uuid.uuid4())
            )
            claims.append(Fence(c.lease_id, c.lease_epoch, c.attempt_id))

        await phase("claim", each(claim))
        await phase("renew", each(
            lambda i: fn.lease.renew_lease(xs[i].execution_id, 0, claims[i], 30_000)))  # fmt: skip
        frame = Frame(frame_type="token", payload=b"x" * 64)
        await phase("append frame", each(lambda i: fn.stream.append_frame(
            xs[i].execution_id, 0, claims[i], frame)))  # fmt: skip
        await phase("complete", each(lambda i: fn.execution.complete_execution(
            xs[i].execution_id, claims[i], b"", "", "lease_holder")))  # fmt: skip
    finally:
        await store.close()
        valkey.stop()
    print(f"{jobs} executions, one partition; per call:\n")
    print("| transition | FCALLs/job | reads | writes | Valkey µs | top commands per call |")
    print("|---|---|---|---|---|---|")
    for name, per_job, reads, writes, usec, top in rows:
        print(f"| {name} | {per_job:.0f} | {reads:.1f} | {writes:.1f} | {usec:.1f} | {top} |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=2000)
    asyncio.run(main(ap.parse_args().jobs))
