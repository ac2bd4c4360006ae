"""Declarations of the Valkey Functions, and the one builder that calls them.

A `Decl` is data: the function's name, its KEYS by key-schema name (resolved through
`valkey/keys.py` from a small `KeyCtx`), its ARGV by name with an encoding each, whether it is
read-only (sent as FCALL_RO), and its reply variants (OK / ALREADY_SATISFIED / DUPLICATE), each
decoded into a frozen record. `build` turns a declaration and values into (KEYS, ARGV); `call`
runs them through `Store.fcall` and decodes the reply, raising `FlowFabricError` for error
replies exactly as `codec.decode` does.

KEYS marked (*) in a function's header are built by the function itself from the tag of
KEYS[1]; they are declared `routed(...)` and sent as the `ff:noop:{p}` placeholder, which only
keeps the call single-slot.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from flowfabric.server.valkey.codec import Reply, decode, text
from flowfabric.server.valkey.errors import FlowFabricError
from flowfabric.server.valkey.ids import ExecutionId
from flowfabric.server.valkey.keys import (
    BudgetKeys,
    ExecKeys,
    FlowKeys,
    PartitionKeys,
    QuotaKeys,
    ScheduleKeys,
    WaitpointKeys,
)
from flowfabric.server.valkey.store import Store

R = TypeVar("R")

# -- inputs shared by several domains ------------------------------------------------------------


@dataclass(frozen=True)
class Fence:
    """The lease fence (lease id, epoch, attempt id); all empty = unfenced."""

    lease_id: str = ""
    lease_epoch: int | None = None
    attempt_id: str = ""

    def values(self) -> dict[str, object]:
        return {
            "lease_id": self.lease_id,
            "lease_epoch": self.lease_epoch,
            "attempt_id": self.attempt_id,
        }


@dataclass(frozen=True)
class Claimer:
    """Who claims: worker pool, process, lane and advertised capabilities (sorted CSV)."""

    worker_id: str
    worker_instance_id: str
    lane_id: str
    capabilities_csv: str = ""
    capability_hash: str = ""


@dataclass(frozen=True)
class Leased:
    """A lease reply: `OK lease_id epoch expires_at attempt_id attempt_index attempt_type`."""

    lease_id: str
    lease_epoch: int
    lease_expires_at: int
    attempt_id: str
    attempt_index: int
    attempt_type: str = ""


@dataclass(frozen=True)
class Outcome:
    """A reply whose only value is a status word (`OK completed`, `ALREADY_SATISFIED not_due`)."""

    outcome: str = ""


# -- keys ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyCtx:
    """What a declaration's keys are resolved from."""

    eid: ExecutionId | None = None
    tag: str = ""
    lane: str = ""
    worker_instance_id: str = ""
    waitpoint_id: str = ""
    attempt_index: int = 0
    namespace: str = ""
    idempotency_key: str = ""
    signal_id: str = ""
    flow_id: str = ""
    budget_id: str = ""
    quota_policy_id: str = ""
    concurrency_key: str = ""  # a quota policy's concurrency key (its bucket)
    schedule_id: str = ""

    @property
    def exec(self) -> ExecKeys:
        if self.eid is None:
            raise ValueError("this declaration needs an execution id")
        return ExecKeys(self.eid)

    @property
    def part(self) -> PartitionKeys:
        return PartitionKeys(self.tag or self.exec.tag)

    @property
    def wp(self) -> WaitpointKeys:
        return WaitpointKeys(self.part.tag, self.waitpoint_id)

    @property
    def flow(self) -> FlowKeys:
        return FlowKeys(self.part.tag, self.flow_id)

    @property
    def schedule(self) -> ScheduleKeys:
        return ScheduleKeys(self.tag, self.schedule_id)

    @property
    def budget(self) -> BudgetKeys:
        return BudgetKeys(self.tag, self.budget_id)

    @property
    def quota(self) -> QuotaKeys:
        return QuotaKeys(self.tag, self.quota_policy_id, self.concurrency_key)


@dataclass(frozen=True)
class Key:
    """One KEYS slot: its key-schema name and how it is resolved."""

    name: str
    resolve: Callable[[KeyCtx], str]
    routing_only: bool = False


def ek(attr: str) -> Key:
    """A per-execution key (`ExecKeys.<attr>`)."""
    return Key(f"exec.{attr}", lambda c: str(getattr(c.exec, attr)))


