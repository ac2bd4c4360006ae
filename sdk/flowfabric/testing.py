"""A test harness: an in-process server on a private Valkey, a client and a worker factory.

```python
async with flowfabric.testing.server() as env:
    env.worker(greet)                    # a Worker running `greet` until the block ends
    handle = await greet.submit(env.client, name="x")
    assert await handle.result(timeout=10) == "hello, x"
```

As pytest fixtures: `pytest_plugins = ["flowfabric.testing"]` in a conftest (needs
pytest-asyncio) gives `flowfabric_env`. It starts the server of this distribution
(`flowfabric.server`, imported only here), so the server package must be installed.
See docs/tasks.md#testing-your-tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from flowfabric._client import Client
from flowfabric._tasks import Task
from flowfabric._worker import Worker

TOKEN = "flowfabric-testing"


class Env:
    """What `server()` hands back.

    Attributes:
        target: `host:port` of the server.
        client: A `Client` on it.
    """

    def __init__(self, target: str, client: Client) -> None:
        self.target = target
        self.client = client
        self._workers: list[tuple[Worker, asyncio.Task[None]]] = []

    def worker(self, *tasks: Task, **options: Any) -> Worker:
        """Start a `Worker` (options as `Worker`, e.g. `lanes`, `concurrency`) running `tasks`
        in the background; stopped and drained when the `server()` block ends. Register more
        with `worker.add_task` or `worker.handler` before the next await."""
        options.setdefault("handle_signals", False)
        options.setdefault("claim_wait_ms", 200)
        options.setdefault("shutdown_grace_s", 2.0)
        worker = Worker(self.client, **options)
        for made in tasks:
            worker.add_task(made)
        self._workers.append((worker, asyncio.create_task(worker.run())))
        return worker

    async def stop_workers(self) -> None:
        for worker, _ in self._workers:
            worker.stop()
        for _, running in self._workers:
            await running
        self._workers.clear()


@contextlib.asynccontextmanager
async def server(valkey_url: str | None = None) -> AsyncIterator[Env]:
    """Start a server (on `valkey_url`, else on an embedded Valkey in a temporary directory)
    and yield an `Env`; everything is stopped and removed on exit."""
    from flowfabric.server.app import FlowFabricServer
    from flowfabric.server.config import Config

    logging.getLogger("flowfabric.server").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="flowfabric-testing-") as tmp:
        config = Config(
            data_dir=Path(tmp),
            valkey_url=valkey_url,
            listen_addr="127.0.0.1:0",
            api_token=TOKEN,
            waitpoint_hmac_secret="ab" * 32,
            shutdown_grace_s=1,
            scanner_intervals_ms={
                "FF_DELAYED_PROMOTER_INTERVAL_MS": 100,
                "FF_LEASE_EXPIRY_INTERVAL_MS": 200,
            },
        )
        embedded = FlowFabricServer(config)
        port = await embedded.start()
        target = f"127.0.0.1:{port}"
        try:
            async with Client(target, token=TOKEN) as client:
                env = Env(target, client)
                try:
                    yield env
                finally:
                    await env.stop_workers()
        finally:
            await embedded.stop()


try:
    import pytest
except ImportError:  # pragma: no cover - the fixtures need pytest
    pass
else:
    try:
        import pytest_asyncio

        _async_fixture: Any = pytest_asyncio.fixture
    except ImportError:  # pragma: no cover
        _async_fixture = pytest.fixture

    @_async_fixture  # type: ignore[untyped-decorator]
    async def flowfabric_env() -> AsyncIterator[Env]:
        """A fresh server for one test (see `server`)."""
        async with server() as env:
            yield env
