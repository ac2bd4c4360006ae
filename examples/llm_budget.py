"""Per-tenant token budgets for an LLM-style job: `python examples/llm_budget.py`.

Each tenant gets one budget with a hard limit on `total_tokens`. Every chat turn is an
execution attached to its tenant's budget; its handler "generates" tokens in chunks and reports
each chunk's usage. A report that would pass the hard limit is refused as a whole (a hard
breach), and the handler stops there and fails its execution with reason `budget_exceeded`.

Two things stop the work. The report's outcome stops a turn that is running when the budget
runs out; and once usage has reached the hard limit, the server no longer claims a turn
attached to that budget (it waits in `blocked:budget` until a reset, docs/budgets.md).

Two more tenants run their turns side by side (a worker with three slots):

- `initech` reserves a turn's worth of tokens per turn (`reserve`): a turn starts only while
  usage plus what running turns hold leaves room for a whole turn, so no running turn is ever
  refused mid-way; the turn that does not fit waits for the budget instead
  (docs/budgets.md#reservations).
- `umbrella` has `on_hard_limit="cancel_running"` and turns longer than its budget: the first
  refused report revokes every running turn's lease, their handlers are cancelled, and every
  turn waits for the budget's reset (docs/budgets.md#hard-limit-actions).
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
#: tenant -> (hard limit, tokens per turn, create_budget options), turns run side by side
SIDE_BY_SIDE = {
    "initech": (300, TURN_TOKENS, {"reserve": {"total_tokens": TURN_TOKENS}}),
    "umbrella": (200, 240, {"on_hard_limit": "cancel_running"}),
}


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
        ok = await side_by_side(client, target) and ok
        print("as expected" if ok else "UNEXPECTED")
        if not ok:
            sys.exit(1)


async def side_by_side(client: Client, target: str) -> bool:
    """The `SIDE_BY_SIDE` tenants: three turns each, on a worker with three slots."""
    cancelled: list[str] = []
    worker = Worker(target, lanes=["llm-batch"], concurrency=3, lease_ttl_ms=1500)

    @worker.handler("turn")
    async def turn(ctx: TaskContext) -> dict:  # type: ignore[type-arg]
        job = ctx.json()
        try:
            async for _text, n in generate(job["prompt"], job["tokens"]):
                report = await ctx.report_usage(job["budget_id"], total_tokens=n)
                report.raise_if_hard_breach()  # a fail budget's turn ends here
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:  # cancel_running: the lease was revoked
            cancelled.append(ctx.execution_id)
            raise
        return {"tokens": job["tokens"]}

    ok = True
    async with worker:
        running = asyncio.create_task(worker.run())
        for tenant, (limit, tokens, options) in SIDE_BY_SIDE.items():
            bid = (
                await client.create_budget(
                    dimensions={"total_tokens": limit}, scope_type="tenant", scope_id=tenant,
                    **options,  # type: ignore[arg-type]
                )
            ).budget_id  # fmt: skip
            jobs = [
                await client.submit(
                    "turn",
                    {"prompt": f"{tenant}-{i}", "budget_id": bid, "tokens": tokens},
                    lane="llm-batch",
                    budgets=[bid],
                )
                for i in range(TURNS)
            ]
            # a turn either completes or ends up waiting for the budget
            states = [await settle(client, job.execution_id) for job in jobs]
            status = await client.budget(bid)
            done = states.count(ExecutionState.COMPLETED)
            waiting = states.count(ExecutionState.RATE_LIMITED)
            used = status.usage.get("total_tokens", 0)
            refused = "no report refused" if not status.breach_count else "over its budget"
            print(f"{tenant}: {done} completed, {waiting} waiting for the budget, "
                  f"usage {used}/{limit}, {refused}")  # fmt: skip
            if tenant == "initech":
                ok = ok and (done, waiting, status.breach_count) == (2, 1, 0)
            else:
                ok = ok and (done, waiting, used) == (0, TURNS, limit)
        ok = ok and len(cancelled) >= 1
        worker.stop()
        await running
    return ok


async def settle(client: Client, execution_id: str) -> ExecutionState:
    """Wait until the turn has completed, or waits for its budget with no lease left."""
    for _ in range(600):
        state = await client.state(execution_id)
        if state in (ExecutionState.COMPLETED, ExecutionState.FAILED):
            return state
        if state is ExecutionState.RATE_LIMITED:
            await asyncio.sleep(0.3)  # the other turns have finished what they were doing
            return await client.state(execution_id)
        await asyncio.sleep(0.05)
    return await client.state(execution_id)


asyncio.run(main())
