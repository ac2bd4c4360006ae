"""What an observer (the metrics, docs/observability.md#metrics) sees of every FCALL: its
latency by function and its decoded reply, with the call's key context and arguments. The
default observes nothing. `Store.observer` holds one per store, so several servers in one
process keep their figures apart."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any


class FcallObserver:
    """The no-op observer; `api/metrics.py` overrides the three methods."""

    def timed(self, function: str) -> contextlib.AbstractContextManager[object]:
        """A context around one FCALL's round trip."""
        return contextlib.nullcontext()

    def replied(self, function: str, ctx: Any, values: Mapping[str, object], reply: Any) -> None:
        """A successful, decoded reply of `function` (error replies raise before this)."""

    def replied_batch(
        self,
        function: str,
        items: Sequence[tuple[Any, Mapping[str, object]]],
        replies: Sequence[Any],
    ) -> None:
        """A batched call's per-item replies (decoded, or the item's FlowFabricError)."""
        for (ctx, values), reply in zip(items, replies, strict=False):
            if not isinstance(reply, Exception):
                self.replied(function, ctx, values, reply)
