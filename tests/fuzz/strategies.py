"""Hypothesis strategies for any request message, built from its descriptor alone.

Each field gets one of three treatments, drawn per field: left unset, a *plausible* value (ids of
objects the setup step created, the fence of a real lease, a well-formed condition JSON, a small
duration) or an *extreme* one (integer bounds of the field's type and of the values the server
converts it to, empty / 1-2 MB / unicode / control-character / format-breaking strings, thousands
of repeated items or map entries, enum numbers outside the enum). A request-wide `chaos` level
sets how often a field goes extreme, so some requests are entirely plausible and get deep into
the Lua functions while others are garbage from end to end. Lease-scoped fields of one request
prefer one *anchor* (a lease, a suspension, a pending waitpoint), so its id, fence and token agree
with each other and the fence is sometimes valid.
"""

from __future__ import annotations

import json
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from hypothesis import strategies as st

from tests.fuzz.server_proc import FLOW_PARTITIONS

Draw = Callable[..., Any]
FD = FieldDescriptor

MAX_DEPTH = 4
POOL_MAX = 64

INT_RANGES = {
    FD.TYPE_INT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FD.TYPE_INT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FD.TYPE_UINT32: (0, 2**32 - 1),
    FD.TYPE_FIXED32: (0, 2**32 - 1),
    FD.TYPE_UINT64: (0, 2**64 - 1),
    FD.TYPE_FIXED64: (0, 2**64 - 1),
}
# 2^53 is where Lua's doubles stop being exact integers; 2^63 where Lua integers wrap.
EXTREME_INTS = sorted(
    {0, 1, -1, 2**31 - 1, 2**31, 2**31 + 1, -(2**31), -(2**31) - 1, 2**32 - 1, 2**32}
    | {2**53 - 1, 2**53, 2**53 + 1, -(2**53), 2**63 - 1, 2**63, -(2**63), 2**64 - 1}
)
EXTREME_FLOATS = [0.0, -0.0, float("nan"), float("inf"), float("-inf"), 1e308, -1e308, 5e-324]

# Sizes around the server's request caps (64 KiB control, 1 MiB payload) and gRPC's 2 MiB.
HUGE_SIZES = [256, 4097, 65_000, 65_537, 300_000, 1 << 20, (2 << 20) - 64]
# Past gRPC's receive limit already; bigger requests only cost the fuzzer time.
REQUEST_BYTES_MAX = 3 << 20
UUID0 = "00000000-0000-0000-0000-000000000000"


def _deep_json(n: int) -> str:
    return "[" * n + "]" * n


MALFORMED_STRINGS = [
    "", " ", "\x00", "a\x00b", "\t\r\n", "\x7f", "\x1b[2J", "é", "\u202e", "\ufeff",
    "\U0001f600" * 3, "{", "}", "{}", "[]", "null", "true", '{"a":', '"x"', "{fp:", "{fp:0}",
    "{fp:0}:", f"{{fp:0}}:{UUID0}x", f"{{fp:{FLOW_PARTITIONS}}}:{UUID0}",
    f"{{fp:65536}}:{UUID0}", f"{{fp:-1}}:{UUID0}", "{fp:0}:not-a-uuid", f"{{b:0}}:{UUID0}",
    UUID0, UUID0.upper(), ":", "::", ",", "a,b", "-", "+", "*", "?", "[a-z]", "%s%n", "\\",
    "'", '"', "0", "-0", "-1", "0-0", "1-1", "18446744073709551616", "9223372036854775808",
    "-9223372036854775809", "1e309", "nan", "inf", "0x10", "ff:exec:*", "x" * 257, "x" * 65,
    "k:" + "0" * 40, "k1:" + "g" * 40, _deep_json(200), _deep_json(5000),
    '{"condition_type":"signal_set","required_signal_names":' + _deep_json(3000) + "}",
    json.dumps({"condition_type": "signal_set", "required_signal_names": ["a"] * 5000}),
    json.dumps({"retry_policy": {"max_retries": 2**63, "backoff": {"multiplier": 1e308}}}),
]  # fmt: skip


