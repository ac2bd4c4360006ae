"""Per-tenant token budgets for an LLM-style job: `python examples/llm_budget.py`.

Each tenant gets one budget with a hard limit on `total_tokens`. Every chat turn is an
execution attached to its tenant's budget; its handler "generates" tokens in chunks and reports
each chunk's usage. A report that would pass the hard limit is refused as a whole (a hard
breach), and the handler stops there and fails its execution with reason `budget_exceeded`.

Two things stop the work. The report's outcome stops a turn that is running when the budget
runs out; and once usage has reached the hard limit, the server no longer claims a turn
attached to that budget (it waits in `blocked:budget` until a reset, docs/budgets.md).
"""

import asyncio
import sys

from _embedded import server

from flowfabric import Client, ExecutionState, TaskContext, UsageOutcome, Worker

#: tenant -> its hard limit on total_tokens
TENANTS = {"acme": 500, "globex": 280}
TURNS = 3  # chat turns per tenant
CHUNK = 40  # tokens per generated chunk
TURN_TOKENS = 120  # tokens a turn generates (3 chunks)


async def generate(prompt: str, tokens: int):  # type: ignore[no-untyped-def]
    """A stand-in for a model: yields chunks of `CHUNK` tokens."""
    for start in range(0, tokens, CHUNK):
        await asyncio.sleep(0)
        yield f"{prompt}[{start}:{start + CHUNK}]", min(CHUNK, tokens - start)


async def main() -> None:
    async with server() as target, Client(target) as client:
        budgets = {}
        for tenant, limit in TENANTS.items():
            created = await client.create_budget(
                dimensions={"total_tokens": limit}, scope_type="tenant", scope_id=tenant
            )
            budgets[tenant] = created.budget_id

        outcomes: dict[str, str] = {}
        # one at a time, so which turn runs out is the same on every run
        worker = Worker(target, lanes=["llm"], concurrency=1)

        @worker.handler("chat")
        async def chat(ctx: TaskContext) -> dict:  # type: ignore[type-arg]
            job = ctx.json()
            used = 0
            async for text, n in generate(job["prompt"], TURN_TOKENS):
                # the dedup key makes a report repeated after a reclaim count once
                report = await ctx.report_usage(
                    job["budget_id"],
                    dedup_key=f"{job['budget_id']}:{ctx.execution_id}:{used}",
                    total_tokens=n,
                )
                if report.outcome is UsageOutcome.HARD_BREACH:
                    outcomes[ctx.execution_id] = f"stopped at {report.usage}/{report.limit}"
                # on a hard breach: raise BudgetExceeded, failing the execution at once with
                # reason `budget_exceeded` (no retry, whatever the retry policy allows)
                report.raise_if_hard_breach()
                await ctx.emit("token", text)
                used += n
            outcomes[ctx.execution_id] = f"{used} tokens"
            return {"tokens": used}

        async with worker:
            running = asyncio.create_task(worker.run())
            ok = True
            for tenant, budget_id in budgets.items():
                states = []
                for turn in range(TURNS):
                    job = await client.submit(
                        "chat",
                        {"prompt": f"{tenant}-turn-{turn}", "budget_id": budget_id},
                        lane="llm",
                        budgets=[budget_id],  # attached: claims check it
                    )
                    state = await client.wait(job.execution_id, timeout=30)
                    states.append(state)
                    print(f"{tenant} turn {turn}: {state.name.lower():9} "
                          f"{outcomes.get(job.execution_id, '')}")  # fmt: skip
                status = await client.budget(budget_id)
                done = states.count(ExecutionState.COMPLETED)
                failed = states.count(ExecutionState.FAILED)
                used = status.usage.get("total_tokens", 0)
                limit = status.hard_limits["total_tokens"]
                print(f"{tenant}: {done} completed, {failed} failed (budget_exceeded), "
                      f"usage {used}/{limit}, exhausted: {status.exhausted}")  # fmt: skip
                expected_done = min(TURNS, limit // TURN_TOKENS)
                ok = ok and done == expected_done and failed == TURNS - expected_done
            worker.stop()
            await running
        print("as expected" if ok else "UNEXPECTED")
        if not ok:
            sys.exit(1)


asyncio.run(main())
