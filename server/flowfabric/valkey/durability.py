"""The durability wait: acknowledge a writing FCALL only once it is on disk and/or on replicas
(docs/durability.md).

`Store.fcall` hands every writing call to `Durability.after_write` (docs/durability.md#the-hook).
In `replicated` mode that joins the call to the next *round* of its node's `_NodeWaiter`: one
pipeline on the waiter's own connection, `INCR <tick key>` + `WAIT N t`, then `WAITAOF L N t'`.
WAIT and WAITAOF wait for the writes of the connection that issues them; because a node's
replication offset only grows, a tick written after a set of FCALLs completed covers them all,
so one round releases every call that joined it (docs/durability.md#batched-rounds).

A round is bound to the connection that existed before its callers sent their FCALLs: if that
connection broke in between, the node may be a different process (restarted, failed over) that
never had those writes, so the callers get `backend_unavailable` instead of a false ack
(docs/durability.md#failover).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from redis import exceptions as rexc
from redis.asyncio.connection import Connection

from flowfabric.server.valkey.codec import text
from flowfabric.server.valkey.errors import FlowFabricError
from flowfabric.server.valkey.keys import durability_tick

log = logging.getLogger("flowfabric.durability")

Mode = Literal["os", "fsync", "replicated"]
MODES: tuple[Mode, ...] = ("os", "fsync", "replicated")

# Connection settings copied from the store's client to a waiter's own connection; the rest of
# redis-py's kwargs (maintenance-notification handlers, ...) belong to the pool that made them.
_CONN_KWARGS = (
    "host", "port", "username", "password", "credential_provider", "db", "client_name",
    "socket_connect_timeout", "socket_keepalive", "protocol",
)  # fmt: skip

# Set in tasks whose writes acknowledge nobody (scanners): they skip the wait
# (docs/durability.md#what-waits).
_EXEMPT: contextvars.ContextVar[bool] = contextvars.ContextVar("ff_exempt", default=False)


@contextlib.contextmanager
def acknowledges_nobody() -> Iterator[None]:
    """Writing calls made inside this block (and tasks it starts) do not wait."""
    token = _EXEMPT.set(True)
    try:
        yield
    finally:
        _EXEMPT.reset(token)


def exempt() -> bool:
    return _EXEMPT.get()


@dataclass(frozen=True)
class Ack:
    """What one round saw: replicas holding the write, replicas and local AOF with it on disk."""

    in_memory: int
    on_disk_local: int
    on_disk_replicas: int


@dataclass(frozen=True)
class NodeAddress:
    """Where a waiter connects: a node's name and the connection settings of the store."""

    name: str
    connection_class: type[Connection]
    kwargs: dict[str, Any]