def pk(attr: str) -> Key:
    """A per-partition index (`PartitionKeys.<attr>`)."""
    return Key(f"part.{attr}", lambda c: str(getattr(c.part, attr)))


def fk(attr: str) -> Key:
    """A flow key (`FlowKeys.<attr>`)."""
    return Key(f"flow.{attr}", lambda c: str(getattr(c.flow, attr)))


def lane(which: str) -> Key:
    return Key(f"lane.{which}", lambda c: c.part.lane(c.lane, which))


def routed(name: str) -> Key:
    """A key the function builds itself from KEYS[1]'s tag: only a routing placeholder."""
    return Key(name, lambda c: c.part.noop, routing_only=True)


def key(name: str, resolve: Callable[[KeyCtx], str]) -> Key:
    return Key(name, resolve)


# -- argv ----------------------------------------------------------------------------------------

Enc = Literal["str", "int", "opt_int", "bytes", "json", "bool"]
_REQUIRED = object()


@dataclass(frozen=True)
class Arg:
    """One ARGV slot (or, `variadic`, the tail: a sequence of str/bytes items)."""

    name: str
    enc: Enc = "str"
    default: object = _REQUIRED
    variadic: bool = False


def arg(name: str, enc: Enc = "str", default: object = _REQUIRED) -> Arg:
    return Arg(name, enc, default)


def opt(name: str) -> Arg:
    """An optional integer: None -> ""."""
    return Arg(name, "opt_int", None)


def tail(name: str) -> Arg:
    return Arg(name, "str", (), variadic=True)


@dataclass(frozen=True)
class Raw:
    """A value sent verbatim, bypassing its encoding (tests' deliberately malformed calls)."""

    value: str | bytes


def _encode(a: Arg, value: object) -> list[str | bytes]:
    if isinstance(value, Raw):
        return [value.value]
    if a.variadic:
        assert isinstance(value, Sequence) and not isinstance(value, str | bytes), a.name
        return [v.value if isinstance(v, Raw) else _scalar(v) for v in value]
    if a.enc == "bytes":
        return [value if isinstance(value, bytes) else text(value).encode()]
    if a.enc == "int":
        assert isinstance(value, int), f"{a.name}: int expected"
        return [str(value)]
    if a.enc == "opt_int":
        assert value is None or isinstance(value, int), f"{a.name}: int or None expected"
        return ["" if value is None else str(value)]
    if a.enc == "json":
        return [json.dumps(value, sort_keys=True)]
    if a.enc == "bool":
        return ["1" if value else "0"]
    return [text(value)]


def _scalar(v: object) -> str | bytes:
    return v if isinstance(v, bytes) else text(v)


# -- replies -------------------------------------------------------------------------------------

Decoder = Callable[[Reply], R]


def record(cls: type[R]) -> Decoder[R]:
    """Decode a reply's values positionally into the dataclass `cls` by its field types:
    str, int, int | None ("" = None), bytes, tuple[str, ...] (the rest of the reply). A slot
    past the end of the reply takes the field's default."""
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]

    def dec(reply: Reply) -> R:
        out: dict[str, Any] = {}
        for i, f in enumerate(fields):
            hint = hints[f.name]
            if i >= len(reply.values) and f.default is not dataclasses.MISSING:
                continue
            if hint is str:
                out[f.name] = reply.str(i)
            elif hint is int:
                out[f.name] = reply.int(i)
            elif hint is bytes:
                out[f.name] = reply.raw(i)
            elif _is_opt_int(hint):
                out[f.name] = reply.int(i) if reply.str(i) else None
            elif typing.get_origin(hint) is tuple:
                out[f.name] = tuple(text(v) for v in reply.values[i:])
            else:  # pragma: no cover - a declaration bug
                raise TypeError(f"{cls.__name__}.{f.name}: undecodable type {hint}")
        return cls(**out)

    return dec


def _is_opt_int(hint: object) -> bool:
    return isinstance(hint, types.UnionType) and set(typing.get_args(hint)) == {int, type(None)}


# -- the declaration and the builder -------------------------------------------------------------


@dataclass(frozen=True)
class Decl(Generic[R]):
    """One Valkey Function: KEYS, ARGV, read-only flag and reply variants. `durable=False`
    marks a writing function whose reply acknowledges nobody (a claim grant, consumed by the
    claim that follows on the same partition, whose durability wait covers it):
    docs/durability.md#what-waits."""

    name: str
    keys: tuple[Key, ...]
    argv: tuple[Arg, ...]
    replies: Mapping[str, Decoder[R]]
    read_only: bool = False
    durable: bool = True

    @property
    def variadic(self) -> bool:
        return bool(self.argv) and self.argv[-1].variadic


