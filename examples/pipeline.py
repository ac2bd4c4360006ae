"""A document pipeline with progress: `python examples/pipeline.py`.

Three documents go through `extract` (lane `docs`, page by page: it reports progress and
streams each page as a frame of the attempt's output stream, which the client tails live) and
then `summarize` (lane `summaries`), which needs a worker with the `llm` capability: the
general worker serves both lanes but cannot take it, so it waits (blocked on routing) until
the model worker comes up. A lane is a queue: every worker serving a lane must handle every
kind sent to it. The client chains the stages and prints each summary. Exits non-zero on any
unexpected outcome.
"""

import asyncio
import sys

from _embedded import server

from flowfabric import Client, ExecutionState, TaskContext, Worker
from flowfabric.v1 import types_pb2

DOCUMENTS = {
    "q3-report.pdf": ["Revenue grew 12%.", "Costs fell 3%.", "Outlook: steady."],
    "incident-42.md": ["The cache expired early.", "Users saw stale pages.", "Fixed in 1.4.2."],
    "onboarding.txt": ["Welcome aboard.", "Read the handbook.", "Ask questions early."],
}


async def main() -> int:
    async with server() as target, Client(target) as client:
        general = Worker(target, lanes=["docs", "summaries"], concurrency=4, worker_id="general")
        model = Worker(target, lanes=["summaries"], capabilities=["llm"], worker_id="model")

        @general.handler("extract")
        async def extract(ctx: TaskContext) -> dict:
            doc = ctx.json()
            pages = []
            for n, page in enumerate(doc["pages"], 1):
                await asyncio.sleep(0.2)  # pretend to OCR a page
                pages.append(page)
                await ctx.progress(100 * n // len(doc["pages"]), f"page {n}/{len(doc['pages'])}")
                await ctx.emit("page", page)  # the attempt's output stream, read by tails
                await ctx.flush()  # send now, so a live tail shows each page as it is read
            return {"name": doc["name"], "text": " ".join(pages)}

        @model.handler("summarize")
        async def summarize(ctx: TaskContext) -> str:
            doc = ctx.json()
            first = doc["text"].split(".")[0]
            return f"{doc['name']}: {first}."

        async def follow(eid: str, name: str) -> None:
            """Tail the extract attempt's stream live, with its reported progress."""
            async for event in client.watch(eid):  # wait until claimed: then it has an attempt
                if ExecutionState(event.public_state) not in (
                    ExecutionState.WAITING,
                    ExecutionState.DELAYED,
                ):
                    break
            async for frame in client.tail(eid, 0):
                snap = await client.describe(eid)
                print(f"  {name:15} {snap.progress_pct:3}%  {frame.payload.decode()}")

        async def process(name: str, pages: list[str], priority: int) -> str:
            job = await client.submit(
                "extract", {"name": name, "pages": pages}, lane="docs", priority=priority
            )
            await follow(job.execution_id, name)
            if await client.wait(job.execution_id, timeout=30) != ExecutionState.COMPLETED:
                raise RuntimeError(f"extract of {name} did not complete")
            text = await client.result(job.execution_id)
            policy = types_pb2.ExecutionPolicy(
                routing_requirements=types_pb2.RoutingRequirements(required_capabilities=["llm"])
            )
            step = await client.submit(
                "summarize", text, lane="summaries", policy=policy, payload_encoding="json"
            )
            if await client.wait(step.execution_id, timeout=30) != ExecutionState.COMPLETED:
                raise RuntimeError(f"summary of {name} did not complete")
            return (await client.result(step.execution_id)).decode()

        async with general:
            general_run = asyncio.create_task(general.run())
            work = [
                asyncio.create_task(process(name, pages, priority))
                for priority, (name, pages) in enumerate(DOCUMENTS.items())
            ]
            await asyncio.sleep(1.0)  # summaries wait: no worker has `llm` yet
            print("starting the model worker (capability llm)")
            async with model:
                model_run = asyncio.create_task(model.run())
                summaries = await asyncio.gather(*work)
                model.stop()
                await model_run
            general.stop()
            await general_run

    for line in summaries:
        print("summary:", line)
    ok = len(summaries) == len(DOCUMENTS) and all(":" in s for s in summaries)
    return 0 if ok else 1


sys.exit(asyncio.run(main()))
