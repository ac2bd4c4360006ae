"""The Valkey store: connections, the Functions library, and the one FCALL helper.

Every FCALL in the process (API, scheduler, scanners) goes through `Store.fcall`, which reloads
the library once (single-flight) when Valkey answers "function not found" (after a failover or
`FUNCTION FLUSH`) and retries the call once (docs/architecture.md#the-functions-library). Transport
faults surface as
`backend_unavailable`; a failed reload as `library_reload_failed`. A writing call then waits for
the configured durability (docs/durability.md#the-hook).
"""

from __future__ import annotations

import asyncio
import logging
import re
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.crc import key_slot

from flowfabric.server.valkey.durability import (
    Durability,
    NodeAddress,
    address_from_pool,
    config_dict,
    exempt,
)
from flowfabric.server.valkey.errors import FlowFabricError
from flowfabric.server.valkey.library import Library, default_library
from flowfabric.server.valkey.observe import FcallObserver

log = logging.getLogger("flowfabric.store")

MIN_VALKEY_VERSION = (7, 2, 0)
MAX_CONNECTIONS = 256
_REDIS_CONNECTION = ("redis", "asyncio", "connection.py")
_NOT_LOADED = ("function not found", "no matching function", "function not loaded")

Arg = str | bytes | int


def _hiredis_packing(base: type[AbstractConnection]) -> type[AbstractConnection]:
    """`base` (the connection class the URL chose: plain, TLS or a Unix socket) packing commands
    with hiredis, in C, as redis-py's sync client does, instead of the asyncio client's Python
    packer: the same bytes, about 9x less CPU for a large FCALL such as a message of frames
    (docs/architecture.md#the-three-hops)."""

    class Packed(base):  # type: ignore[valid-type,misc]
        def pack_command(self, *args: Any) -> list[bytes]:
            if isinstance(args[0], str):  # a command name may carry literal arguments
                args = (*args[0].encode().split(), *args[1:])
            elif b" " in args[0]:
                args = (*args[0].split(), *args[1:])
            try:
                return [hiredis.pack_command(args)]
            except TypeError:  # a type hiredis does not pack: the Python packer's error
                return list(super().pack_command(*args))

    Packed.__name__ = Packed.__qualname__ = f"Hiredis{base.__name__}"
    return Packed


class _Cluster(RedisCluster):
    """RedisCluster that routes FCALL by its first key locally.

    redis-py treats FCALL as a movable-keys command and asks the server `COMMAND GETKEYS` on
    every call, doubling round trips; our functions always carry their keys, and all keys of
    one call share a slot, so the first key decides the node.
    """

    async def _determine_slot(self, command: str, *args: Any) -> int:
        if str(command).upper() in ("FCALL", "FCALL_RO") and len(args) >= 3 and int(args[1]) > 0:
            key = args[2]
            return int(key_slot(key if isinstance(key, bytes) else str(key).encode()))
        return int(await super()._determine_slot(command, *args))


def is_transport_error(exc: BaseException) -> bool:
    """Valkey is (for now) unreachable or not serving this slot: worth retrying. Some of these
    are `ResponseError` subclasses in redis-py (CLUSTERDOWN, TRYAGAIN, READONLY from a primary
    just demoted to a replica), so callers test this before treating a reply error as final;
    during a failover the Cluster client also gives up with "slot not covered" or "TTL
    exhausted" (ClusterError) until it has re-read the slot map."""
    return isinstance(
        exc,
        rexc.ConnectionError
        | rexc.TimeoutError
        | rexc.BusyLoadingError
        | rexc.ClusterDownError
        | rexc.TryAgainError
        | rexc.ReadOnlyError
        | rexc.SlotNotCoveredError
        | rexc.ClusterError
        | OSError,
    ) or _closed_writer_race(exc)


def _closed_writer_race(exc: BaseException) -> bool:
    """A write on a pooled connection closed under it (a peer reset, or the Cluster client
    resetting its connections after CLUSTERDOWN while other commands are in flight) escapes
    redis-py 8.1 as AttributeError/TypeError instead of ConnectionError (redis/redis-py#4287,
    fixed upstream after 8.1). Recognised by where it was raised, inside redis-py's connection
    write, so a bug of our own still surfaces as backend_error."""
    if not isinstance(exc, AttributeError | TypeError):
        return False
    frames = traceback.extract_tb(exc.__traceback__)[-3:]
    return any(Path(f.filename).parts[-3:] == _REDIS_CONNECTION for f in frames)


