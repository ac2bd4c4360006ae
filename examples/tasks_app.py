"""Tasks as functions, run from the shell: `flowfabric worker examples.tasks_app`.

Or in one command with an embedded server: `python examples/tasks_app.py`.
"""

from __future__ import annotations

from flowfabric import SyncTaskContext, task


@task("greet")
async def greet(name: str, punctuation: str = "!") -> str:
    return f"hello, {name}{punctuation}"


@task("add")
def add(a: int, b: int) -> int:  # a plain def runs in the worker's thread pool
    return a + b


@task("slow")
def slow(ctx: SyncTaskContext, steps: int) -> int:
    done = 0
    for _ in range(steps):
        ctx.sleep(0.1)  # raises Cancelled at once if the task is cancelled
        done += 1
    return done


if __name__ == "__main__":
    import asyncio

    from _embedded import server

    from flowfabric import Client, Worker

    async def main() -> None:
        async with server() as target, Client(target) as client:
            worker = Worker(client, concurrency=4)
            for made in (greet, add, slow):
                worker.add_task(made)
            running = asyncio.create_task(worker.run())
            hello = await greet.submit(client, "world")
            total = await add.submit(client, a=2, b=3)
            print("greet:", await hello.result(timeout=30))
            print("add:", await total.result(timeout=30))
            worker.stop()
            await running

    asyncio.run(main())