def build(
    decl: Decl[Any],
    ctx: KeyCtx,
    values: Mapping[str, object],
    *,
    keys: Sequence[str] | None = None,
    extra_argv: Sequence[str | bytes] = (),
) -> tuple[list[str], list[str | bytes]]:
    """(KEYS, ARGV) for one call. `keys` replaces the resolved KEYS and `extra_argv` is appended
    verbatim: override hooks for tests that make deliberately malformed calls."""
    unknown = set(values) - {a.name for a in decl.argv}
    if unknown:
        raise TypeError(f"{decl.name}: not arguments: {sorted(unknown)}")
    argv: list[str | bytes] = []
    for a in decl.argv:
        value = values.get(a.name, a.default)
        if value is _REQUIRED:
            raise TypeError(f"{decl.name}: missing argument {a.name}")
        argv += _encode(a, value)
    resolved = list(keys) if keys is not None else [k.resolve(ctx) for k in decl.keys]
    return resolved, argv + list(extra_argv)


def decode_reply(decl: Decl[R], raw: Any) -> R:
    reply = decode(raw, decl.name)
    dec = decl.replies.get(reply.status)
    if dec is None:
        raise FlowFabricError(
            "protocol_error", message=f"{decl.name}: undeclared reply {reply.status}"
        )
    return dec(reply)


async def call(store: Store, decl: Decl[R], ctx: KeyCtx, values: Mapping[str, object]) -> R:
    """Build, FCALL (FCALL_RO for a read-only declaration) and decode one call."""
    keys, argv = build(decl, ctx, values)
    with store.observer.timed(decl.name):
        raw = await store.fcall(
            decl.name, keys, argv, read_only=decl.read_only, durable=decl.durable
        )
    reply = decode_reply(decl, raw)
    store.observer.replied(decl.name, ctx, values, reply)
    return reply


@dataclass(frozen=True)
class Batch(Generic[R]):
    """A batched Function: several calls of `single`, all on one partition, in one FCALL
    (docs/lifecycle.md#batched-functions). Its ARGV is the KEYS and ARGV count of one item, then
    the items' ARGV; its KEYS the items' KEYS; its reply the items' replies in order."""

    name: str
    single: Decl[R]


async def call_batch(
    store: Store,
    batch: Batch[R],
    items: Sequence[tuple[KeyCtx, Mapping[str, object]]],
    *,
    stop_at_error: bool = False,
) -> list[R | FlowFabricError]:
    """One FCALL for `items` (each a KeyCtx and values, all of one partition): per item, its
    decoded reply or the `FlowFabricError` its error reply carries, in order. With
    `stop_at_error` (a function that stops at its first error) the list may end early, at that
    error."""
    # a variadic tail is fine as long as every item's is as long (one stride for each_item)
    assert items, batch.name
    keys: list[str] = []
    argv: list[str | bytes] = []
    counts: tuple[int, int] | None = None
    for ctx, values in items:
        k, a = build(batch.single, ctx, values)
        assert counts in (None, (len(k), len(a))), batch.name
        counts = (len(k), len(a))
        keys += k
        argv += a
    assert counts is not None
    head: list[str | bytes] = [str(counts[0]), str(counts[1])]
    with store.observer.timed(batch.name):
        raw = await store.fcall(batch.name, keys, head + argv, durable=batch.single.durable)
    if isinstance(raw, list) and raw and not isinstance(raw[0], list):
        decode(raw, batch.name)  # the batch's own error reply: raised
    complete = isinstance(raw, list) and (
        len(raw) == len(items) or (stop_at_error and 0 < len(raw) < len(items))
    )
    if not complete:
        raise FlowFabricError("protocol_error", message=f"{batch.name}: malformed reply {raw!r}")
    out: list[R | FlowFabricError] = []
    for one in raw:
        try:
            out.append(decode_reply(batch.single, one))
        except FlowFabricError as exc:
            out.append(exc)
    store.observer.replied_batch(batch.single.name, items, out)
    return out


def exec_ctx(eid: ExecutionId, **more: Any) -> KeyCtx:
    return KeyCtx(eid=eid, tag=eid.tag, **more)


def ok(dec: Decoder[R]) -> dict[str, Decoder[R]]:
    return {"OK": dec}