def new_eid(partition: int, bits: int) -> str:
    """A well-formed execution id no setup step created."""
    return f"{{fp:{partition % FLOW_PARTITIONS}}}:{uuid.UUID(int=bits, version=4)}"


def condition(*names: str, mode: str = "any") -> str:
    body = {"condition_type": "signal_set", "required_signal_names": list(names)}
    return json.dumps({**body, "signal_match_mode": mode})


# Plausible values by field name, beyond what the pools hold. Lists are sampled.
STATIC: dict[str, list[Any]] = {
    "lane_id": ["L", "default"],
    "lane": ["L", "default"],
    "lane_ids": ["L", "default"],
    "worker_id": ["w"],
    "worker_instance_id": ["w-1", "w-2"],
    "capabilities": ["gpu", "cpu"],
    "worker_capabilities": ["gpu", "cpu"],
    "required_capabilities": ["gpu"],
    "namespace": ["ns", ""],
    "execution_kind": ["demo"],
    "creator_identity": ["fuzz"],
    "payload_encoding": ["json", "bytes"],
    "result_encoding": ["json"],
    "encoding": ["json", "text"],
    "resume_condition_json": [
        condition("a"),
        condition("a", "b", mode="all"),
        condition(),
        '{"condition_type":"timer"}',
        "",
    ],
    "resume_policy_json": ["{}", '{"resume_delay_ms":0}', ""],
    "policy_json": ["{}", '{"retry_policy":{"max_retries":1}}', ""],
    "retry_policy_json": ["", '{"max_retries":1}'],
    "next_attempt_policy_json": ["", "{}"],
    "route_snapshot_json": ["{}"],
    "metadata_json": ["{}", '{"k":1}'],
    "reason_code": ["waiting_for_signal", "waiting_for_approval"],
    "requested_by": ["worker", "operator"],
    "timeout_behavior": ["fail", "cancel", "expire", "auto_resume", "escalate", ""],
    "signal_name": ["a", "b"],
    "signal_category": ["approval"],
    "source_type": ["user"],
    "source_identity": ["jane"],
    "frame_type": ["text", "delta", "log"],
    "source": ["worker"],
    "trigger_type": ["operator", "signal"],
    "reason": ["fuzz", ""],
    "failure_reason": ["boom"],
    "failure_category": ["transient", "fatal"],
    "new_kid": ["k2", "kid-fuzz"],
    "new_secret_hex": ["ab" * 32, "00" * 16],
    "after": ["0-0", "0", "1-0"],
    "from_id": ["start", "0-0"],
    "to_id": ["end", "+"],
    "type": ["exponential", "fixed"],
    "isolation_level": ["none"],
    "preferred_locality": ["eu"],
    "durability_mode": ["buffered"],
}
STATIC_INTS: dict[str, list[int]] = {
    "attempt_index": [0, 1],
    "lease_epoch": [1, 2],
    "priority": [0, 5, 100],
    "new_priority": [0, 7],
    "wait_ms": [0, 0, 50],
    "max_tasks": [1, 2],
    "max_in_flight": [1, 2],
    "limit": [1, 10, 1000],
    "batch": [1, 50],
    "partition": [0, 1],
    "partition_id": [0, 1],
    "progress_pct": [0, 50, 100],
    "idle_timeout_ms": [50, 100],
    "count_limit": [1, 100],
    "page_size": [1, 100],
}
# Fields whose pools hold server-issued values (filled by the setup step and from replies).
POOLED_STRINGS = {
    "execution_id": "execution_id",
    "upstream_execution_id": "execution_id",
    "downstream_execution_id": "execution_id",
    "lease_id": "lease_id",
    "expected_lease_id": "lease_id",
    "attempt_id": "attempt_id",
    "waitpoint_id": "waitpoint_id",
    "waitpoint_token": "waitpoint_token",
    "waitpoint_key": "waitpoint_key",
    "suspension_id": "suspension_id",
    "signal_id": "signal_id",
    "page_token": "page_token",
    "after": "stream_id",
    "from_id": "stream_id",
    "to_id": "stream_id",
    "grant_key": "grant_key",
    "kid": "kid",
}
POOLED_MESSAGES = {"LeaseHandle", "LeaseFence", "ClaimGrant"}
UUID_FIELDS = ("_id", "idempotency_key", "correlation_id")
TIME_FIELDS = ("now", "timestamp", "delay_until", "timeout_at", "expires_at", "deadline_at")


