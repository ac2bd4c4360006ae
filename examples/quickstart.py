"""Submit an execution and run its handler: `python examples/quickstart.py`."""

import asyncio

from _embedded import server

from flowfabric import Client, Worker


async def main() -> None:
    async with server() as target, Client(target) as client:
        worker = Worker(target, concurrency=4)

        @worker.handler("greet")
        async def greet(ctx):  # type: ignore[no-untyped-def]
            return {"greeting": f"hello, {ctx.json()['name']}"}

        async with worker:
            running = asyncio.create_task(worker.run())
            job = await client.submit("greet", {"name": "world"})
            print("state:", (await client.wait(job.execution_id, timeout=30)).name.lower())
            print("result:", (await client.result(job.execution_id)).decode())
            worker.stop()
            await running


asyncio.run(main())
