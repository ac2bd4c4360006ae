"""SDK tests: the real server of `tests/conftest.py` (both topologies), reached only through the
SDK. Helpers here start a worker in the background and poll for effects with a bound."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import pytest

from flowfabric import Client, Worker
from tests.conftest import API_TOKEN, Api

T = TypeVar("T")


@pytest.fixture
async def client(api: Api) -> AsyncIterator[Client]:
    async with Client(api.address, token=API_TOKEN) as c:
        yield c


@contextlib.asynccontextmanager
async def running(worker: Worker) -> AsyncIterator[Worker]:
    """`worker.run()` in the background; stopped (and drained) on exit."""
    async with worker:
        task = asyncio.create_task(worker.run())
        try:
            yield worker
        finally:
            worker.stop()
            await task


async def eventually(
    probe: Callable[[], Awaitable[T]], check: Callable[[T], bool], within: float = 10.0
) -> T:
    """Poll `probe` until `check` accepts its value (every 20 ms, at most `within` s)."""
    end = time.monotonic() + within
    while True:
        value = await probe()
        if check(value):
            return value
        if time.monotonic() > end:
            raise AssertionError(f"condition not reached in {within} s; last value {value!r}")
        await asyncio.sleep(0.02)
