"""The Valkey Functions, declared once (`core.Decl`) and called through one builder.

`Functions(store)` exposes one concrete object per `lua/<domain>.lua` as an attribute; each
method takes explicit parameters and returns a frozen record of the reply.
"""

from __future__ import annotations

from typing import Any

from flowfabric.server.valkey.functions.admission import AdmissionFunctions
from flowfabric.server.valkey.functions.budget import BudgetFunctions
from flowfabric.server.valkey.functions.core import Batch, Claimer, Decl, Fence, Leased, Outcome
from flowfabric.server.valkey.functions.execution import ExecutionFunctions, NewExecution
from flowfabric.server.valkey.functions.flow import FlowFunctions
from flowfabric.server.valkey.functions.lease import LeaseFunctions, Reclaimed, ReclaimLimit
from flowfabric.server.valkey.functions.maintenance import MaintenanceFunctions
from flowfabric.server.valkey.functions.quota import QuotaFunctions
from flowfabric.server.valkey.functions.schedule import ScheduleFunctions
from flowfabric.server.valkey.functions.scheduling import SchedulingFunctions
from flowfabric.server.valkey.functions.signal import INITIAL_KID, Keystore, Signal, SignalFunctions
from flowfabric.server.valkey.functions.stream import Frame, StreamFunctions
from flowfabric.server.valkey.functions.suspension import (
    Suspension,
    SuspensionFunctions,
    WaitpointRow,
)
from flowfabric.server.valkey.functions.waiters import WaiterFunctions
from flowfabric.server.valkey.store import Store


class Functions:
    """Every Valkey Function, by domain."""

    def __init__(self, store: Store, hmac_secret: str | None = None) -> None:
        self.store = store
        self.keystore = Keystore(store, hmac_secret)
        self.execution = ExecutionFunctions(store)
        self.lease = LeaseFunctions(store)
        self.scheduling = SchedulingFunctions(store)
        self.admission = AdmissionFunctions(store)
        self.suspension = SuspensionFunctions(store, self.keystore)
        self.signal = SignalFunctions(store, self.keystore)
        self.stream = StreamFunctions(store)
        self.maintenance = MaintenanceFunctions(store)
        self.flow = FlowFunctions(store)
        self.budget = BudgetFunctions(store)
        self.quota = QuotaFunctions(store)
        self.waiters = WaiterFunctions(store)
        self.schedule = ScheduleFunctions(store)


def all_declarations() -> tuple[Decl[object], ...]:
    """Every declaration, for the contract tests."""
    from flowfabric.server.valkey.functions import (
        admission,
        budget,
        execution,
        flow,
        lease,
        maintenance,
        quota,
        schedule,
        scheduling,
        signal,
        stream,
        suspension,
        waiters,
    )  # fmt: skip

    mods = (
        admission, budget, execution, flow, lease, maintenance, quota, schedule, scheduling, signal,
        stream, suspension, waiters,
    )  # fmt: skip
    return tuple(d for m in mods for d in m.DECLS)


def all_batches() -> tuple[Batch[Any], ...]:
    """Every batched Function (docs/lifecycle.md#batched-functions)."""
    from flowfabric.server.valkey.functions import execution, lease, stream

    return tuple(b for m in (execution, lease, stream) for b in getattr(m, "BATCHES", ()))


__all__ = [
    "INITIAL_KID", "Claimer", "Fence", "Frame", "Functions", "Keystore", "Leased", "NewExecution",
    "Outcome", "ReclaimLimit", "Reclaimed", "Signal", "Suspension", "WaitpointRow",
    "all_batches", "all_declarations",
]  # fmt: skip
