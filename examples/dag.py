"""A fan-out / fan-in flow with a failing branch, then a replay: `python examples/dag.py`.

One flow of 12 executions submitted in one call: `split` fans out to 10 `square` branches
(each gets split's result as its input), and `total` waits for all ten. Branch 7 fails on its
first attempt (a flag in this process stands in for a flaky dependency), so `total` is
skipped and the flow ends `failed`. Replaying the flow re-runs only what did not complete
(branch 7 and `total`); the nine branches that completed keep their results, and the flow
completes. Exits non-zero on any unexpected outcome.
"""

import asyncio
import json
import sys

from _embedded import server

from flowfabric import (
    Client,
    FlowState,
    NonRetryableError,
    TaskContext,
    Worker,
)

FLAKY = 7
BRANCHES = 10
flaky_failed = False  # the first attempt of branch 7 fails, later ones succeed


def show(label: str, info) -> None:
    counts = ", ".join(f"{n} {state}" for state, n in sorted(info.counts.items()))
    print(f"{label}: flow {info.state.value} ({counts})")
    if info.state is FlowState.FAILED:  # the flow keeps its first failures after a replay too
        for failure in info.failures:
            print(f"  {failure.state.name.lower()}: {failure.reason}")


async def main() -> int:
    async with server() as target, Client(target) as client:
        worker = Worker(target, lanes=["dag"], concurrency=16)

        @worker.handler("split")
        async def split(ctx: TaskContext) -> dict:
            return {"numbers": list(range(1, BRANCHES + 1))}

        @worker.handler("square")
        async def square(ctx: TaskContext) -> int:
            global flaky_failed
            n = int(ctx.tags["app.branch"])
            if n == FLAKY and not flaky_failed:
                flaky_failed = True
                raise NonRetryableError(f"branch {n}: upstream service unavailable")
            return json.loads(ctx.payload)["numbers"][n - 1] ** 2

        @worker.handler("total")
        async def total(ctx: TaskContext) -> dict:
            # the upstreams are the inbound edges; their results are the squares
            parts = [
                int(await client.result(edge.upstream_execution_id))
                async for edge in client.edges(ctx.execution_id, direction="incoming")
            ]
            return {"branches": len(parts), "sum_of_squares": sum(parts)}

        f = client.flow("fan-out")
        head = f.add("split", lane="dag")
        branches = [
            f.add("square", lane="dag", key=f"square-{n}", tags={"app.branch": str(n)},
                  data_from=head)
            for n in range(1, BRANCHES + 1)
        ]  # fmt: skip
        tail = f.add("total", lane="dag", after=branches)
        flow = await f.submit()
        print(f"submitted flow {flow.flow_id}: {len(flow.members)} members, "
              f"split -> {BRANCHES} branches -> total")  # fmt: skip

        async with worker:
            running = asyncio.create_task(worker.run())
            first = await client.wait_flow(flow.flow_id, timeout=90)
            show("first run", first)
            print(f"  total: {(await client.state(flow[tail])).name.lower()}")

            # re-runs what did not complete: branch 7 and the skipped total
            replay = await client.replay_flow(flow.flow_id, "retry the failed branch")
            names = {eid: key for key, eid in flow.members.items()}
            print("replayed:", ", ".join(sorted(names[eid] for eid in replay.execution_ids)))

            second = await client.wait_flow(flow.flow_id, timeout=90)
            show("after the replay", second)
            worker.stop()
            await running

        result = json.loads(await client.result(flow[tail]))
        print(f"total: {result['sum_of_squares']} from {result['branches']} branches")
        expected = sum(n * n for n in range(1, BRANCHES + 1))
        ok = (
            first.state is FlowState.FAILED
            and first.counts == {"completed": BRANCHES, "failed": 1, "skipped": 1}
            and sorted(replay.execution_ids) == sorted([flow[tail], flow[branches[FLAKY - 1]]])
            and second.state is FlowState.COMPLETED
            and result == {"branches": BRANCHES, "sum_of_squares": expected}
        )
    return 0 if ok else 1


sys.exit(asyncio.run(main()))