@dataclass
class Pools:
    """Plausible server-issued values, by kind, newest kept; anchors tie one request together."""

    values: dict[str, list[Any]] = field(default_factory=lambda: defaultdict(list))
    anchors: list[dict[str, Any]] = field(default_factory=list)
    now_ms: int = 0

    def add(self, kind: str, value: Any) -> None:
        if value in ("", None):
            return
        items = self.values[kind]
        if value in items:
            return
        items.append(value)
        if len(items) > POOL_MAX:
            del items[0]

    def add_anchor(self, anchor: dict[str, Any]) -> None:
        self.anchors.append(anchor)
        if len(self.anchors) > POOL_MAX:
            del self.anchors[0]

    def pick(self, kind: str, index: int) -> Any:
        items = self.values.get(kind)
        return items[index % len(items)] if items else None

    def clear(self) -> None:
        self.values.clear()
        self.anchors.clear()


@dataclass
class Gen:
    """The per-request drawing context."""

    pools: Pools
    chaos: int  # percent of fields that go extreme
    anchor: dict[str, Any]
    target: str | None = None  # the one top-level field that goes extreme
    budget: int = REQUEST_BYTES_MAX  # what huge values may still add to this request

    def huge(self, size: int) -> int:
        """`size`, or what is left of the request's byte budget."""
        size = max(0, min(size, self.budget))
        self.budget -= size
        return size


def requests(request_cls: Any, pools: Pools, streamed: bool = False) -> st.SearchStrategy[Any]:
    """Requests of `request_cls` (a list of them for client-streaming RPCs)."""

    @st.composite
    def build(draw: Draw) -> Any:
        # -1: every field plausible but one, the likeliest way past validation into the function
        chaos = draw(st.sampled_from([-1, -1, -1, 0, 0, 5, 15, 40, 100]))
        fields = request_cls.DESCRIPTOR.fields
        target = fields[draw(st.integers(0, len(fields) - 1))].name if fields else None
        # Every draw below is made whatever the pools hold, so the choices hypothesis records
        # have the same shape from one example to the next (pool contents are external state).
        use_anchor = draw(st.integers(0, 9)) < 8
        index = draw(st.integers(0, 1 << 16))
        anchor: dict[str, Any] = {}
        if use_anchor and pools.anchors:
            anchor = pools.anchors[index % len(pools.anchors)]
        gen = Gen(pools, max(chaos, 0), anchor, target if chaos < 0 else None)
        if not streamed:
            return message(draw, gen, request_cls.DESCRIPTOR, 0)
        n = draw(st.sampled_from([0, 1, 2, 3, 20]))
        return [message(draw, gen, request_cls.DESCRIPTOR, 0) for _ in range(n)]

    return build()


def _roll(draw: Draw, gen: Gen) -> str:
    r = draw(st.integers(0, 99))
    if r < gen.chaos:
        return "extreme"
    unset = 10 if gen.target else 25
    return "unset" if r < gen.chaos + (100 - gen.chaos) * unset // 100 else "plausible"


def message(draw: Draw, gen: Gen, desc: Descriptor, depth: int) -> Any:
    """A message of `desc`: its fields drawn one by one, or (for a lease, fence or grant) a
    real one from the pools, perhaps with one field gone extreme."""
    cls = message_factory.GetMessageClass(desc)
    pooled, mutation = (
        _pooled(draw, gen, desc, depth) if desc.name in POOLED_MESSAGES else (None, None)
    )
    msg = cls()
    chosen = _oneof_choices(draw, desc)
    for f in desc.fields:
        oneof = f.containing_oneof
        if oneof is not None and chosen.get(oneof.name, f.name) != f.name:
            continue
        mode = _roll(draw, gen)
        if depth == 0 and f.name == gen.target:
            mode = "extreme"
        if mode != "unset" and (f.message_type is None or depth < MAX_DEPTH):
            _set_field(draw, gen, msg, f, depth, mode)
    if pooled is None:
        return msg
    msg = cls()
    msg.CopyFrom(pooled)
    if mutation is not None:
        for f, _ in mutation.ListFields():
            msg.ClearField(f.name)
        msg.MergeFrom(mutation)
    return msg


