"""A valkey-server whose picked port (or cluster bus port) is taken by another process before it
binds gets fresh ports and starts; one given an explicit port that is taken fails, naming it."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import redis

from flowfabric.server.embedded import ValkeyProcess


def _listening() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


@pytest.mark.parametrize("which", ["port", "bus_port"])
def test_a_picked_port_taken_before_the_bind_is_picked_again(tmp_path: Path, which: str) -> None:
    with _listening() as taken:
        node = ValkeyProcess(tmp_path / "v", persistent=False, cluster=True)
        setattr(node, which, taken.getsockname()[1])  # as if another process won the race
        node.start()
        try:
            assert getattr(node, which) != taken.getsockname()[1]
            with redis.Redis(port=node.port) as r:
                assert r.ping() is True
        finally:
            node.stop()


def test_an_explicit_port_that_is_taken_is_an_error(tmp_path: Path) -> None:
    with _listening() as taken:
        port = taken.getsockname()[1]
        node = ValkeyProcess(tmp_path / "v", persistent=False, port=port)
        with pytest.raises(RuntimeError, match="Address already in use"):
            node.start()
        assert node.port == port