def parse_version(text: str) -> tuple[int, int, int]:
    """The minimum Valkey version in an `INFO server` body (rejects Redis)."""
    m = re.search(r"^valkey_version:(\d+)\.(\d+)\.(\d+)", text, re.M)
    if not m and re.search(r"^server_name:valkey", text, re.M):
        m = re.search(r"^redis_version:(\d+)\.(\d+)\.(\d+)", text, re.M)
    if not m:
        raise ValueError("not a Valkey server (no valkey_version in INFO server)")
    return (int(m.group(1)), int(m.group(2)), int(m.group(3)))


class Store:
    """One logical Valkey (standalone or Cluster) with the flowfabric library loaded."""

    def __init__(
        self,
        client: aioredis.Redis | RedisCluster,
        *,
        cluster: bool,
        library: Library | None = None,
    ) -> None:
        self.client = client
        self.cluster = cluster
        self.library = library or default_library()
        self._reload_lock = asyncio.Lock()
        self.durability = Durability("os")
        self.observer = FcallObserver()  # the metrics' view of each FCALL (valkey/observe.py)

    @classmethod
    def from_url(cls, url: str, *, library: Library | None = None) -> Store:
        """`valkey://`, `valkeys://`, `redis://`, `rediss://`; `?cluster=1` selects Cluster."""
        cluster = "cluster=1" in url or "cluster=true" in url
        norm = re.sub(r"^valkey(s?)://", r"redis\1://", url)
        norm = re.sub(r"[?&]cluster=(1|true)", "", norm)
        common: dict[str, Any] = {
            "socket_connect_timeout": 10,
            "socket_timeout": 5,
            "decode_responses": False,
        }
        client: aioredis.Redis | RedisCluster
        if cluster:
            client = _Cluster.from_url(norm, **common)
        else:
            # A burst beyond the pool waits for a free connection (up to the request timeout)
            # instead of failing at once with "Too many connections".
            pool = aioredis.BlockingConnectionPool.from_url(
                norm, max_connections=MAX_CONNECTIONS, timeout=5, **common
            )
            pool.connection_class = _hiredis_packing(pool.connection_class)
            client = aioredis.Redis.from_pool(pool)  # the client owns (and closes) the pool
        return cls(client, cluster=cluster, library=library)

    @property
    def cluster_client(self) -> RedisCluster:
        """The client as a Cluster client (node routing); only valid when `cluster` is true."""
        if not isinstance(self.client, RedisCluster):
            raise TypeError("not a Valkey Cluster store")
        return self.client

    async def close(self) -> None:
        await self.durability.close()
        await self.client.aclose()

    # -- boot ---------------------------------------------------------------------------------

    async def primaries(self) -> list[Any]:
        if self.cluster:
            return list(self.cluster_client.get_primaries())
        return [None]

    async def _on_each_primary(self, *args: Arg) -> list[Any]:
        if not self.cluster:
            return [await self.client.execute_command(*args)]
        out = []
        for node in self.cluster_client.get_primaries():
            out.append(await self.client.execute_command(*args, target_nodes=node))
        return out

    async def server_version(self) -> tuple[int, int, int]:
        """The lowest version across every primary."""
        bodies = await self._on_each_primary("INFO", "server")
        versions = []
        for body in bodies:
            if isinstance(body, dict):
                text = "\n".join(f"{k}:{v}" for k, v in body.items())
            else:
                text = body.decode() if isinstance(body, bytes) else str(body)
            versions.append(parse_version(text))
        return min(versions)

    async def check_version(self) -> tuple[int, int, int]:
        version = await self.server_version()
        if version < MIN_VALKEY_VERSION:
            want = ".".join(map(str, MIN_VALKEY_VERSION))
            got = ".".join(map(str, version))
            raise RuntimeError(f"Valkey {got} is too old: flowfabric needs Valkey >= {want}")
        return version

    async def durability_problems(self) -> list[str]:
        """Why the primaries cannot keep the configured durability promise right now
        (docs/durability.md#boot-and-health): `fsync` needs appendonly yes + appendfsync always
        on every primary, `replicated` needs N online replicas on every primary."""
        mode, want = self.durability.mode, self.durability.replicas
        if mode == "os":
            return []
        problems = []
        names = [n.name for n in self.cluster_client.get_primaries()] if self.cluster else [""]
        if mode == "fsync":
            configs = await self._on_each_primary("CONFIG", "GET", "append*")
            for name, raw in zip(names, configs, strict=True):
                cfg = config_dict(raw)
                got = (cfg.get("appendonly"), cfg.get("appendfsync"))
                if got != ("yes", "always"):
                    where = f"primary {name}" if name else "the Valkey primary"
                    problems.append(
                        f"{where} runs appendonly {got[0]} / appendfsync {got[1]}; "
                        "FF_DURABILITY=fsync needs appendonly yes and appendfsync always"
                    )
            return problems
        bodies = await self._on_each_primary("INFO", "replication")
        for name, body in zip(names, bodies, strict=True):
            online = online_replicas(body)
            if online < want:
                where = f"primary {name}" if name else "the Valkey primary"
                problems.append(
                    f"{where} has {online} online replicas; FF_DURABILITY=replicated waits for "
                    f"FF_DURABILITY_REPLICAS={want}, so writes answer UNAVAILABLE "
                    "durability_timeout until enough replicas are back"
                )
        return problems

    async def loaded_versions(self) -> list[str | None]:
        out: list[str | None] = []
        nodes = self.cluster_client.get_primaries() if self.cluster else [None]
        for node in nodes:
            kwargs = {"target_nodes": node} if node is not None else {}
            try:
                v = await self.client.execute_command("FCALL", "ff_version", 0, **kwargs)
            except rexc.ResponseError as exc:
                if not _is_not_loaded(exc):
                    raise
                out.append(None)
            else:
                out.append(v.decode() if isinstance(v, bytes) else str(v))
        return out

    async def ensure_library(self) -> bool:
        """Load the library on every primary whose version differs. True if anything loaded."""
        async with self._reload_lock:
            return await self._ensure_library_locked()

    async def _ensure_library_locked(self) -> bool:
        versions = await self.loaded_versions()
        if all(v == self.library.version for v in versions):
            return False
        for attempt in range(3):
            try:
                await self._on_each_primary("FUNCTION", "LOAD", "REPLACE", self.library.source)
                break
            except rexc.ResponseError:
                raise  # a compile error is fatal, not transient
            except Exception as exc:
                if attempt == 2 or not is_transport_error(exc):
                    raise
                await asyncio.sleep(1)
        versions = await self.loaded_versions()
        if any(v != self.library.version for v in versions):
            raise RuntimeError(f"library version mismatch after load: {versions}")
        log.info("loaded Functions library flowfabric %s", self.library.version)
        return True

    # -- calls --------------------------------------------------------------------------------

    async def fcall(
        self,
        name: str,
        keys: Sequence[str],
        args: Sequence[Arg],
        *,
        read_only: bool = False,
        durable: bool = True,
    ) -> Any:
        """Run one function (FCALL_RO when `read_only`: the function is registered
        `no-writes`); reload the library once if it is missing, then retry once. A writing call
        (`durable` unless it acknowledges nobody) returns once the durability mode's wait is
        met, or raises `durability_timeout` with the transition applied."""
        if read_only or not durable or not self.durability.waits or not keys or exempt():
            return await self._fcall(name, keys, args, read_only)
        node = self._node_name(keys[0])
        waiter, conn = await self.durability.before_write(node, lambda: self._address(node))
        raw = await self._fcall(name, keys, args, read_only)
        if self._node_name(keys[0]) != node:
            conn = None  # redirected while in flight: its waiter never saw this node's write
        await self.durability.after_write(waiter, conn, keys[0])
        return raw

    async def _fcall(
        self, name: str, keys: Sequence[str], args: Sequence[Arg], read_only: bool
    ) -> Any:
        try:
            return await self._raw_fcall(name, keys, args, read_only)
        except rexc.ResponseError as exc:
            if not _is_not_loaded(exc):
                raise _reply_error(exc) from exc
        except Exception as exc:
            raise _transport(exc) from exc
        log.critical("function %s not loaded (failover or keyspace reset?); reloading", name)
        try:
            await self.ensure_library()
        except Exception as exc:
            raise FlowFabricError(
                "library_reload_failed", message=f"reloading the Functions library failed: {exc}"
            ) from exc
        try:
            return await self._raw_fcall(name, keys, args, read_only)
        except rexc.ResponseError as exc:
            raise _reply_error(exc) from exc
        except Exception as exc:
            raise _transport(exc) from exc

    def _node_name(self, key: str) -> str:
        """The primary that owns `key` in the client's current view (standalone: the one)."""
        if not self.cluster:
            return "standalone"
        node = self.cluster_client.get_node_from_key(key)
        return "" if node is None else str(node.name)

    def _address(self, node: str) -> NodeAddress:
        if not self.cluster:
            pool = self.client.connection_pool  # type: ignore[union-attr]
            return address_from_pool(node, pool)
        found = self.cluster_client.get_node(node_name=node)
        if found is None:
            raise FlowFabricError("backend_unavailable", message=f"{node} left the cluster")
        return address_from_pool(node, found)

    async def _raw_fcall(
        self, name: str, keys: Sequence[str], args: Sequence[Arg], read_only: bool = False
    ) -> Any:
        command = "FCALL_RO" if read_only else "FCALL"
        return await self.client.execute_command(command, name, len(keys), *keys, *args)

    async def call(self, *args: Arg) -> Any:
        """A plain command (class C reads), with transport errors mapped."""
        try:
            return await self.client.execute_command(*args)
        except rexc.ResponseError as exc:
            raise _reply_error(exc) from exc
        except Exception as exc:
            raise _transport(exc) from exc

    def pipeline(self) -> Any:
        return self.client.pipeline(transaction=False)

    async def run_pipeline(self, pipe: Any) -> list[Any]:
        try:
            return list(await pipe.execute())
        except rexc.ResponseError as exc:
            raise _reply_error(exc) from exc
        except Exception as exc:
            raise _transport(exc) from exc

    async def time_ms(self) -> int:
        """Valkey's clock in ms (every partition's node shares it closely enough: functions
        re-check). In a cluster, the first primary's."""
        if self.cluster:
            node = self.cluster_client.get_primaries()[0]
            try:
                sec, usec = await self.client.execute_command("TIME", target_nodes=node)
            except Exception as exc:  # mapped as `call` does, so scanners retry next cycle
                raise _transport(exc) from exc
        else:
            sec, usec = await self.call("TIME")
        return int(sec) * 1000 + int(usec) // 1000

    async def ping(self) -> bool:
        try:
            return bool(await self.client.ping())
        except Exception:
            return False


