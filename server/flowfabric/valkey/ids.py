"""Identifiers, partitions and input validation at the API boundary
(docs/architecture.md#identifiers, docs/architecture.md#partitions-and-hash-tags).

Everything here is pure: no I/O. Validation failures raise `InvalidInput` (an
`invalid_input` contract error naming the field), so bad input never reaches Valkey.
"""

from __future__ import annotations

import re
import string
import uuid
from dataclasses import dataclass

from flowfabric.server.valkey.errors import InvalidInput

_CRC16_TABLE: list[int] = []
for _byte in range(256):
    _crc = _byte << 8
    for _ in range(8):
        _crc = ((_crc << 1) ^ 0x1021) if _crc & 0x8000 else (_crc << 1)
    _CRC16_TABLE.append(_crc & 0xFFFF)


def crc16(data: bytes) -> int:
    """CRC-16/XMODEM (poly 0x1021, init 0): `crc16(b"123456789") == 0x31C3`."""
    crc = 0
    for b in data:
        crc = ((crc << 8) & 0xFFFF) ^ _CRC16_TABLE[((crc >> 8) ^ b) & 0xFF]
    return crc


_EID_RE = re.compile(r"^\{fp:(\d{1,5})\}:([0-9a-fA-F-]{36})$")
_UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


@dataclass(frozen=True)
class ExecutionId:
    """`{fp:N}:<uuid>`: the partition is read from the id, never recomputed."""

    partition: int
    uuid: str

    @property
    def tag(self) -> str:
        return f"{{fp:{self.partition}}}"

    def __str__(self) -> str:
        return f"{self.tag}:{self.uuid}"


def parse_uuid(value: str, field: str) -> str:
    """A lowercase hyphenated UUID (any version)."""
    if not _UUID_RE.match(value):
        raise InvalidInput(field, f"{field} must be a lowercase hyphenated UUID, got: {value!r}")
    return value


def parse_execution_id(value: str, num_partitions: int, field: str = "execution_id") -> ExecutionId:
    """Parse and range-check an execution id against the deployment's partition count."""
    m = _EID_RE.match(value)
    if not m:
        raise InvalidInput(field, f"{field} must look like {{fp:N}}:<uuid>, got: {value!r}")
    n = int(m.group(1))
    if n > 0xFFFF:
        raise InvalidInput(field, f"{field} partition {n} is not a u16")
    if n >= num_partitions:
        raise InvalidInput(
            field, f"{field} partition {n} is out of range (num_flow_partitions={num_partitions})"
        )
    return ExecutionId(n, parse_uuid(m.group(2), field))


def solo_partition(lane_id: str, num_partitions: int) -> int:
    """Solo executions of a lane share one partition: crc16(lane bytes) % P."""
    return crc16(lane_id.encode()) % num_partitions


def flow_partition(flow_id: str, num_partitions: int) -> int:
    """Flow members live on crc16(raw 16 UUID bytes) % P."""
    return crc16(uuid.UUID(flow_id).bytes) % num_partitions


def budget_partition(budget_id: str, num_partitions: int) -> int:
    """A budget lives on crc16(raw 16 UUID bytes) % the budget partition count
    (docs/budgets.md#keys)."""
    return crc16(uuid.UUID(budget_id).bytes) % num_partitions


# Schedules are few; their partitions only spread them over a cluster (docs/schedules.md#keys).
SCHEDULE_PARTITIONS = 16


def schedule_partition(schedule_id: str) -> int:
    """A schedule lives on crc16(raw 16 UUID bytes) % SCHEDULE_PARTITIONS."""
    return crc16(uuid.UUID(schedule_id).bytes) % SCHEDULE_PARTITIONS


def quota_partition(quota_policy_id: str, num_partitions: int) -> int:
    """A quota policy lives on crc16(raw 16 UUID bytes) % the quota partition count."""
    return crc16(uuid.UUID(quota_policy_id).bytes) % num_partitions


def mint_execution_id(partition: int) -> ExecutionId:
    return ExecutionId(partition, str(uuid.uuid4()))


def validate_lane(lane_id: str, field: str = "lane_id") -> str:
    """1..64 bytes, each printable ASCII 0x20..0x7E."""
    raw = lane_id.encode()
    if not 1 <= len(raw) <= 64 or any(b < 0x20 or b > 0x7E for b in raw):
        raise InvalidInput(field, f"{field} must be 1..64 printable ASCII bytes, got: {lane_id!r}")
    return lane_id


def validate_identifier(value: str, field: str) -> str:
    """Worker ids and instance ids: non-empty, <= 256 bytes, no whitespace or control bytes."""
    raw = value.encode()
    if not 1 <= len(raw) <= 256 or any(b <= 0x20 or b == 0x7F for b in raw):
        raise InvalidInput(
            field, f"{field} must be 1..256 bytes with no whitespace or control characters"
        )
    return value


_TAG_KEY_RE = re.compile(r"^[a-z][a-z0-9_]*\.[^.]")


def is_secret_hex(value: str) -> bool:
    """A waitpoint HMAC secret: non-empty, even-length hex (docs/suspension.md#waitpoint-tokens; no
    coercion)."""
    return bool(value) and len(value) % 2 == 0 and all(c in string.hexdigits for c in value)


def is_valid_tag_key(key: str) -> bool:
    """Caller-owned tag keys: `^[a-z][a-z0-9_]*\\.[^.]` (the engine never writes such keys)."""
    return _TAG_KEY_RE.match(key) is not None


def capabilities_csv(tokens: list[str] | tuple[str, ...], side: str = "worker") -> str:
    """Validate capability tokens (docs/architecture.md#identifiers) and return the sorted,
    de-duplicated CSV."""
    from flowfabric.server.valkey.errors import FlowFabricError

    unique = sorted(set(tokens))
    for token in unique:
        raw = token.encode()
        why = None
        if not raw:
            why = "empty_token"
        elif b"," in raw:
            why = "comma_in_token"
        elif any(b <= 0x20 or b == 0x7F for b in raw):
            why = "control_or_whitespace"
        if why:
            raise FlowFabricError("invalid_capabilities", [f"{side}:{why}"])
    if len(unique) > 256:
        raise FlowFabricError("invalid_capabilities", [f"{side}:too_many_tokens"])
    csv = ",".join(unique)
    if len(csv.encode()) > 4096:
        raise FlowFabricError("invalid_capabilities", [f"{side}:too_many_bytes"])
    return csv
