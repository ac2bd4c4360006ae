"""`lua/stream.lua`: append a frame to an attempt's output stream, and read it back."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from flowfabric.server.valkey.codec import Reply
from flowfabric.server.valkey.errors import FlowFabricError
from flowfabric.server.valkey.functions.core import (
    Batch,
    Decl,
    Fence,
    KeyCtx,
    arg,
    call,
    call_batch,
    exec_ctx,
    key,
    ok,
    opt,
    record,
    tail,
)
from flowfabric.server.valkey.ids import ExecutionId
from flowfabric.server.valkey.store import Store


@dataclass(frozen=True)
class Frame:
    """One frame to append; `None`/"" fields take the function's defaults."""

    frame_type: str
    payload: bytes
    timestamp: int | None = None
    encoding: str = ""
    metadata_json: str = ""
    correlation_id: str = ""
    source: str = ""
    retention_maxlen: int | None = None
    max_payload_bytes: int | None = None


@dataclass(frozen=True)
class Appended:
    entry_id: str
    frame_count: int


@dataclass(frozen=True)
class StreamRead:
    """XRANGE entries (each `[id, [field, value, ...]]`, as Valkey returns them) and the
    stream's close markers ("" while open)."""

    entries: tuple[object, ...]
    closed_at: int | None
    closed_reason: str


def _read(reply: Reply) -> StreamRead:
    entries = reply.values[0] if reply.values else []
    closed_at = reply.str(1)
    return StreamRead(tuple(entries or []), int(closed_at) if closed_at else None, reply.str(2))


def _stream(c: KeyCtx) -> str:
    return c.exec.stream(c.attempt_index)


def _meta(c: KeyCtx) -> str:
    return c.exec.stream_meta(c.attempt_index)


APPEND: Decl[Appended] = Decl(
    "ff_append_frame",
    (key("exec.core", lambda c: c.exec.core), key("exec.stream", _stream),
     key("exec.stream_meta", _meta)),
    (arg("execution_id"), arg("attempt_index", "int"), arg("lease_id"), opt("lease_epoch"),
     arg("attempt_id"), arg("frame_type"), opt("timestamp"), arg("payload", "bytes"),
     arg("encoding"), arg("metadata_json"), arg("correlation_id"), arg("source"),
     opt("retention_maxlen"), opt("max_payload_bytes"), tail("more_frames")),
    ok(record(Appended)),
)  # fmt: skip
READ: Decl[StreamRead] = Decl(
    "ff_read_attempt_stream",
    (key("exec.stream", _stream), key("exec.stream_meta", _meta)),
    (arg("from_id"), arg("to_id"), arg("count_limit", "int")),
    ok(_read),
    read_only=True,
)

APPENDS: Batch[Appended] = Batch("ff_append_frames", APPEND)
BATCHES = (APPENDS,)

DECLS = (APPEND, READ)


def _more(frames: Sequence[Frame]) -> list[str | bytes]:
    """Further frames of one `ff_append_frame` call: 7 values each (lua/stream.lua)."""
    out: list[str | bytes] = []
    for f in frames:
        out += [f.frame_type, "" if f.timestamp is None else str(f.timestamp), f.payload,
                f.encoding, f.metadata_json, f.correlation_id, f.source]  # fmt: skip
    return out


class StreamFunctions:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def append_frame(
        self,
        eid: ExecutionId,
        attempt_index: int,
        fence: Fence,
        frame: Frame,
        more: Sequence[Frame] = (),
    ) -> Appended:
        """`frame`, then `more` (same attempt, fence, retention and payload cap: theirs are
        ignored), in one call that appends all of them or none; the reply is the last one's."""
        return await call(self.store, APPEND, exec_ctx(eid, attempt_index=attempt_index), {
            "execution_id": str(eid), "attempt_index": attempt_index, **fence.values(),
            "frame_type": frame.frame_type, "timestamp": frame.timestamp,
            "payload": frame.payload, "encoding": frame.encoding,
            "metadata_json": frame.metadata_json, "correlation_id": frame.correlation_id,
            "source": frame.source, "retention_maxlen": frame.retention_maxlen,
            "max_payload_bytes": frame.max_payload_bytes, "more_frames": _more(more),
        })  # fmt: skip

    async def append_frames(
        self, items: Sequence[tuple[ExecutionId, int, Fence, Frame]]
    ) -> list[Appended | FlowFabricError]:
        """`append_frame` for each (eid, attempt_index, fence, frame), all on one partition, in
        one FCALL, in order: the replies up to and including the first error (the frames after
        it are not appended)."""
        return await call_batch(self.store, APPENDS, [(exec_ctx(eid, attempt_index=idx), {
            "execution_id": str(eid), "attempt_index": idx, **fence.values(),
            "frame_type": frame.frame_type, "timestamp": frame.timestamp,
            "payload": frame.payload, "encoding": frame.encoding,
            "metadata_json": frame.metadata_json, "correlation_id": frame.correlation_id,
            "source": frame.source, "retention_maxlen": frame.retention_maxlen,
            "max_payload_bytes": frame.max_payload_bytes,
        }) for eid, idx, fence, frame in items], stop_at_error=True)  # fmt: skip

    async def read_attempt_stream(
        self, eid: ExecutionId, attempt_index: int, from_id: str, to_id: str, count_limit: int
    ) -> StreamRead:
        """Cursors already lowered (`-`, `+`, ids)."""
        values = {"from_id": from_id, "to_id": to_id, "count_limit": count_limit}
        return await call(self.store, READ, exec_ctx(eid, attempt_index=attempt_index), values)
