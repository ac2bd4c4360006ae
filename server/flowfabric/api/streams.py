"""Attempt output streams, server side: the cursor grammar, frame decoding and the stream-op cap.

Cursor grammar (docs/streams.md#cursors): `start`, `end`, `<ms>` or `<ms>-<seq>` (ASCII digits, each
part a
u64). Empty, bare `-`/`+` and anything else are `invalid_input` at the API boundary, before any
Valkey call. Reads accept every token; tails accept only concrete ids.

The stream-op cap (docs/streams.md#concurrency-cap): one server-wide pool of
`FF_MAX_CONCURRENT_STREAM_OPS` slots
shared by reads and tails; acquisition never queues (`concurrency_limit`, RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

from flowfabric.server.valkey.codec import text
from flowfabric.server.valkey.errors import FlowFabricError, InvalidInput
from flowfabric.v1 import types_pb2 as t

U64_MAX = (1 << 64) - 1
_CONCRETE = re.compile(r"^([0-9]+)(?:-([0-9]+))?$", re.ASCII)
KNOWN_FIELDS = ("frame_type", "ts", "payload", "encoding", "source", "correlation_id",
                "metadata_json")  # fmt: skip


def lower_cursor(value: str, field: str, *, concrete_only: bool = False) -> str:
    """Validate a wire cursor; return its Valkey form (`-`, `+` or the id)."""
    if value == "":
        raise InvalidInput(field, "stream cursor must not be empty")
    if value in ("-", "+"):
        raise InvalidInput(
            field, f"bare marker '{value}' is not a valid stream cursor; use 'start' or 'end'"
        )
    if value in ("start", "end"):
        if concrete_only:
            raise InvalidInput(
                field, f"'{value}' is not accepted by tails; pass a concrete id ('0-0' = from "
                "the beginning)",
            )  # fmt: skip
        return "-" if value == "start" else "+"
    m = _CONCRETE.match(value)
    if not m or any(int(p) > U64_MAX for p in m.groups() if p is not None):
        raise InvalidInput(
            field,
            f"invalid stream cursor '{value}' (expected 'start', 'end', '<ms>', or '<ms>-<seq>')",
        )
    return value


def _fields(raw: Any) -> dict[str, bytes]:
    """XRANGE/XREAD entry fields (flat list or dict, as the client parsed them) as name→bytes."""
    if isinstance(raw, dict):
        items = list(raw.items())
    else:
        flat = list(raw or [])
        items = [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]
    return {text(k): v if isinstance(v, bytes) else text(v).encode() for k, v in items}


def to_frame(entry: Any) -> t.StreamFrame:
    """One stream entry `[id, fields]` as a StreamFrame; the payload stays raw bytes."""
    entry_id, raw = entry[0], entry[1]
    f = _fields(raw)
    ts = f.get("ts", b"")
    frame = t.StreamFrame(
        id=text(entry_id),
        frame_type=text(f.get("frame_type")),
        ts=int(ts) if ts.isdigit() else 0,
        payload=f.get("payload", b""),
        encoding=text(f.get("encoding")),
        source=text(f.get("source")),
    )
    if "correlation_id" in f:
        frame.correlation_id = text(f["correlation_id"])
    if "metadata_json" in f:
        frame.metadata_json = text(f["metadata_json"])
    for name, value in f.items():
        if name not in KNOWN_FIELDS:
            frame.fields[name] = value
    return frame


def chunks(frames: list[t.StreamFrame], byte_budget: int) -> Iterator[list[t.StreamFrame]]:
    """Split `frames` into consecutive runs of at most `byte_budget` payload bytes each (every run
    holds at least one frame), so a message stays under the clients' receive limit."""
    run: list[t.StreamFrame] = []
    size = 0
    for frame in frames:
        n = len(frame.payload) + 64
        if run and size + n > byte_budget:
            yield run
            run, size = [], 0
        run.append(frame)
        size += n
    if run:
        yield run


class StreamSlots:
    """The server-wide stream-op cap: take a slot at once or fail; never queue."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.in_use = 0
        self.closing = False

    @contextlib.contextmanager
    def take(self) -> Iterator[None]:
        if self.closing:
            raise FlowFabricError(
                "shutting_down", message="the server is shutting down", retry_after_ms=1000
            )
        if self.in_use >= self.size:
            raise FlowFabricError(
                "concurrency_limit",
                message=f"all {self.size} stream slots are in use; retry later",
                metadata={"pool": "stream_ops", "max": str(self.size)},
                retry_after_ms=200,
            )
        self.in_use += 1
        try:
            yield
        finally:
            self.in_use -= 1