class _NodeWaiter:
    """The batched waiter of one primary: one round at a time, everyone who joined while a
    round ran goes into the next one."""

    def __init__(self, address: NodeAddress, replicas: int, timeout_ms: int) -> None:
        self.address = address
        self.replicas = replicas
        self.timeout_ms = timeout_ms
        self.local = 0  # 1 when the node runs appendfsync always (docs/durability.md#replicated)
        self.conn: Connection | None = None
        self.rounds = 0
        self._lock = asyncio.Lock()
        self._next: asyncio.Future[Ack] | None = None
        self._next_tick = ""
        self._next_conn: Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self.closed = False

    async def connection(self) -> Connection:
        """The live connection (opened, and the node's fsync policy read, when there is none)."""
        conn = self.conn
        if conn is not None and conn.is_connected:
            return conn
        async with self._lock:
            if self.conn is not None and self.conn.is_connected:
                return self.conn
            kwargs = dict(self.address.kwargs)
            # a round blocks for up to the wait timeout; the socket must outlast it
            kwargs["socket_timeout"] = self.timeout_ms / 1000 + 5.0
            # every writing call waits for this connect: a dead node must fail it quickly
            kwargs["socket_connect_timeout"] = min(kwargs.get("socket_connect_timeout") or 2, 2)
            conn = self.address.connection_class(**kwargs)
            await conn.connect()  # type: ignore[no-untyped-call]  # unannotated in redis-py
            self.local = await _local_fsync(conn)
            self.conn = conn
            return conn

    def join(self, conn: Connection | None, tick_key: str) -> asyncio.Future[Ack]:
        """The future of the next round. `conn` is the connection that was live before the
        caller's FCALL was sent; a caller whose connection is no longer the live one fails."""
        loop = asyncio.get_running_loop()
        if conn is None or conn is not self.conn or not conn.is_connected:
            fut: asyncio.Future[Ack] = loop.create_future()
            fut.add_done_callback(_retrieve)
            fut.set_exception(_connection_changed(self.address.name))
            return fut
        if self._next is not None and self._next_conn is not conn:
            # the pending round was opened on a connection that has since been replaced
            self._next.set_exception(_connection_changed(self.address.name))
            self._next = None
        if self._next is None:
            fut = loop.create_future()
            fut.add_done_callback(_retrieve)
            self._next, self._next_tick, self._next_conn = fut, tick_key, conn
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name=f"durability-{self.address.name}")
        return self._next

    async def _run(self) -> None:
        while self._next is not None:
            fut, tick, conn = self._next, self._next_tick, self._next_conn
            self._next = self._next_conn = None
            try:
                ack = await self._round(conn, tick)
            except asyncio.CancelledError:
                if not fut.done():
                    fut.set_exception(FlowFabricError("shutting_down", message="server stopping"))
                raise
            except Exception as exc:
                await self._drop(conn)
                if not fut.done():
                    fut.set_exception(_round_failed(self.address.name, exc))
                continue
            if not fut.done():
                fut.set_result(ack)

    async def _round(self, conn: Connection | None, tick: str) -> Ack:
        if conn is None or conn is not self.conn or not conn.is_connected:
            # never let redis-py reconnect here: a new connection may reach a process that
            # never had the callers' writes
            raise _connection_changed(self.address.name)
        self.rounds += 1
        deadline = time.monotonic() + self.timeout_ms / 1000
        first: list[tuple[Any, ...]] = [("INCR", tick)]
        if self.replicas:
            first.append(("WAIT", self.replicas, self.timeout_ms))
        else:
            first.append(("WAITAOF", self.local, 0, self.timeout_ms))
        replies = await _pipeline(conn, first)
        if not self.replicas:
            local, _ = replies[1]
            return Ack(0, int(local), 0)
        in_memory = int(replies[1])
        if in_memory < self.replicas:
            return Ack(in_memory, 0, 0)
        # The WAIT made the replicas answer once already; that answer can predate their fsync,
        # and WAITAOF's own request for acks then gets the fresh one: ~1 ms instead of waiting
        # for a replica's once-a-second ack (docs/durability.md#replicated).
        left = max(1, int((deadline - time.monotonic()) * 1000))
        (aof,) = await _pipeline(conn, [("WAITAOF", self.local, self.replicas, left)])
        return Ack(in_memory, int(aof[0]), int(aof[1]))

    async def _drop(self, conn: Connection | None) -> None:
        if conn is not None and conn is self.conn:
            self.conn = None
            with contextlib.suppress(Exception):
                await conn.disconnect()

    async def close(self) -> None:
        self.closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._next is not None and not self._next.done():
            self._next.set_exception(FlowFabricError("shutting_down", message="server stopping"))
        if self.conn is not None:
            with contextlib.suppress(Exception):
                await self.conn.disconnect()
            self.conn = None


class Durability:
    """The durability policy of one store: `os` and `fsync` wait for nothing per call;
    `replicated` waits through one `_NodeWaiter` per primary."""

    def __init__(self, mode: Mode, replicas: int = 1, timeout_ms: int = 1000) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown durability mode {mode!r}")
        self.mode = mode
        self.replicas = replicas
        self.timeout_ms = timeout_ms
        self.waiters: dict[str, _NodeWaiter] = {}

    @property
    def waits(self) -> bool:
        return self.mode == "replicated"

    async def before_write(
        self, name: str, address: Callable[[], NodeAddress]
    ) -> tuple[_NodeWaiter | None, Connection | None]:
        """The waiter of the node a writing call is about to reach, and its connection if it is
        live. None when it cannot be opened: the call goes ahead (so the client's own error
        handling can refresh its view of the cluster) and the wait then fails
        (docs/durability.md#failover)."""
        try:
            w = self.waiters.get(name)
            if w is None or w.closed:
                w = self.waiters[name] = _NodeWaiter(address(), self.replicas, self.timeout_ms)
            return w, await w.connection()
        except Exception as exc:
            log.warning("durability: cannot reach %s (%s)", name, exc)
            gone = self.waiters.pop(name, None)
            if gone is not None:
                await gone.close()
            return None, None

    async def after_write(
        self, w: _NodeWaiter | None, conn: Connection | None, first_key: str
    ) -> None:
        """Wait for the round that covers a write which completed on `w`'s node; raise
        `durability_timeout` when it fell short."""
        if w is None:
            raise _connection_changed("the primary")
        ack = await asyncio.shield(w.join(conn, durability_tick(first_key)))
        if self.replicas and ack.in_memory < self.replicas:
            raise _timeout(
                f"{ack.in_memory} of {self.replicas} replicas acknowledged the write",
                self.timeout_ms, ack,
            )  # fmt: skip
        if self.replicas and ack.on_disk_replicas < self.replicas:
            raise _timeout(
                f"{ack.on_disk_replicas} of {self.replicas} replicas acknowledged the write on "
                f"disk ({ack.in_memory} in memory; replicas need appendonly yes)",
                self.timeout_ms, ack,
            )  # fmt: skip
        if ack.on_disk_local < w.local:
            raise _timeout("the primary's AOF fsync was not acknowledged", self.timeout_ms, ack)

    async def close(self) -> None:
        waiters, self.waiters = list(self.waiters.values()), {}
        for w in waiters:
            await w.close()


