"""One place that rebuilds a gRPC method handler around wrapped behaviours: the interceptors
(auth and errors, metrics, tracing) each wrap a handler's behaviour in a `unary` and a
`streaming` coroutine and hand the pair back here (docs/architecture.md#the-three-hops)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:  # generic only in the stubs, not at run time
    Handler = grpc.RpcMethodHandler[Any, Any]
else:
    Handler = grpc.RpcMethodHandler


def rewrap(
    handler: Handler,
    unary: Callable[..., Any],
    streaming: Callable[..., Any],
) -> Handler:
    """`handler`'s kind and codec with `unary` (unary or stream request, one response) or
    `streaming` (a response stream) as its behaviour."""
    codec = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary, **codec)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary, **codec)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming, **codec)
    return grpc.stream_stream_rpc_method_handler(streaming, **codec)
