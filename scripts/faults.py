#!/usr/bin/env python3
"""The fault suite's long variants: the scenarios of `tests/faults/` with bigger counts and
repeated kills, outside CI (docs/reliability.md#fault-suite).

    .venv/bin/python scripts/faults.py                       # every scenario, long sizes
    .venv/bin/python scripts/faults.py worker-kill --kills 10 --rate 50
    .venv/bin/python scripts/faults.py server-kill valkey-kill --rounds 3 --duration 30

Prints one `faults: <scenario> k=v ...` line per run (as the pytest suite does), appends it as
JSON to `tests/faults/.last-long-run.jsonl`, then each violated promise; exits 1 if any. The
worker-kill reclaim bound is reported as `reclaim-bound` violations (it waits on the
reclaim-in-claim scheduler fix; `--no-reclaim-bound` leaves it out of the exit status).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.faults import scenarios as sc  # noqa: E402
from tests.faults.harness import append_jsonl, summary_line  # noqa: E402

RESULTS = ROOT / "tests" / "faults" / ".last-long-run.jsonl"

Plan = Callable[[argparse.Namespace], tuple[sc.Scenario, Any]]

PLANS: dict[str, Plan] = {
    "worker-kill": lambda a: (
        sc.worker_kill,
        sc.WorkerKill(kills=a.kills, rate=a.rate / 2, backlog=int(a.rate * 5)),
    ),
    "server-kill": lambda a: (
        sc.server_kill,
        sc.ServerKill(kills=a.kills, rate=a.rate, after_s=a.duration / a.kills),
    ),
    "valkey-kill": lambda a: (
        sc.valkey_kill,
        sc.ValkeyKill(kills=a.kills, rate=a.rate, after_s=a.duration / a.kills),
    ),
    "function-flush": lambda a: (
        sc.function_flush,
        sc.FunctionFlush(flushes=a.kills * 2, rate=a.rate, every_s=a.duration / (a.kills * 2)),
    ),
    "cluster-failover": lambda a: (
        sc.cluster_failover,
        sc.ClusterFailover(rate=a.rate, after_s=a.duration),
    ),
    "multi-server-2": lambda a: (
        sc.multi_server,
        sc.MultiServer(servers=2, rate=a.rate, duration_s=a.duration),
    ),
    "multi-server-3": lambda a: (
        sc.multi_server,
        sc.MultiServer(servers=3, rate=a.rate, duration_s=a.duration),
    ),
}


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("scenarios", nargs="*", metavar="SCENARIO",
                   help=f"any of {', '.join(PLANS)} (default: all)")  # fmt: skip
    p.add_argument("--kills", type=int, default=5, help="kills (or flushes / 2) per run")
    p.add_argument("--rate", type=float, default=40.0, help="creates per second")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of load after kills")
    p.add_argument("--rounds", type=int, default=1, help="run each scenario this many times")
    p.add_argument("--keep", action="store_true", help="keep the logs and data dirs")
    p.add_argument("--no-reclaim-bound", action="store_true",
                   help="report the worker-kill reclaim bound without failing on it")  # fmt: skip
    args = p.parse_args(argv)
    unknown = [n for n in args.scenarios if n not in PLANS]
    if unknown:
        p.error(f"unknown scenario(s) {unknown}; choose from {', '.join(PLANS)}")
    if args.kills < 1 or args.rate <= 0 or args.duration <= 0 or args.rounds < 1:
        p.error("--kills, --rate, --duration and --rounds must be positive")
    return args


async def _run(name: str, args: argparse.Namespace) -> list[str]:
    scenario, params = PLANS[name](args)
    tmp = Path(tempfile.mkdtemp(prefix=f"ff-faults-{name}-"))
    try:
        result = await scenario(tmp, params)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    append_jsonl(RESULTS, result.name, result.counts)
    print(summary_line(result.name, result.counts), flush=True)
    failed = [f"{result.name}: {v}" for v in result.violations]
    if name == "worker-kill":
        bound = [f"{result.name}: reclaim-bound: {v}" for v in sc.reclaim_violations(result)]
        for line in bound:
            print(line, flush=True)
        if not args.no_reclaim_bound:
            failed += bound
    if name == "cluster-failover" and result.counts["durable"]:
        failed += [f"{result.name}: {v}" for v in sc.durable_violations(result)]
    if args.keep:
        print(f"  logs in {tmp}", flush=True)
    return failed


async def main(argv: list[str]) -> int:
    args = _args(argv)
    names = args.scenarios or list(PLANS)
    failed: list[str] = []
    for _ in range(args.rounds):
        for name in names:
            failed += await _run(name, args)
    for line in failed:
        print(f"VIOLATED {line}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main(sys.argv[1:])))
