"""API limits (docs/architecture.md#limits).

Two kinds: the serialised size of a request, capped per method here (the interceptor refuses a
larger one), and the bound of every duration, TTL, count and size a request can carry, which
lives in the one table of `valkey/bounds.py` (shared with the Functions library and the README)
and is checked by the servicers' decoders through the helpers below, before anything is written.
"""

from __future__ import annotations

from flowfabric.server.valkey import bounds
from flowfabric.server.valkey.bounds import Bound, check, check_count, check_size
from flowfabric.server.valkey.errors import InvalidInput

INPUT_PAYLOAD_MAX = 1 << 20  # CreateExecution input payload
SIGNAL_PAYLOAD_MAX = 65_536
FRAME_PAYLOAD_MAX = 65_536
CONTROL_REQUEST_MAX = 64 << 10  # every other RPC, serialised
CREATE_REQUEST_MAX = INPUT_PAYLOAD_MAX + CONTROL_REQUEST_MAX
SIGNAL_REQUEST_MAX = 256 << 10
GRPC_MAX_RECEIVE = 2 << 20  # transport backstop (gRPC answers RESOURCE_EXHAUSTED itself)
# Claim replies (docs/lifecycle.md#claim-reply-size): the tasks of one reply stay below the
# caller's declared receive limit (`max_reply_bytes`), or gRPC's default receive limit when it
# declares none, less a margin for the response's own framing. A task costs at most one
# CreateExecution's worth (payload, tags, kind, namespace) plus the engine's ROW_BYTES, so the
# smallest limit a caller may declare always fits one task.
CLIENT_RECEIVE_DEFAULT = 4 << 20
REPLY_MARGIN = 64 << 10
CLAIM_REPLY_MIN = 2 << 20
CLAIM_REPLY_MAX = bounds.REPLY_BYTES.hi
LIST_PAGE_MAX = bounds.PAGE.hi
LIST_PAGE_DEFAULT = 50

DEFAULT_LEASE_TTL_MS = 30_000
DEFAULT_GRANT_TTL_MS = 10_000

# Serialised request caps per method; every other method gets CONTROL_REQUEST_MAX.
REQUEST_LIMITS = {
    "/flowfabric.v1.ExecutionService/CreateExecution": CREATE_REQUEST_MAX,
    # each item is held to CreateExecution's limit on its own
    "/flowfabric.v1.ExecutionService/CreateExecutions": GRPC_MAX_RECEIVE,
    "/flowfabric.v1.SignalService/DeliverSignal": SIGNAL_REQUEST_MAX,
    "/flowfabric.v1.WorkerService/CompleteExecution": CREATE_REQUEST_MAX,
    # each item is held to CompleteExecution's limit on its own
    "/flowfabric.v1.WorkerService/CompleteExecutions": GRPC_MAX_RECEIVE,
    "/flowfabric.v1.WorkerService/AppendFrame": FRAME_PAYLOAD_MAX + CONTROL_REQUEST_MAX,
}

__all__ = [
    "Bound", "bounds", "check", "check_count", "check_size", "concurrency_key", "control_part",
    "lease_ttl", "optional",
]  # fmt: skip


def concurrency_key(value: str, quota_policy_id: str, field: str = "concurrency_key") -> str:
    """A quota concurrency key (docs/budgets.md#per-key-limits): within LABEL_BYTES, no
    whitespace or control bytes, and only with a quota policy; "" = none."""
    if not value:
        return ""
    check_size(bounds.LABEL_BYTES, value, field)
    if any(ord(ch) <= 0x20 or ord(ch) == 0x7F for ch in value) or not value.isprintable():
        raise InvalidInput(field, f"{field} must not contain whitespace or control bytes")
    if not quota_policy_id:
        raise InvalidInput(field, f"{field} needs a quota_policy_id")
    return value


def lease_ttl(value: int, field: str = "lease_ttl_ms") -> int:
    """A lease TTL as sent (0 = the 30 s default), within LEASE_TTL_MS."""
    return check(bounds.LEASE_TTL_MS, value, field) if value else DEFAULT_LEASE_TTL_MS


def optional(bound: Bound, request: object, name: str, field: str | None = None) -> int | None:
    """An `optional` numeric field: None when absent, else its value within `bound`."""
    if not request.HasField(name):  # type: ignore[attr-defined]
        return None
    return check(bound, int(getattr(request, name)), field or name)


def control_part(request: object, payload: bytes, field: str) -> None:
    """Everything of a request but its payload (`field`) within CONTROL_REQUEST_MAX, as for every
    control RPC: the large request caps of CreateExecution and CompleteExecution are for the
    payload, never for labels, tags or policy."""
    rest = request.ByteSize() - len(payload)  # type: ignore[attr-defined]
    if rest > CONTROL_REQUEST_MAX:
        raise InvalidInput(
            field,
            f"the request without {field} is {rest} bytes; the limit is {CONTROL_REQUEST_MAX}",
        )
