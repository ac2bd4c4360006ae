"""Small asyncio helpers shared by the server and the engine."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable

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
