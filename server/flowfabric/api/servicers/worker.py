"""WorkerService: claims, lease renewal and every lease-scoped transition (docs/lifecycle.md,
docs/suspension.md, docs/streams.md).

The RPCs live by topic in `worker_claims` (registry and claims), `worker_leases` (renewal,
progress, frames), `worker_suspension` (waitpoints, suspend) and `worker_terminal` (complete,
fail, cancel, delay, waiting children); this module composes them into the one servicer the app
registers. The servicer decodes requests (fences through `api/fences.py`) and encodes replies;
the decisions, replays included, are the functions' (docs/lifecycle.md#replays).
"""

from __future__ import annotations

from flowfabric.server.api.servicers.base import pending
from flowfabric.server.api.servicers.worker_claims import ClaimsMixin, item_error, task_message
from flowfabric.server.api.servicers.worker_leases import LeasesMixin
from flowfabric.server.api.servicers.worker_suspension import (
    SuspensionMixin,
    suspension_of,
    waitpoint_id_of,
    waitpoint_key_of,
)
from flowfabric.server.api.servicers.worker_terminal import TerminalMixin, source_text
from flowfabric.v1 import worker_pb2 as pb
from flowfabric.v1 import worker_pb2_grpc as rpc

__all__ = [
    "WorkerServicer", "item_error", "source_text", "suspension_of", "task_message",
    "waitpoint_id_of", "waitpoint_key_of",
]  # fmt: skip


@pending(pb.DESCRIPTOR.services_by_name["WorkerService"], "the signals and streams work")
class WorkerServicer(
    ClaimsMixin, LeasesMixin, SuspensionMixin, TerminalMixin, rpc.WorkerServiceServicer
):
    """The WorkerService servicer app.py registers."""
