"""What each transition costs inside Valkey: commands and CPU per Function call.

    .venv/bin/python bench/transitions.py [--jobs 2000] [--lua DIR] [--all]

Drives the server's own Function wrappers (no gRPC, no server) against a fresh valkey-server
through the S1 path: create, claim grant, claim, renew, append one frame, complete. Around
each phase it resets and reads `INFO commandstats`, so the commands a Function runs inside
Valkey are counted by name (calls from Lua are counted like any others). Prints, per
transition: the commands per call (reads and writes apart), the top commands, and Valkey
microseconds per call (the FCALL's own `usec`, which includes what it ran). Use it before and
after a change to a Function; the figures are counts, so they do not depend on machine load,
except the microseconds. `--lua DIR` loads the Functions from another checkout's `lua/` (a base
commit's, for before/after figures in one session: the KEYS/ARGV layouts must be the same);
`--all` lists every command instead of the top six.
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

BATCH = 16  # executions per ff_claim_batch / ff_complete_executions call in the S1 phases
# leases of the first phases outlive a slow run: a due lease would be reclaimed by the S1 claims
LONG_TTL_MS = 3_600_000

# commands that only read; everything else a Function runs counts as a write
READS = {
    "hget", "hmget", "hgetall", "hexists", "get", "exists", "zscore", "zrange", "zrangebyscore",
    "zcard", "scard", "smembers", "sismember", "type", "time", "xlen", "xinfo", "ttl", "pttl",
    "llen", "lrange", "strlen", "hlen", "zrank", "zcount", "mget",
}  # fmt: skip


async def cpu_us(client) -> float:  # type: ignore[no-untyped-def]
    """Valkey's own CPU time so far (user + sys), µs: unlike a command's `usec`, it does not
    count the time the server waited for a core on a loaded machine."""
    raw = await client.info("cpu")
    return (float(raw["used_cpu_user"]) + float(raw["used_cpu_sys"])) * 1e6


async def stats(client) -> dict[str, tuple[int, int]]:  # type: ignore[no-untyped-def]
    raw = await client.info("commandstats")
    return {k.removeprefix("cmdstat_"): (v["calls"], v["usec"]) for k, v in raw.items()}


async def main(jobs: int, lua: str | None, shown: int) -> None:
    from flowfabric.server.valkey import library
    from flowfabric.server.valkey.functions import Claimer, Fence
    from flowfabric.server.valkey.functions.stream import Frame
    from flowfabric.server.valkey.ids import parse_execution_id, solo_partition

    if lua:
        library.lua_dir = lambda: Path(lua)  # type: ignore[assignment]

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
        cpu0 = await cpu_us(r)
        for c in calls:
            await c()
        cpu = await cpu_us(r) - cpu0
        after = await stats(r)
        inner = Counter({k: v[0] for k, v in after.items()
                         if k not in ("fcall", "config|resetstat", "info")})  # fmt: skip
        fcall_calls, fcall_usec = after.get("fcall", (0, 0))
        n = max(fcall_calls, 1)
        writes = sum(v for k, v in inner.items() if k.split("|")[0] not in READS)
        reads = sum(inner.values()) - writes
        top = ", ".join(f"{k} {v / n:.1f}" for k, v in inner.most_common(shown))
        rows.append((name, fcall_calls / jobs, reads / n, writes / n, fcall_usec / n, cpu / n,
                     top, sum(inner.values()) / jobs, cpu / jobs))  # fmt: skip

    def each(fn_of):  # type: ignore[no-untyped-def]
        return [(lambda i=i: fn_of(i)) for i in range(jobs)]

    try:
        await phase("create", each(lambda i: fn.execution.create_execution(xs[i])))
        await phase("claim grant", each(lambda i: fn.scheduling.issue_claim_grant(
            xs[i].execution_id, who, 10_000)))  # fmt: skip

        async def claim(i: int) -> None:
            c = await fn.scheduling.claim_execution(
                xs[i].execution_id, who, str(uuid.uuid4()), LONG_TTL_MS, str(uuid.uuid4())
            )
            claims.append(Fence(c.lease_id, c.lease_epoch, c.attempt_id))

        await phase("claim", each(claim))
        await phase("renew", each(lambda i: fn.lease.renew_lease(
            xs[i].execution_id, 0, claims[i], LONG_TTL_MS)))  # fmt: skip
        # a second set, leased the same way, for the many-frames append below
        ys = [new_execution(part) for _ in range(jobs)]
        more_claims: list = []  # type: ignore[type-arg]
        for y in ys:
            await fn.execution.create_execution(y)
            await fn.scheduling.issue_claim_grant(y.execution_id, who, 10_000)
            c = await fn.scheduling.claim_execution(
                y.execution_id, who, str(uuid.uuid4()), LONG_TTL_MS, str(uuid.uuid4())
            )
            more_claims.append(Fence(c.lease_id, c.lease_epoch, c.attempt_id))
        frame = Frame(frame_type="token", payload=b"x" * 64)
        await phase("append frame", each(lambda i: fn.stream.append_frame(
            xs[i].execution_id, 0, claims[i], frame)))  # fmt: skip
        await phase("complete", each(lambda i: fn.execution.complete_execution(
            xs[i].execution_id, claims[i], b"", "", "lease_holder")))  # fmt: skip
        if not lua:  # a base commit's ff_append_frame takes one frame per call
            frames = [Frame(frame_type="token", payload=b"x" * 64)] * 255
            await phase("append 256 frames/call", each(lambda i: fn.stream.append_frame(
                ys[i].execution_id, 0, more_claims[i], frame, frames)))  # fmt: skip

        # The server's S1 path: ff_claim_batch and ff_complete_executions, BATCH per call.
        zs = [new_execution(part) for _ in range(jobs)]
        await phase("create (S1)", each(lambda i: fn.execution.create_execution(zs[i])))
        leased: list[tuple] = []  # type: ignore[type-arg]

        async def claim_some() -> None:
            b = await fn.scheduling.claim_batch(part, who, 30_000, [
                (str(uuid.uuid4()), str(uuid.uuid4())) for _ in range(BATCH)], BATCH)  # fmt: skip
            leased.extend(b.claimed)

        await phase("claim batch (S1)", [claim_some] * (jobs // BATCH))

        def complete_some(k: int):  # type: ignore[no-untyped-def]
            rows = leased[k * BATCH : (k + 1) * BATCH]
            return fn.execution.complete_executions([(
                parse_execution_id(r.execution_id, PARTITIONS),
                Fence(r.lease_id, r.lease_epoch, r.attempt_id), b"", "", "lease_holder",
            ) for r in rows])  # fmt: skip

        await phase("complete batch (S1)",
                    [(lambda k=k: complete_some(k)) for k in range(jobs // BATCH)])  # fmt: skip
    finally:
        await store.close()
        valkey.stop()
    print(f"{jobs} executions, one partition; per call:\n")
    print("| transition | FCALLs/job | reads | writes | FCALL µs | Valkey CPU µs "
          "| top commands per call |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for name, per_job, reads, writes, usec, cpu, top, _, _ in rows:
        print(f"| {name} | {per_job:.2f} | {reads:.1f} | {writes:.1f} | {usec:.1f} | {cpu:.1f} "
              f"| {top} |")  # fmt: skip
    s1 = [r for r in rows if r[0].endswith("(S1)")]
    cmds, cpu = sum(r[7] for r in s1), sum(r[8] for r in s1)
    print(f"\nS1 per job (create + claim batch + complete batch, {BATCH} per call): "
          f"{cmds:.1f} commands inside Valkey + {sum(r[1] for r in s1):.2f} FCALLs, "
          f"{cpu / 1000:.3f} ms of Valkey CPU")  # fmt: skip


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--lua", help="load the Functions from this lua/ directory")
    ap.add_argument("--all", action="store_true", help="every command, not the top six")
    a = ap.parse_args()
    asyncio.run(main(a.jobs, a.lua, 100 if a.all else 6))
