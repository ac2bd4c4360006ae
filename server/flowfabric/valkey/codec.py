"""Reply decoding and value conversions between Valkey strings and API types, in one place.

Function replies (docs/architecture.md#calling-convention): `{1, "OK", ...}`, `{1,
"ALREADY_SATISFIED", reason, ...}`,
`{1, "DUPLICATE", id}` are outcomes; `{0, code, detail...}` raises `FlowFabricError(code)`.
Anything else is a `protocol_error`, never a success.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any, TypeVar

from google.protobuf.descriptor import EnumDescriptor

from flowfabric.server.valkey.errors import FlowFabricError

if TYPE_CHECKING:
    # The stubs' generic base of every generated enum's metaclass (it carries the value type).
    from google.protobuf.internal.enum_type_wrapper import _EnumTypeWrapper

OUTCOMES = ("OK", "ALREADY_SATISFIED", "DUPLICATE")
V = TypeVar("V", bound=int)


def text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


@dataclass(frozen=True)
class Reply:
    """A successful function reply: its status and the values after it."""

    status: str
    values: tuple[Any, ...]

    def str(self, i: builtins.int) -> builtins.str:
        return text(self.values[i]) if i < len(self.values) else ""

    def int(self, i: builtins.int) -> builtins.int:
        raw = self.str(i)
        try:
            return int(raw)
        except ValueError:
            raise FlowFabricError(
                "protocol_error", message=f"expected an integer at reply slot {i}, got {raw!r}"
            ) from None

    def raw(self, i: builtins.int) -> bytes:
        v = self.values[i] if i < len(self.values) else b""
        return v if isinstance(v, bytes) else text(v).encode()


def decode(reply: Any, function: str) -> Reply:
    """Decode one function reply, raising the contract error it carries."""
    if not isinstance(reply, list) or len(reply) < 2:
        raise FlowFabricError("protocol_error", message=f"{function}: malformed reply {reply!r}")
    flag, status = reply[0], text(reply[1])
    values = tuple(reply[2:])
    if flag == 1 and status in OUTCOMES:
        return Reply(status, values)
    if flag == 0 and status:
        raise FlowFabricError(status, [text(v) for v in values])
    raise FlowFabricError("protocol_error", message=f"{function}: unexpected reply {reply!r}")


def hash_to_dict(raw: Any) -> dict[str, str]:
    """HGETALL result (dict or flat list) as str -> str."""
    if isinstance(raw, dict):
        return {text(k): text(v) for k, v in raw.items()}
    items = list(raw or [])
    return {text(items[i]): text(items[i + 1]) for i in range(0, len(items), 2)}


# -- enums ------------------------------------------------------------------------------------
# A stored value is the lower_snake_case of the enum value name without its prefix:
# PUBLIC_STATE_WAITING_CHILDREN <-> "waiting_children".


@cache
def _prefix(descriptor: EnumDescriptor) -> str:
    zero = descriptor.values_by_number[0].name
    return zero[: -len("UNSPECIFIED")]


def enum_value(enum: _EnumTypeWrapper[V], stored: str, *, field: str = "") -> V:
    """Stored string -> enum number; an unknown value is a corrupt record, not a default."""
    name = _prefix(enum.DESCRIPTOR) + stored.upper()
    try:
        return enum.Value(name)
    except ValueError:
        raise FlowFabricError(
            "corrupt_record", message=f"unknown stored value {stored!r} for {field or name}"
        ) from None


def enum_text(enum: _EnumTypeWrapper[Any], number: int) -> str:
    """Enum number -> stored string ("" for UNSPECIFIED)."""
    if number == 0:
        return ""
    return str(enum.Name(number))[len(_prefix(enum.DESCRIPTOR)) :].lower()


def cancel_source(number: int, default: str) -> str:
    """A CancelSource enum value as the stored source string; UNSPECIFIED -> `default`."""
    from flowfabric.server.valkey.errors import InvalidInput
    from flowfabric.v1 import types_pb2

    if number == 0:
        return default
    if number not in types_pb2.CancelSource.values():
        raise InvalidInput("source", f"unknown source {number}")
    return enum_text(types_pb2.CancelSource, number)


INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


def int64(value: int) -> int:
    """A stored integer held to the int64 of the wire: a record an older version wrote past the
    bounds (docs/architecture.md#limits) still reads, as the nearest value a message can carry,
    instead of failing the whole read."""
    return min(max(value, INT64_MIN), INT64_MAX)


def opt_int(value: str) -> int | None:
    return int64(int(value)) if value else None
