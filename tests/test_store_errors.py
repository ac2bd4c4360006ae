"""What the store makes of the errors a failover throws at it: cluster state errors and
connections closed under a write are retryable `backend_unavailable`, not `backend_error`
(found by the fault suite's cluster failover, docs/reliability.md#fault-suite)."""

from __future__ import annotations

from typing import Any

import pytest
from redis import exceptions as rexc
from redis.asyncio.connection import Connection

from flowfabric.server.valkey.store import _reply_error, _transport, is_transport_error


@pytest.mark.parametrize(
    "exc",
    [
        rexc.ClusterDownError("CLUSTERDOWN The cluster is down"),
        rexc.TryAgainError("TRYAGAIN Multiple keys request during rehashing of slot"),
        rexc.ReadOnlyError("READONLY You can't write against a read only replica."),
    ],
)
def test_cluster_reply_errors_are_retryable(exc: rexc.ResponseError) -> None:
    assert _reply_error(exc).code == "backend_unavailable"


def test_other_reply_errors_stay_backend_errors() -> None:
    assert _reply_error(rexc.ResponseError("ERR wrong number of arguments")).code == "backend_error"


@pytest.mark.parametrize(
    "exc", [rexc.SlotNotCoveredError("Slot 7 is not covered"), rexc.ClusterError("TTL exhausted.")]
)
def test_cluster_client_give_ups_are_retryable(exc: Exception) -> None:
    assert _transport(exc).code == "backend_unavailable"


class _Writer:
    def writelines(self, data: Any) -> None:
        pass

    async def drain(self) -> None:
        pass


async def test_a_connection_closed_under_a_write_is_retryable() -> None:
    conn = Connection(port=1, socket_timeout=5)
    conn._reader, conn._writer = object(), _Writer()  # type: ignore[assignment]

    async def closed_under_it() -> None:  # what a concurrent reset does mid-command
        conn._writer = None

    conn.check_health = closed_under_it  # type: ignore[method-assign]
    with pytest.raises((AttributeError, TypeError)) as raised:
        await conn.send_packed_command(b"PING")
    assert is_transport_error(raised.value)
    assert _transport(raised.value).code == "backend_unavailable"


def test_our_own_attribute_errors_are_not_hidden() -> None:
    try:
        raise AttributeError("a bug of ours")
    except AttributeError as exc:
        assert not is_transport_error(exc)
        assert _transport(exc).code == "backend_error"