def address_from_pool(name: str, pool: Any) -> NodeAddress:
    """A waiter address from a redis-py pool's (or cluster node's) connection settings."""
    cls = pool.connection_class
    src = pool.connection_kwargs
    keys = _CONN_KWARGS + tuple(k for k in src if k.startswith("ssl_"))
    kwargs = {k: src[k] for k in keys if k in src}
    if "host" not in kwargs and hasattr(pool, "host"):
        kwargs["host"], kwargs["port"] = pool.host, pool.port
    if not (isinstance(cls, type) and issubclass(cls, Connection)):  # pragma: no cover
        raise TypeError(f"durability waits need a TCP connection, not {cls}")
    return NodeAddress(name, cls, kwargs)


async def _local_fsync(conn: Connection) -> int:
    """1 when the node fsyncs every write before replying (appendonly yes, appendfsync always):
    WAITAOF's numlocal then costs nothing. With `everysec` it would add up to a second per
    round, so it is not asked for (docs/durability.md#replicated)."""
    try:
        (cfg,) = await _pipeline(conn, [("CONFIG", "GET", "append*")])
    except rexc.ResponseError:
        log.warning("CONFIG GET is not allowed; not waiting for the primary's own AOF fsync")
        return 0
    values = config_dict(cfg)
    return int(values.get("appendonly") == "yes" and values.get("appendfsync") == "always")


def config_dict(raw: Any) -> dict[str, str]:
    """A CONFIG GET reply (flat list or RESP3 map) as a dict of str."""
    if isinstance(raw, dict):
        return {text(k): text(v) for k, v in raw.items()}
    items = list(raw or [])
    return {text(items[i]): text(items[i + 1]) for i in range(0, len(items) - 1, 2)}


async def _pipeline(conn: Connection, commands: list[tuple[Any, ...]]) -> list[Any]:
    """Send `commands` in one write on `conn` and read every reply (an error reply raises after
    all are read, so the connection stays in step)."""
    await conn.send_packed_command(conn.pack_commands(commands), check_health=False)
    replies: list[Any] = []
    error: Exception | None = None
    for _ in commands:
        try:
            replies.append(await conn.read_response())
        except rexc.ResponseError as exc:
            error = error or exc
            replies.append(exc)
    if error is not None:
        raise error
    return replies


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()  # retrieved: every joiner may have been cancelled


def _timeout(what: str, timeout_ms: int, ack: Ack) -> FlowFabricError:
    return FlowFabricError(
        "durability_timeout",
        message=f"durability_timeout: {what} within {timeout_ms} ms; the transition is "
        "applied, a retry replays it",
        metadata={
            "replicas_in_memory": str(ack.in_memory),
            "replicas_on_disk": str(ack.on_disk_replicas),
            "local_on_disk": str(ack.on_disk_local),
        },
        retry_after_ms=timeout_ms,
    )


def _connection_changed(node: str) -> FlowFabricError:
    return FlowFabricError(
        "backend_unavailable",
        message=f"durability unknown: the connection to {node} changed during the call (a "
        "restart or failover?); a retry replays the transition",
        retry_after_ms=200,
    )


def _round_failed(node: str, exc: BaseException) -> FlowFabricError:
    if isinstance(exc, FlowFabricError):
        return exc
    return FlowFabricError(
        "backend_unavailable",
        message=f"durability unknown: waiting on {node} failed ({exc}); a retry replays the "
        "transition",
        retry_after_ms=1000,
    )