async def server_time_ms(store: Store) -> int:
    """Valkey's clock in ms (`Store.time_ms`)."""
    return await store.time_ms()


def online_replicas(info: Any) -> int:
    """Replicas in state `online` in an INFO replication reply (text or parsed dict)."""
    if isinstance(info, dict):
        return sum(
            1
            for k, v in info.items()
            if str(k).startswith("slave") and isinstance(v, dict) and v.get("state") == "online"
        )
    body = _s(info)
    return sum(
        1 for line in body.splitlines() if re.match(r"^slave\d+:", line) and "state=online" in line
    )


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _is_not_loaded(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(marker in text for marker in _NOT_LOADED)


def _reply_error(exc: rexc.ResponseError) -> FlowFabricError:
    """A reply error: retryable when it is a cluster state error (see `is_transport_error`)."""
    if is_transport_error(exc):
        return _transport(exc)
    return FlowFabricError("backend_error", message=str(exc))


def _transport(exc: BaseException) -> FlowFabricError:
    if isinstance(exc, FlowFabricError):
        return exc
    if isinstance(exc, rexc.TimeoutError | asyncio.TimeoutError):
        return FlowFabricError("backend_timeout", message=f"Valkey timed out: {exc}")
    if is_transport_error(exc):
        return FlowFabricError(
            "backend_unavailable", message=f"Valkey is unavailable: {exc}", retry_after_ms=1000
        )
    return FlowFabricError("backend_error", message=f"Valkey error: {exc}")
