"""The `flowfabric` command line.

`flowfabric serve [--flag value ...]` runs the server; every `FF_*` setting is also a flag
(`--listen-addr` for `FF_LISTEN_ADDR`). Exit codes: 0 clean stop, 1 configuration or boot
failure, 2 usage error.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from flowfabric.server.config import Config, ConfigError, flag_parser


async def serve(config: Config) -> None:
    from flowfabric.server.app import FlowFabricServer

    server = FlowFabricServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        port = await server.start()
        print(f"flowfabric listening on {config.listen_addr.rsplit(':', 1)[0]}:{port}", flush=True)
        await stop.wait()
    finally:
        await server.stop()


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print("usage: flowfabric serve [--flag value ...]   (flowfabric serve --help for flags)")
        raise SystemExit(0 if args else 2)
    command, rest = args[0], args[1:]
    if command != "serve":
        print(f"flowfabric: unknown command {command!r}", file=sys.stderr)
        raise SystemExit(2)
    if "-h" in rest or "--help" in rest:
        flag_parser().print_help()
        raise SystemExit(0)
    try:
        config = Config.load(rest)
    except ConfigError as exc:
        print(f"flowfabric: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("audit").setLevel(logging.INFO)
    try:
        asyncio.run(serve(config))
    except Exception as exc:  # boot failures: one line, exit 1
        from flowfabric.server.app import BootError

        if isinstance(exc, BootError | OSError | RuntimeError):
            print(f"flowfabric: {exc}", file=sys.stderr)
            raise SystemExit(1) from None
        raise
