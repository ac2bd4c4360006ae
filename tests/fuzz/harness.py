"""The fuzz harness: a server child process, keyspace snapshots, one generic RPC caller, the
setup step that fills the plausible-value pools, and the per-RPC tally.

Used by tests/fuzz/test_fuzz.py (the CI-sized run) and scripts/fuzz.py (long runs); the design
is in docs/reliability.md#fuzzing.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import select
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import text_format
from google.rpc import error_details_pb2, status_pb2
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from flowfabric.server.engine.keystore import install_secret
from flowfabric.server.valkey.functions import Functions
from flowfabric.server.valkey.keys import PARTITION_CONFIG
from flowfabric.server.valkey.store import Store
from flowfabric.v1 import execution_pb2 as epb
from flowfabric.v1 import types_pb2 as t
from flowfabric.v1 import worker_pb2 as wpb
from tests.fuzz import server_proc
from tests.fuzz.rpcs import Rpc, all_rpcs
from tests.fuzz.strategies import Pools, condition, derived, requests

ROOT = Path(__file__).resolve().parents[2]
METADATA = (("authorization", f"Bearer {server_proc.API_TOKEN}"),)

# Per-call deadlines. A unary RPC that needs more than UNARY_TIMEOUT_S counts as a hang; the
# long-poll RPCs may wait up to 30 s by contract, so DEADLINE_EXCEEDED is a fine end for them.
UNARY_TIMEOUT_S = 10.0
LONG_POLL_TIMEOUT_S = 1.0
LONG_POLL = {"WorkerService.ClaimNext", "WorkerService.CompleteExecutions"}
# Server streams: read at most this many messages, give up after this much silence, cancel.
STREAM_MAX_MESSAGES = 5
STREAM_IDLE_S = 0.1
STREAM_TIMEOUT_S = 3.0
# Client-side ends: nothing to conclude about what the server wrote.
CLIENT_ENDED = {grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED}
# Hypothesis examples per distinct request sent: the run ends at `count` requests or when this
# budget is spent (a generated example is a duplicate about half the time; success adds variants)
EXAMPLES_PER_REQUEST = 3
# One example (snapshots, the call, its checks) in seconds: past it the run stops, as a hang.
EXAMPLE_TIMEOUT_S = 60.0
# A fresh keyspace every this many examples (pools of valid leases go stale as requests consume
# them), or sooner when the keyspace grows past the key bound.
RESET_EVERY = 120
RESET_KEYS = 3000

# Keys the server may write while a refused request is in flight without that request being
# the writer. With the scanners off (server_proc) nothing writes in the background, so the only
# entries are about time: a key whose TTL ran out between the two snapshots (claim grants, the
# worker alive key, idempotency keys) is expired, not deleted; see Keyspace.diff.
BACKGROUND_KEY_PREFIXES: tuple[str, ...] = ()
# Refusals whose write is part of the contract: a lease found expired by a write path is first
# marked expired (the lease-expiry scanner's transition, done early; the scanner is off here),
# and that marking is kept behind the `lease_expired` reply. Only its keys may change: the
# execution core, the lease history and the attempt stream's close marker.
# And a signal refused for its token stamps `last_hmac_validation_failed_at` on the execution
# core (an audit trail of token guessing; keystore faults are the server's and stamp nothing).
_CORE = rb"^ff:exec:\{fp:\d+\}:.*:core$"
_EXPIRY_MARKING = rb"^ff:(exec:\{fp:\d+\}:.*:(core|lease:history)|stream:\{fp:\d+\}:.*:meta)$"
KEPT_ON_REFUSAL = {
    "lease_expired": re.compile(_EXPIRY_MARKING),
    "missing_token": re.compile(_CORE),
    "invalid_token": re.compile(_CORE),
    "token_expired": re.compile(_CORE),
}


# -- the server under fuzz --------------------------------------------------------------------


class ServerProcess:
    """tests/fuzz/server_proc.py as a child: start, ask for its memory, stop."""

    def __init__(self, valkey_url: str, log_path: Path) -> None:
        self.valkey_url = valkey_url
        self.log_path = log_path
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0

    def start(self) -> ServerProcess:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.fuzz.server_proc", self.valkey_url],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        log.close()
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"fuzz server did not start:\n{self.log_path.read_text()}")
        self.port = int(json.loads(line)["port"])
        return self

    def memory(self) -> dict[str, int]:
        """The server's Python heap (after a full collection) and RSS, in bytes."""
        return dict(self.command("mem"))

    def command(self, name: str) -> dict[str, Any]:
        """One server_proc command; its JSON answer."""
        assert self.proc is not None and self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(name + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], 90)
        if not ready:
            raise RuntimeError(f"the fuzz server did not answer {name!r} within 90 s")
        return dict(json.loads(self.proc.stdout.readline()))

    def unexpected_errors(self) -> int:
        return self.log_path.read_text(errors="replace").count("unexpected error in")

    def stop(self) -> None:
        if self.proc is None:
            return
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        if self.proc.stdout:
            self.proc.stdout.close()
        self.proc = None


