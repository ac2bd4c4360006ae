"""Retries and cancellation: `python examples/retries_and_cancel.py`.

- `flaky` fails twice, then succeeds on its third attempt (policy: 2 retries, 100 ms apart);
- `broken` always fails: the retries run out and the execution ends `failed`;
- `invalid` raises NonRetryableError: it fails at once, whatever the policy allows;
- `throttled` asks for a retry after 300 ms (RetryAfter) and succeeds on the retry;
- `slow` is cancelled by the client while it runs: the handler sees CancelledError.
Exits non-zero if any outcome differs from the above.
"""

import asyncio
import sys

from _embedded import server

from flowfabric import (
    Client,
    ExecutionState,
    NonRetryableError,
    RetryAfter,
    RetryPolicy,
    TaskContext,
    Worker,
)

POLICY = RetryPolicy.fixed(max_retries=2, backoff_ms=100)
observed: dict[str, list[str]] = {}


def note(ctx: TaskContext, what: str) -> None:
    observed.setdefault(ctx.kind, []).append(f"attempt {ctx.attempt_index}: {what}")


async def main() -> int:
    async with server() as target, Client(target) as client:
        worker = Worker(target, concurrency=8, lease_ttl_ms=3_000)
        slow_started = asyncio.Event()

        @worker.handler("flaky")
        async def flaky(ctx: TaskContext) -> str:
            if ctx.attempt_index < 2:
                note(ctx, "fails")
                raise ConnectionError("upstream hiccup")
            note(ctx, "succeeds")
            return "done on the third try"

        @worker.handler("broken")
        async def broken(ctx: TaskContext) -> None:
            note(ctx, "fails")
            raise RuntimeError("always broken")

        @worker.handler("invalid")
        async def invalid(ctx: TaskContext) -> None:
            note(ctx, "rejects its input")
            raise NonRetryableError("the input can never work")

        @worker.handler("throttled")
        async def throttled(ctx: TaskContext) -> str:
            if ctx.attempt_index == 0:
                note(ctx, "asks to retry after 300 ms")
                raise RetryAfter(300, "rate limited upstream")
            note(ctx, "succeeds")
            return "ok"

        @worker.handler("slow")
        async def slow(ctx: TaskContext) -> str:
            note(ctx, "starts a long job")
            slow_started.set()
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                note(ctx, f"cancelled ({ctx.lease_lost_reason})")
                raise
            return "never"

        async with worker:
            running = asyncio.create_task(worker.run())
            jobs = {
                k: await client.submit(k, policy=POLICY)
                for k in ("flaky", "broken", "invalid", "throttled", "slow")
            }
            await slow_started.wait()
            await client.cancel(jobs["slow"].execution_id, "no longer needed")
            final = {k: await client.wait(j.execution_id, timeout=30) for k, j in jobs.items()}
            await asyncio.sleep(0.5)  # let the cancelled handler observe its cancellation
            worker.stop()
            await running

    expected = {
        "flaky": ExecutionState.COMPLETED,
        "broken": ExecutionState.FAILED,
        "invalid": ExecutionState.FAILED,
        "throttled": ExecutionState.COMPLETED,
        "slow": ExecutionState.CANCELLED,
    }
    for kind, state in final.items():
        print(f"{kind:10} {state.name.lower():10} " + "; ".join(observed.get(kind, [])))
    ok = final == expected and len(observed["broken"]) == 3 and len(observed["invalid"]) == 1
    ok = ok and any("cancelled" in line for line in observed["slow"])
    print("as expected" if ok else "UNEXPECTED OUTCOME")
    return 0 if ok else 1


sys.exit(asyncio.run(main()))
