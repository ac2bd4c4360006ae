"""Fuzz every RPC for as long as you like: `python scripts/fuzz.py --count 20000 --seed 7`.

Starts a throwaway Valkey (standalone, or a 3-primary Cluster with --cluster) and the server
under fuzz as a child process, runs `--count` generated requests and prints the per-RPC table,
the memory samples and every finding. Exit status 1 if anything was found (known defects listed
in tests/fuzz/test_fuzz.py's KNOWN_DEFECTS are shown apart and do not count). See
docs/reliability.md#fuzzing.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from flowfabric.server.embedded import ValkeyCluster, ValkeyProcess  # noqa: E402
from flowfabric.server.valkey.store import Store  # noqa: E402
from tests.fuzz.harness import Fuzzer, ServerProcess, Tally, run  # noqa: E402
from tests.fuzz.test_fuzz import known_defect, memory_report  # noqa: E402


async def fuzz(url: str, count: int, seed_value: int | None, log: Path, every: int) -> Tally:
    store = Store.from_url(url)
    if store.cluster:
        await store.client.initialize()
    await store.ensure_library()
    server = ServerProcess(url, log).start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        fuzzer = Fuzzer(channel, store, server)
        fuzzer.known = known_defect
        return await run(fuzzer, count, seed_value, memory_every=every)
    finally:
        await channel.close()
        server.stop()
        await store.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=5000, help="requests to generate")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: derandomized)")
    p.add_argument("--cluster", action="store_true", help="a 3-primary Cluster, not standalone")
    p.add_argument("--memory-every", type=int, default=0, help="also sample memory every N")
    p.add_argument("--reasons", action="store_true", help="also print ErrorInfo reasons per RPC")
    p.add_argument("--log", type=Path, default=None, help="server log (default: a temp file)")
    args = p.parse_args()
    log = args.log or Path(tempfile.mkdtemp(prefix="ff-fuzz-")) / "server.log"
    valkey = ValkeyCluster() if args.cluster else ValkeyProcess(persistent=False)
    valkey.start()
    try:
        tally = asyncio.run(fuzz(valkey.url, args.count, args.seed, log, args.memory_every))
    finally:
        valkey.stop()
    print(tally.table())
    if args.reasons:
        for rpc, reasons in sorted(tally.reasons.items()):
            print(f"{rpc}: " + ", ".join(f"{r}={n}" for r, n in reasons.most_common()))
    print(
        f"\n{tally.examples} requests over {len(tally.statuses)} RPCs in {tally.elapsed_s:.0f} s"
        f"; {tally.compared} refused requests had their keyspace compared; "
        f"{tally.resets} keyspace resets, {tally.derived} derived from successes, "
        f"{tally.duplicates} duplicates generated and not sent; "
        f"server log {log}"
    )
    print("time by step: " + ", ".join(f"{k} {v:.0f} s" for k, v in tally.timing.most_common()))
    print("slowest RPCs: " + ", ".join(f"{k} {v:.1f} s" for k, v in tally.rpc_time.most_common(8)))
    internal = sum(c.get("INTERNAL", 0) + c.get("UNKNOWN", 0) for c in tally.statuses.values())
    print(f"INTERNAL/UNKNOWN: {internal}")
    print(memory_report(tally))
    fresh = [f for f in tally.findings if not f.kind.startswith("known:")]
    known = [f for f in tally.findings if f.kind.startswith("known:")]
    print(f"\nfindings: {len(fresh)} new, {len(known)} matching KNOWN_DEFECTS")
    for finding in fresh:
        print(finding)
    if known:
        print("\nknown defects seen:")
        for kind in sorted({f.kind for f in known}):
            print(f"  {kind}: {sum(f.kind == kind for f in known)}")
    return 1 if fresh else 0


if __name__ == "__main__":
    raise SystemExit(main())
