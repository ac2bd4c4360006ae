"""`flowfabric serve`: parse flags, configure logging, run the server until SIGINT/SIGTERM.

The SDK's CLI hands `serve` here, so the SDK itself never imports the server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import sys

from flowfabric.server.app import BootError, FlowFabricServer, configure_logging
from flowfabric.server.config import Config, ConfigError, flag_parser

QUICKSTART_DASHBOARD = "127.0.0.1:50080"


def serve_command(flags: list[str]) -> None:
    """Boot from `flags` (and FF_* variables); a boot failure prints one line and exits 1."""
    if "-h" in flags or "--help" in flags:
        flag_parser().print_help()
        return
    try:
        config = Config.load(flags)
    except ConfigError as exc:
        print(f"flowfabric: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    configure_logging(config.log_level, config.log_format)
    try:
        asyncio.run(_serve(config))
    except (BootError, OSError, RuntimeError) as exc:
        print(f"flowfabric: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def quickstart_defaults(config: Config) -> tuple[Config, bool]:
    """The quick start (embedded Valkey, FF_DASHBOARD unset) serves the dashboard on
    QUICKSTART_DASHBOARD (docs/dashboard.md#turning-it-on); returns the config and whether
    that default is in force (a taken port then only warns)."""
    if config.embedded and config.dashboard is None:
        return dataclasses.replace(config, dashboard=QUICKSTART_DASHBOARD), True
    return config, False


def announce(server: FlowFabricServer) -> list[str]:
    """What a started server prints on stdout: the gRPC address, then the dashboard's
    URL and the metrics endpoint's, when they are on."""
    host = server.config.listen_addr.rsplit(":", 1)[0]
    lines = [f"flowfabric listening on {host}:{server.port}"]
    if server.dashboard_port is not None:
        lines.append(f"dashboard: http://{server.dashboard_url_host()}/")
    if server.metrics is not None:
        lines.append(f"flowfabric metrics on {server.metrics.url}")
    return lines


async def _serve(config: Config) -> None:
    config, default_dashboard = quickstart_defaults(config)
    server = FlowFabricServer(config)
    server.dashboard_optional = default_dashboard
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
        for line in announce(server):
            print(line, flush=True)
        await stop.wait()
    finally:
        await server.stop()