def _pooled(draw: Draw, gen: Gen, desc: Descriptor, depth: int) -> tuple[Any, Any]:
    """A pooled instance of `desc` (or None) and a one-field mutation to apply (or None)."""
    take = draw(st.integers(0, 99)) >= gen.chaos // 2
    index = draw(st.integers(0, 255))
    mutation = None
    if draw(st.integers(0, 99)) < max(gen.chaos, 10):
        mutation = message_factory.GetMessageClass(desc)()
        which = desc.fields[draw(st.integers(0, len(desc.fields) - 1))]
        _set_field(draw, gen, mutation, which, depth, "extreme")
    return (_pooled_message(gen, desc.name, index) if take else None), mutation


def _oneof_choices(draw: Draw, desc: Descriptor) -> dict[str, str | None]:
    """Which member of each real oneof to set (None: no member); proto3 `optional` fields are
    synthetic oneofs of one member and are left to the field's own roll."""
    chosen: dict[str, str | None] = {}
    for oneof in desc.oneofs:
        if len(oneof.fields) > 1 or not oneof.fields[0].name.startswith("_"):
            chosen[oneof.name] = draw(st.sampled_from([None, *(f.name for f in oneof.fields)]))
    return chosen


def _pooled_message(gen: Gen, name: str, index: int) -> Any:
    if name == "LeaseHandle":
        return gen.anchor.get("lease") or gen.pools.pick("lease", index)
    if name == "LeaseFence":
        return gen.anchor.get("fence") or gen.pools.pick("fence", index)
    return gen.pools.pick("grant", index)


def _set_field(draw: Draw, gen: Gen, msg: Any, f: FieldDescriptor, depth: int, mode: str) -> None:
    if f.message_type is not None and f.message_type.GetOptions().map_entry:
        _set_map(draw, gen, getattr(msg, f.name), f, mode)
    elif f.is_repeated:
        _set_repeated(draw, gen, getattr(msg, f.name), f, depth, mode)
    elif f.message_type is not None:
        getattr(msg, f.name).CopyFrom(message(draw, gen, f.message_type, depth + 1))
    else:
        setattr(msg, f.name, scalar(draw, gen, f, mode))


def _set_repeated(
    draw: Draw, gen: Gen, target: Any, f: FieldDescriptor, depth: int, mode: str
) -> None:
    if mode == "extreme":
        n = draw(st.sampled_from([0, 1, 2, 257, 1000, 4097]))
    else:
        n = draw(st.integers(1, 3))
    if n == 0:
        return
    if f.message_type is not None:
        if depth >= MAX_DEPTH:
            return
        items = [message(draw, gen, f.message_type, depth + 1) for _ in range(min(n, 3))]
        n = _affordable(gen, n, max(m.ByteSize() for m in items))
        for i in range(n):
            target.add().CopyFrom(items[i % len(items)])
        return
    items = [scalar(draw, gen, f, mode) for _ in range(min(n, 3))]
    n = _affordable(gen, n, max((len(i) for i in items if isinstance(i, str | bytes)), default=8))
    if n > 3 and f.type == FD.TYPE_STRING and draw(st.booleans()):
        target.extend(f"{items[0][:16]}{i}" for i in range(n))  # thousands of distinct items
    elif n:
        target.extend(items[i % len(items)] for i in range(n))