# -- keyspace snapshots -----------------------------------------------------------------------


@dataclass
class Snapshot:
    """Every key: (sha1 of DUMP, absolute expiry ms or -1), plus the Valkey time it was taken."""

    keys: dict[bytes, tuple[bytes, int]]
    time_ms: int


class Keyspace:
    """Byte-for-byte snapshots of the whole keyspace (every primary on Cluster)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def _keys(self) -> list[bytes]:
        client: Any = self.store.client
        # on Cluster, scan_iter walks every primary
        return [key async for key in client.scan_iter(count=1000)]

    async def snapshot(self) -> Snapshot:
        keys = await self._keys()
        pipe = self.store.client.pipeline(transaction=False)
        for key in keys:
            pipe.execute_command("DUMP", key)
            pipe.execute_command("PEXPIRETIME", key)
        replies = await pipe.execute() if keys else []
        now = await self.store.time_ms()
        out = {}
        for i, key in enumerate(keys):
            dump, expires = replies[2 * i], replies[2 * i + 1]
            if dump is not None:  # gone (or expired) between SCAN and DUMP
                out[key] = (hashlib.sha1(dump).digest(), int(expires))
        return Snapshot(out, now)

    @staticmethod
    def diff(before: Snapshot, after: Snapshot, kept: re.Pattern[bytes] | None = None) -> list[str]:
        """What changed, ignoring keys that merely reached their expiry time in between (and
        keys matching `kept`)."""
        changes = []
        for key in before.keys.keys() | after.keys.keys():
            if key.startswith(BACKGROUND_KEY_PREFIXES) or (kept and kept.match(key)):
                continue
            old, new = before.keys.get(key), after.keys.get(key)
            if old == new:
                continue
            if new is None and old is not None and 0 <= old[1] <= after.time_ms + 5:
                continue  # expired
            what = "added" if old is None else "deleted" if new is None else "changed"
            if old and new and old[0] == new[0]:
                what = f"ttl {old[1]} -> {new[1]}"
            changes.append(f"{key.decode(errors='replace')}: {what}")
        return sorted(changes)

    async def size(self) -> int:
        client: Any = self.store.client
        if self.store.cluster:
            total = 0
            for node in client.get_primaries():
                total += await client.execute_command("DBSIZE", target_nodes=node)
            return total
        return int(await client.execute_command("DBSIZE"))

    async def reset(self) -> None:
        """An empty keyspace as a fresh boot leaves it: partition config and HMAC keystore."""
        client: Any = self.store.client
        nodes = client.get_primaries() if self.store.cluster else [None]
        for node in nodes:
            kwargs = {"target_nodes": node} if node is not None else {}
            await client.execute_command("FLUSHALL", **kwargs)
        await client.hset(
            PARTITION_CONFIG,
            mapping={
                "num_flow_partitions": str(server_proc.FLOW_PARTITIONS),
                "num_budget_partitions": "32",
                "num_quota_partitions": "32",
            },
        )
        fn = Functions(self.store, server_proc.HMAC_SECRET)
        await install_secret(fn.keystore, server_proc.FLOW_PARTITIONS, server_proc.HMAC_SECRET)


# -- calling any RPC --------------------------------------------------------------------------


@dataclass
class Result:
    code: grpc.StatusCode
    reason: str = ""
    details: str = ""
    responses: list[Any] = field(default_factory=list)
    client_ended: bool = False  # we cancelled a stream that was still going
    metadata: dict[str, str] = field(default_factory=dict)  # the ErrorInfo's
    label: str = ""  # for the tally, when not the status code's name


def _error_info(metadata: Any) -> error_details_pb2.ErrorInfo:
    for key, value in metadata or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info
    return error_details_pb2.ErrorInfo()


def _failed(code: grpc.StatusCode, trailers: Any, details: str | None, got: list[Any]) -> Result:
    info = _error_info(trailers)
    return Result(code, info.reason, details or "", got, metadata=dict(info.metadata))


async def invoke(channel: grpc.aio.Channel, rpc: Rpc, request: Any) -> Result:
    codec = {
        "request_serializer": rpc.request.SerializeToString,
        "response_deserializer": rpc.response.FromString,
    }
    try:
        if rpc.server_streaming:
            return await _read_stream(
                channel.unary_stream(rpc.path, **codec)(
                    request, metadata=METADATA, timeout=STREAM_TIMEOUT_S
                )
            )
        timeout = LONG_POLL_TIMEOUT_S if rpc.label in LONG_POLL else UNARY_TIMEOUT_S
        if rpc.client_streaming:
            call: Any = channel.stream_unary(rpc.path, **codec)(
                iter(request), metadata=METADATA, timeout=timeout
            )
        else:
            call = channel.unary_unary(rpc.path, **codec)(
                request, metadata=METADATA, timeout=timeout
            )
        reply = await call
        return Result(grpc.StatusCode.OK, responses=[reply])
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.INTERNAL and "execute_batch" in (
            exc.debug_error_string() or ""
        ):
            # The client library's own failure to send the rest of a client stream after the
            # server ended the call (it answered RESOURCE_EXHAUSTED for an oversized message):
            # the status never came from the server.
            return Result(
                grpc.StatusCode.CANCELLED,
                details="client send failed",
                client_ended=True,
                label="CLIENT_SEND_FAILED",
            )
        return _failed(exc.code(), exc.trailing_metadata(), exc.details(), [])


async def _read_stream(call: Any) -> Result:
    got: list[Any] = []
    while len(got) < STREAM_MAX_MESSAGES:
        try:
            msg = await asyncio.wait_for(call.read(), STREAM_IDLE_S)
        except TimeoutError:
            break
        if msg is grpc.aio.EOF:
            code = await call.code()
            return _failed(code, await call.trailing_metadata(), await call.details(), got)
        got.append(msg)
    call.cancel()
    return Result(grpc.StatusCode.CANCELLED, responses=got, client_ended=True)


# -- the setup step: objects in every state, for plausible ids --------------------------------


class World:
    """Creates executions in the interesting states and feeds the pools with their ids."""

    def __init__(self, channel: grpc.aio.Channel, pools: Pools) -> None:
        self.channel = channel
        self.pools = pools
        self.rpcs = {r.label: r for r in all_rpcs()}

    async def call(self, label: str, request: Any) -> Any:
        result = await invoke(self.channel, self.rpcs[label], request)
        assert result.code == grpc.StatusCode.OK, (label, result)
        for reply in result.responses:
            harvest(self.pools, request, reply)
        return result.responses[0]

    async def create(self, **fields: Any) -> str:
        fields.setdefault("execution_kind", "demo")
        fields.setdefault("lane_id", "L")
        reply = await self.call(
            "ExecutionService.CreateExecution", epb.CreateExecutionRequest(**fields)
        )
        return str(reply.created.execution_id)

    async def claim(self, instance: str = "w-1") -> t.LeaseHandle:
        reply = await self.call(
            "WorkerService.ClaimNext",
            wpb.ClaimNextRequest(
                worker_id="w", worker_instance_id=instance, lane_ids=["L"], lease_ttl_ms=600_000
            ),
        )
        assert reply.WhichOneof("outcome") == "task", reply
        return reply.task.lease

    async def build(self, now_ms: int) -> None:
        self.pools.clear()
        self.pools.now_ms = now_ms
        for instance in ("w-1", "w-2"):
            await self.call(
                "WorkerService.RegisterWorker",
                wpb.RegisterWorkerRequest(
                    worker_id="w",
                    worker_instance_id=instance,
                    capabilities=["gpu"],
                    lane_ids=["L"],
                    lease_ttl_ms=600_000,
                ),
            )
        for i in range(8):
            await self.create(
                input_payload=b'{"i":%d}' % i,
                tags={"app.n": str(i)},
                policy_json='{"retry_policy":{"max_retries":1}}',
            )
        leases = [await self.claim("w-1" if i % 2 else "w-2") for i in range(5)]
        # a pending waitpoint on lease 0
        await self.call(
            "WorkerService.CreatePendingWaitpoint",
            wpb.CreatePendingWaitpointRequest(lease=leases[0], expires_in_ms=600_000),
        )
        # lease 1 suspended on signal "a"
        await self.call(
            "WorkerService.Suspend",
            wpb.SuspendRequest(
                lease=leases[1],
                reason_code="waiting_for_signal",
                resume_condition_json=condition("a"),
                timeout_in_ms=600_000,
            ),
        )
        # frames on lease 2's attempt
        for n in range(3):
            await self.call(
                "WorkerService.AppendFrame",
                wpb.AppendFrameRequest(lease=leases[2], frame_type="text", payload=b"frame %d" % n),
            )
        # lease 3 completed (a result to read, a terminal execution to replay)
        await self.call(
            "WorkerService.CompleteExecution",
            wpb.CompleteExecutionRequest(lease=leases[3], result_payload=b'{"ok":true}'),
        )
        # a cancelled one and a delayed one, and a claim grant for a waiting one
        cancelled = await self.create(lane_id="default")
        await self.call(
            "ExecutionService.CancelExecution",
            epb.CancelExecutionRequest(execution_id=cancelled, reason="fuzz"),
        )
        await self.create(delay_until=now_ms + 3_600_000)
        waiting = await self.create(lane_id="default")
        await self.call(
            "WorkerService.ClaimForWorker",
            wpb.ClaimForWorkerRequest(
                execution_id=waiting,
                lane_id="default",
                worker_id="w",
                worker_instance_id="w-1",
                grant_ttl_ms=60_000,
            ),
        )


def harvest(pools: Pools, request: Any, reply: Any) -> None:
    """Feed the pools from a successful reply: leases (and their fences), ids, tokens, grants."""
    found: dict[str, Any] = {}
    for msg in _walk(reply):
        name = msg.DESCRIPTOR.name
        if name == "LeaseHandle" and msg.lease_id:
            _add_lease(pools, msg)
        elif name == "ClaimGrant" and msg.grant_key:
            pools.add("grant", _copy(msg))
        for f, value in msg.ListFields():
            if f.type == f.TYPE_STRING and not f.is_repeated:
                found.setdefault(f.name, value)
    for name in (
        "execution_id",
        "waitpoint_id",
        "waitpoint_token",
        "waitpoint_key",
        "suspension_id",
        "signal_id",
        "lease_id",
        "attempt_id",
    ):
        if name in found:
            pools.add(name, found[name])
    for name, kind in (
        ("next_page_token", "page_token"),
        ("entry_id", "stream_id"),
        ("current_kid", "kid"),
        ("new_kid", "kid"),
    ):
        if name in found:
            pools.add(kind, found[name])
    if "waitpoint_token" in found:
        lease = getattr(request, "lease", None)
        anchor = dict(found)
        if lease is not None and lease.lease_id:
            anchor.update(_lease_fields(lease))
        anchor.setdefault("execution_id", getattr(request, "execution_id", ""))
        pools.add_anchor(anchor)


def _copy(msg: Any) -> Any:
    out = type(msg)()
    out.CopyFrom(msg)
    return out


def _lease_fields(lease: t.LeaseHandle) -> dict[str, Any]:
    fence = t.LeaseFence(
        lease_id=lease.lease_id, lease_epoch=lease.lease_epoch, attempt_id=lease.attempt_id
    )
    return {
        "lease": _copy(lease),
        "fence": fence,
        "execution_id": lease.execution_id,
        "lane_id": lease.lane_id,
        "worker_id": lease.worker_id,
        "worker_instance_id": lease.worker_instance_id,
        "attempt_index": lease.attempt_index,
        "attempt_id": lease.attempt_id,
        "lease_id": lease.lease_id,
        "lease_epoch": lease.lease_epoch,
    }


def _add_lease(pools: Pools, lease: t.LeaseHandle) -> None:
    fields = _lease_fields(lease)
    pools.add("lease", fields["lease"])
    pools.add("fence", fields["fence"])
    pools.add_anchor(fields)


def _walk(msg: Any) -> Iterable[Any]:
    yield msg
    for f, value in msg.ListFields():
        if f.message_type is None or f.message_type.GetOptions().map_entry:
            continue
        for item in value if f.is_repeated else [value]:
            yield from _walk(item)


# -- the run ----------------------------------------------------------------------------------


@dataclass
class Finding:
    kind: str  # internal | hang | keyspace
    rpc: str
    code: str
    reason: str
    details: str
    request: str
    changes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"[{self.kind}] {self.rpc} -> {self.code} {self.reason}: {self.details[:300]}"]
        lines += [f"    changed {c}" for c in self.changes[:10]]
        lines.append(f"    request: {self.request[:600]}")
        return "\n".join(lines)


def _items(request: Any) -> list[Any]:
    return request if isinstance(request, list) else [request]


def describe(request: Any) -> str:
    items = _items(request)
    parts = []
    for item in items[:3]:
        text = text_format.MessageToString(item, as_one_line=True, as_utf8=True)
        parts.append(text if len(text) < 2000 else text[:2000] + f"... ({len(text)} chars)")
    return " | ".join(parts)


@dataclass
class Tally:
    """Requests and status counts per RPC, and what went wrong."""

    statuses: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    reasons: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    findings: list[Finding] = field(default_factory=list)
    memory: list[tuple[int, dict[str, int]]] = field(default_factory=list)
    examples: int = 0
    resets: int = 0
    compared: int = 0
    duplicates: int = 0  # generated again, not sent again
    derived: int = 0  # variants of successful requests, one field pushed to an extreme
    timing: Counter[str] = field(default_factory=Counter)  # seconds spent, by step
    rpc_time: Counter[str] = field(default_factory=Counter)  # seconds in calls, by RPC
    elapsed_s: float = 0.0

    def count(self, rpc: str, code: str) -> None:
        self.statuses[rpc][code] += 1

    def totals(self) -> Counter[str]:
        out: Counter[str] = Counter()
        for counts in self.statuses.values():
            out.update(counts)
        return out

    def table(self) -> str:
        codes = sorted(self.totals(), key=lambda c: (c != "OK", c))
        short = {c: c.replace("_", "")[:6] for c in codes}
        head = f"{'rpc':<42}{'reqs':>6}" + "".join(f"{short[c]:>8}" for c in codes)
        lines = [head, "-" * len(head)]
        for rpc in sorted(self.statuses):
            counts = self.statuses[rpc]
            row = f"{rpc:<42}{sum(counts.values()):>6}"
            lines.append(row + "".join(f"{counts.get(c, 0):>8}" for c in codes))
        totals = self.totals()
        lines.append("-" * len(head))
        lines.append(
            f"{'total':<42}{sum(totals.values()):>6}" + "".join(f"{totals[c]:>8}" for c in codes)
        )
        lines.append("codes: " + ", ".join(f"{short[c]}={c}" for c in codes))
        return "\n".join(lines)


class Fuzzer:
    """One fuzz run against one server: `await fuzzer.run(count)`."""

    def __init__(self, channel: grpc.aio.Channel, store: Store, server: ServerProcess) -> None:
        self.channel = channel
        self.keyspace = Keyspace(store)
        self.server = server
        self.pools = Pools()
        self.world = World(channel, self.pools)
        self.rpcs = all_rpcs()
        self.tally = Tally()
        self.since_reset = RESET_EVERY
        self.known: Callable[[Rpc, Any, Result], str | None] = lambda rpc, req, res: None
        # requests not to send (the CI run's known defects past their first sighting)
        self.skip: Callable[[Rpc, Any], bool] = lambda rpc, req: False
        self.last: Snapshot | None = None  # the keyspace after the previous call
        self.trace_memory = bool(os.environ.get("FF_FUZZ_TRACE_MEMORY"))
        self.seen: set[bytes] = set()  # requests sent already (hypothesis mutates in runs)
        self.trace = bool(os.environ.get("FF_FUZZ_TRACE"))

    async def fresh(self) -> None:
        started = time.monotonic()
        await self.keyspace.reset()
        await self.world.build(await self.keyspace.store.time_ms())
        self.tally.timing["reset"] += time.monotonic() - started
        self.since_reset = 0
        self.tally.resets += 1

    async def one(self, rpc: Rpc, request: Any) -> None:
        """Send one generated request; when it succeeds, also a few variants of it with one
        integer or list field pushed to an extreme (a valid request one field off)."""
        if not self._fresh_request(rpc, request):
            return
        if self.since_reset >= RESET_EVERY or (
            self.since_reset % 20 == 0 and await self.keyspace.size() > RESET_KEYS
        ):
            await self.fresh()
            self.last = None
        ok = not self.skip(rpc, request) and await self._send(rpc, request)
        if ok and not rpc.client_streaming:
            for variant in derived(request, self.tally.statuses[rpc.label]["OK"]):
                if self._fresh_request(rpc, variant) and not self.skip(rpc, variant):
                    self.tally.derived += 1
                    await self._send(rpc, variant)

    def _fresh_request(self, rpc: Rpc, request: Any) -> bool:
        key = hashlib.sha1(
            rpc.label.encode()
            + b"".join(r.SerializeToString(deterministic=True) for r in _items(request))
        ).digest()
        if key in self.seen:
            self.tally.duplicates += 1
            return False
        self.seen.add(key)
        return True

    async def _send(self, rpc: Rpc, request: Any) -> bool:
        self.since_reset += 1
        before = self.last or await self._snapshot()
        started = time.monotonic()
        result = await invoke(self.channel, rpc, request)
        self.tally.timing["call"] += time.monotonic() - started
        self.tally.rpc_time[rpc.label] += time.monotonic() - started
        self.tally.examples += 1
        label = result.label or result.code.name
        self.tally.count(rpc.label, label)
        self.tally.reasons[rpc.label][result.reason or label] += 1
        for reply in result.responses:
            harvest(
                self.pools, request[0] if isinstance(request, list) and request else request, reply
            )
        if result.code in CLIENT_ENDED:
            # a call we gave up on may still be running on the server: nothing to conclude from
            # it, and the next request's "before" is taken once the server has no call running
            self.last = None
            quiet = await asyncio.to_thread(self.server.command, "idle")
            self.tally.timing["idle"] += quiet["waited_ms"] / 1000
            if quiet["in_flight"]:
                stuck = f"{quiet['in_flight']} handler(s) still running {server_proc.IDLE_WAIT_S} s"
                self._report("stuck", rpc, request, result, f"{stuck} after the caller left", [])
        else:
            # the "after" of this call is the "before" of the next: nothing else writes
            self.last = await self._snapshot()
        self._judge(rpc, request, result, before, self.last)
        return result.code == grpc.StatusCode.OK

    async def _snapshot(self) -> Snapshot:
        started = time.monotonic()
        snap = await self.keyspace.snapshot()
        self.tally.timing["snapshot"] += time.monotonic() - started
        return snap

    def _judge(
        self, rpc: Rpc, request: Any, result: Result, before: Snapshot, after: Snapshot | None
    ) -> None:
        code = result.code
        kind = None
        if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
            kind = "internal"
        elif code == grpc.StatusCode.DEADLINE_EXCEEDED and rpc.label not in LONG_POLL:
            kind = "hang"
        changes: list[str] = []
        # AppendFrames keeps the frames before the one refused, by contract (appended_count)
        partial = result.metadata.get("appended_count", "0") != "0"
        if code != grpc.StatusCode.OK and after is not None and not partial:
            self.tally.compared += 1
            changes = self.keyspace.diff(before, after, KEPT_ON_REFUSAL.get(result.reason))
            if changes and kind is None:
                kind = "keyspace"
        if kind is not None:
            self._report(kind, rpc, request, result, result.details, changes)

    def _report(
        self, kind: str, rpc: Rpc, request: Any, result: Result, details: str, changes: list[str]
    ) -> None:
        known = self.known(rpc, request, result)
        finding = Finding(
            kind if known is None else f"known:{known}",
            rpc.label,
            result.code.name,
            result.reason,
            details,
            describe(request),
            changes,
        )
        self.tally.findings.append(finding)

    def sample_memory(self) -> None:
        self.tally.memory.append((self.tally.examples, self.server.memory()))
        if self.trace_memory:
            if len(self.tally.memory) == 1:
                self.server.command("mark")
            else:
                grown = self.server.command("grown")["grown"]
                print(
                    "heap growth since the first sample, by site:",
                    *grown,
                    sep="\n  ",
                    file=sys.stderr,
                    flush=True,
                )


def drive(
    fuzzer: Fuzzer,
    loop: asyncio.AbstractEventLoop,
    count: int,
    seed_value: int | None,
    on_example: Callable[[int], None] | None = None,
) -> None:
    """Run `count` hypothesis examples in this (non-event-loop) thread, each one RPC on `loop`.

        Examples never raise: findings are tallied, so one run reports every problem at once and
        no shrinking is attempted (the server's state moves on between examples anyway). Hypothesis
        follows each fresh example with a few mutations of it, often the same request again; those
        are not sent twice, and the run is over once `count` distinct requests have been sent (or
    EXAMPLES_PER_REQUEST times as many examples drawn).
    """
    rpcs = fuzzer.rpcs
    strategies = {
        r.label: requests(r.request, fuzzer.pools, streamed=r.client_streaming) for r in rpcs
    }

    @settings(
        max_examples=count * EXAMPLES_PER_REQUEST,
        deadline=None,
        database=None,
        derandomize=seed_value is None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(st.data())
    def example(data: st.DataObject) -> None:
        rpc = rpcs[data.draw(st.integers(0, 1 << 20), label="rpc") % len(rpcs)]
        started = time.monotonic()
        request = data.draw(strategies[rpc.label], label="request")
        fuzzer.tally.timing["generate"] += time.monotonic() - started
        if fuzzer.tally.examples >= count:
            return  # done; drawn all the same, so every example draws alike (hypothesis checks)
        sent = time.monotonic()
        future = asyncio.run_coroutine_threadsafe(fuzzer.one(rpc, request), loop)
        try:
            future.result(timeout=EXAMPLE_TIMEOUT_S)
        except TimeoutError:
            future.cancel()
            raise AssertionError(f"{rpc.label} did not finish: {describe(request)}") from None
        if fuzzer.trace:
            print(
                f"{fuzzer.tally.examples:>6} {time.monotonic() - sent:6.3f}s {rpc.label} "
                f"{describe(request)[:200]}",
                file=sys.stderr,
                flush=True,
            )
        if on_example is not None:
            on_example(fuzzer.tally.examples)

    if seed_value is not None:
        example = seed(seed_value)(example)
    example()


async def run(
    fuzzer: Fuzzer, count: int, seed_value: int | None = None, memory_every: int = 0
) -> Tally:
    """The whole run: memory sampled after the first fifth (warm-up) and at the end."""
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    warm = max(1, count // 5)
    next_sample = [warm]

    def on_example(n: int) -> None:
        if n >= next_sample[0]:
            fuzzer.sample_memory()
            next_sample[0] = n + memory_every if memory_every else count + 1

    await asyncio.to_thread(drive, fuzzer, loop, count, seed_value, on_example)
    if not fuzzer.tally.memory or fuzzer.tally.memory[-1][0] != fuzzer.tally.examples:
        fuzzer.sample_memory()
    fuzzer.tally.elapsed_s = time.monotonic() - started
    return fuzzer.tally
