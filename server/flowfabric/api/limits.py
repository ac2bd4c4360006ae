"""API limits (docs/architecture.md#limits)."""

from __future__ import annotations

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
CLAIM_REPLY_MAX = 256 << 20
LIST_PAGE_MAX = 1000
LIST_PAGE_DEFAULT = 50

# Serialised request caps per method; every other method gets CONTROL_REQUEST_MAX.
REQUEST_LIMITS = {
    "/flowfabric.v1.ExecutionService/CreateExecution": CREATE_REQUEST_MAX,
    "/flowfabric.v1.SignalService/DeliverSignal": SIGNAL_REQUEST_MAX,
    "/flowfabric.v1.WorkerService/CompleteExecution": CREATE_REQUEST_MAX,
    # each item is held to CompleteExecution's limit on its own
    "/flowfabric.v1.WorkerService/CompleteExecutions": GRPC_MAX_RECEIVE,
    "/flowfabric.v1.WorkerService/AppendFrame": FRAME_PAYLOAD_MAX + CONTROL_REQUEST_MAX,
}