def _affordable(gen: Gen, n: int, item_size: int) -> int:
    """How many copies of an item of `item_size` bytes the request's budget allows (>= 1)."""
    n = max(1, min(n, gen.budget // max(item_size, 1))) if n else 0
    gen.budget -= n * item_size
    return n


def _set_map(draw: Draw, gen: Gen, target: Any, f: FieldDescriptor, mode: str) -> None:
    key_f, value_f = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
    if mode == "extreme" and draw(st.booleans()):
        n = draw(st.sampled_from([65, 257, 1000, 4097]))
        value = scalar(draw, gen, value_f, "plausible")
        for i in range(n):
            target[f"app.k{i}" if key_f.type == FD.TYPE_STRING else i] = value
        return
    for _ in range(draw(st.integers(1, 3))):
        if key_f.type == FD.TYPE_STRING and mode == "plausible":
            key: Any = draw(st.sampled_from(["app.owner", "app.stage", "team.x", "ff.fuzz"]))
        else:
            key = scalar(draw, gen, key_f, mode)
        if value_f.message_type is None:
            target[key] = scalar(draw, gen, value_f, mode)


def scalar(draw: Draw, gen: Gen, f: FieldDescriptor, mode: str) -> Any:
    if f.type == FD.TYPE_BOOL:
        return draw(st.booleans())
    if f.type == FD.TYPE_ENUM:
        return _enum(draw, f.enum_type, mode)
    if f.type in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        if mode == "extreme":
            return draw(st.sampled_from(EXTREME_FLOATS))
        return draw(st.sampled_from([0.5, 1.0, 2.0]))
    if f.type in INT_RANGES:
        return _integer(draw, gen, f, mode)
    if f.type == FD.TYPE_BYTES:
        return _bytes(draw, gen, mode)
    return _string(draw, gen, f, mode)


def _enum(draw: Draw, enum: EnumDescriptor, mode: str) -> int:
    numbers = [v.number for v in enum.values]
    if mode == "extreme":
        return int(draw(st.sampled_from([0, max(numbers) + 1, 99, -1, 2**31 - 1, -(2**31)])))
    return int(draw(st.sampled_from([n for n in numbers if n] or numbers)))


def _integer(draw: Draw, gen: Gen, f: FieldDescriptor, mode: str) -> int:
    lo, hi = INT_RANGES[f.type]
    if mode == "extreme":
        if draw(st.integers(0, 4)) == 0:
            return int(draw(st.integers(lo, hi)))
        return int(draw(st.sampled_from([v for v in EXTREME_INTS if lo <= v <= hi])))
    name = f.name
    use_anchor = draw(st.integers(0, 4)) > 0
    static = draw(st.sampled_from(STATIC_INTS.get(name, [0])))
    offset = draw(st.sampled_from([-60_000, 0, 1_000, 3_600_000]))
    duration = draw(st.sampled_from([1, 1_000, 5_000, 30_000]))
    small = draw(st.integers(0, 5))
    anchored = gen.anchor.get(name)
    if use_anchor and isinstance(anchored, int):
        return anchored
    if name in STATIC_INTS:
        return int(static)
    if any(name == t or name.endswith("_" + t) for t in TIME_FIELDS):
        return min(max(gen.pools.now_ms + offset, lo), hi)
    if name.endswith("_ms") or name.endswith("_seconds"):
        return min(int(duration), hi)
    return min(max(int(small), lo), hi)


def _bytes(draw: Draw, gen: Gen, mode: str) -> bytes:
    if mode == "extreme":
        choice = draw(st.integers(0, 3))
        if choice == 0:
            return b""
        if choice == 1:
            return bytes([draw(st.integers(0, 255))]) * gen.huge(draw(st.sampled_from(HUGE_SIZES)))
        return bytes(draw(st.binary(max_size=64)))
    return bytes(draw(st.sampled_from([b"{}", b'{"x":1}', b"\x00\xff", b"hello"])))


def _string(draw: Draw, gen: Gen, f: FieldDescriptor, mode: str) -> str:
    name = f.name
    if mode == "extreme":
        choice = draw(st.integers(0, 9))
        if choice == 0:
            ch = draw(st.sampled_from(["a", "é", "{", "\x00", "0", ","]))
            return str(ch) * gen.huge(draw(st.sampled_from(HUGE_SIZES)))
        if choice <= 2:
            return str(draw(st.text(max_size=40)))
        return str(draw(st.sampled_from(MALFORMED_STRINGS)))
    use_anchor = draw(st.integers(0, 4)) > 0
    use_pool = draw(st.integers(0, 3)) > 0
    index = draw(st.integers(0, 255))
    static = draw(st.sampled_from(STATIC.get(name, ["x", "fuzz", "a-b_c.d"])))
    partition = draw(st.integers(0, FLOW_PARTITIONS - 1))
    bits = draw(st.integers(0, 2**128 - 1))
    anchored = gen.anchor.get(name)
    if use_anchor and isinstance(anchored, str):
        return anchored
    kind = POOLED_STRINGS.get(name)
    pooled = gen.pools.pick(kind, index) if kind is not None and use_pool else None
    if pooled is not None:
        return str(pooled)
    if name in STATIC:
        return str(static)
    if name.endswith("execution_id"):
        return new_eid(partition, bits)
    if name.endswith(UUID_FIELDS):
        return str(uuid.UUID(int=bits, version=4))
    return str(static)


# Variants of a successful request: per success, the next few of its top-level integer and list
# fields in turn (rotating with the success count), each pushed to the ends of its range.
DERIVED_PER_SUCCESS = 3
MANY = 5000
# Repeated items longer than this are replaced by empty ones when a list is blown up to MANY.
SMALL_ITEM_BYTES = 256


def derived(request: Any, successes: int) -> list[Any]:
    """Copies of `request`, each with one field at an extreme: integers at the top of their
    type and at 2^53 + 1 (signed ones also at the bottom), lists and maps with 5,000 items."""
    fields = [f for f in request.DESCRIPTOR.fields if f.type in INT_RANGES or f.is_repeated]
    if not fields:
        return []
    out = []
    for i in range(DERIVED_PER_SUCCESS):
        f = fields[(successes * DERIVED_PER_SUCCESS + i) % len(fields)]
        for value in _ends(f):
            variant = type(request)()
            variant.CopyFrom(request)
            _put(variant, f, value)
            out.append(variant)
    return out


def _ends(f: FieldDescriptor) -> list[Any]:
    if f.is_repeated:
        return [MANY]
    lo, hi = INT_RANGES[f.type]
    ends = [hi] + ([2**53 + 1] if hi > 2**53 else []) + ([lo] if lo < 0 else [])
    return ends


def _put(msg: Any, f: FieldDescriptor, value: Any) -> None:
    if not f.is_repeated:
        setattr(msg, f.name, value)
        return
    target = getattr(msg, f.name)
    if f.message_type is not None and f.message_type.GetOptions().map_entry:
        key_f = f.message_type.fields_by_name["key"]
        value_f = f.message_type.fields_by_name["value"]
        if value_f.message_type is not None:
            return
        sample = next(iter(target.values()), None) if len(target) else None
        if isinstance(sample, (str, bytes)):
            sample = sample[:16]  # many small items: the count is under test, not the size
        for i in range(value):
            key = f"app.k{i}" if key_f.type == FD.TYPE_STRING else i
            target[key] = sample if sample is not None else _zero(value_f)
        return
    if f.message_type is not None:
        if len(target):
            first = type(target[0])()
            if target[0].ByteSize() <= SMALL_ITEM_BYTES:
                first.CopyFrom(target[0])
            # else an empty item: 5,000 copies of a megabyte sample would only measure memory
            for _ in range(value - len(target)):
                target.add().CopyFrom(first)
        return
    if f.type == FD.TYPE_STRING:
        base = target[0] if len(target) else "x"
        target.extend(f"{base[:16]}{i}" for i in range(value))
    elif len(target):
        first = target[0][:16] if isinstance(target[0], bytes) else target[0]
        target.extend([first] * value)


def _zero(f: FieldDescriptor) -> Any:
    if f.type == FD.TYPE_STRING:
        return "v"
    if f.type == FD.TYPE_BYTES:
        return b"v"
    return 0
