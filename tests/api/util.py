"""Helpers for asserting gRPC errors at the client."""

from __future__ import annotations

from collections.abc import Awaitable

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from flowfabric.server.valkey.store import Store


def error_info(exc: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    """The `google.rpc.ErrorInfo` detail carried by a failed call."""
    for key, value in exc.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info
    raise AssertionError(f"no ErrorInfo in {exc!r}")


async def expect_error(
    call: Awaitable[object], code: grpc.StatusCode, reason: str
) -> error_details_pb2.ErrorInfo:
    """Await `call`, assert it fails with `code` and ErrorInfo `reason`; return the ErrorInfo."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    info = error_info(caught.value)
    assert info.reason == reason, info
    assert info.domain == "flowfabric"
    return info


async def keyspace_size(store: Store) -> int:
    """Keys in the whole keyspace (every primary on Cluster): "bad input changes nothing"."""
    if store.cluster:
        total = 0
        for node in store.client.get_primaries():
            total += await store.client.execute_command("DBSIZE", target_nodes=node)
        return total
    return int(await store.call("DBSIZE"))


async def keyspace_dump(store: Store) -> dict[bytes, bytes | None]:
    """Every key with its serialised value (`DUMP`), on every primary: "changes nothing in the
    store" compared exactly, not just by key count."""
    keys = [key async for key in store.client.scan_iter(count=1000)]
    return {key: await store.call("DUMP", key) for key in sorted(set(keys))}
