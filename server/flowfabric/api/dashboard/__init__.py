"""The live web dashboard (docs/dashboard.md): served by the server process on its own port."""

from flowfabric.server.api.dashboard.web import DashboardServer

__all__ = ["DashboardServer"]
