"""Small asyncio helpers shared by the server and the engine."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable

log = logging.getLogger("flowfabric.aio")


async def cancel_and_wait(tasks: Iterable[asyncio.Task[object]], grace: float = 5.0) -> None:
    """Cancel tasks and wait for them, but never longer than `grace` seconds.

    Client libraries can swallow a cancellation that lands inside their own timeout handling;
    a stop must not hang on that, so what is still running after `grace` is abandoned (and
    logged) rather than awaited forever.
    """
    pending = [t for t in tasks if not t.done()]
    for task in pending:
        task.cancel()
    if not pending:
        return
    _done, stuck = await asyncio.wait(pending, timeout=grace)
    for task in stuck:
        log.warning("task %s did not stop within %.1fs", task.get_name(), grace)
    for task in pending:
        if task.done():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                task.result()


class TaskSet:
    """Background tasks an engine object starts and must cancel at stop, at most `limit`
    running their body at once."""

    def __init__(self, limit: int) -> None:
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(limit)

    def spawn(self, work: Callable[[], Awaitable[None]], name: str) -> None:
        """Run `work()` in the background, once a slot is free."""

        async def run() -> None:
            async with self._slots:
                await work()

        task = asyncio.create_task(run(), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        """Cancel every task and wait for each to end."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
