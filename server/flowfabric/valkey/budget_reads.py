"""Reads of budgets and quota policies (docs/budgets.md#reads): plain reads, no FCALL.

A budget's status is its definition, limits and usage read together (one slot, one pipeline);
a quota policy's view adds the live concurrency counter and the admissions inside the current
window. Listings walk the partitions' policy index sets in id order. Stored numbers a caller
could not have written (a hand-edited usage field) read as 0 rather than failing the read.
"""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from flowfabric.server.valkey.codec import hash_to_dict, text
from flowfabric.server.valkey.errors import InvalidInput
from flowfabric.server.valkey.keys import BudgetKeys, QuotaKeys
from flowfabric.server.valkey.store import Store, server_time_ms
from flowfabric.v1 import types_pb2 as t

U64_MAX = (1 << 64) - 1
INT64_MAX = (1 << 63) - 1
# Usage fields that are not dimensions: the reconciler's marker and a legacy seed field.
NOT_DIMENSIONS = frozenset({"breached_at", "_init"})

M = TypeVar("M")


def _u64(raw: str) -> int:
    try:
        return min(max(int(raw), 0), U64_MAX)
    except ValueError:
        return 0


def _opt_time(raw: str | None) -> int | None:
    if not raw:
        return None
    try:
        return min(max(int(raw), 0), INT64_MAX)
    except ValueError:
        return None


def _dimensions(
    status: t.BudgetStatus, usage: dict[str, str], limits: dict[str, str], reserved: dict[str, str]
) -> None:
    """Usage, limits, estimates and outstanding reservations per dimension."""
    for f, v in usage.items():
        if f not in NOT_DIMENSIONS:
            status.usage[f] = _u64(v)
    by_kind = {"hard": status.hard_limits, "soft": status.soft_limits, "reserve": status.reserve}
    for f, v in limits.items():
        kind, _, dim = f.partition(":")
        if kind in by_kind:
            by_kind[kind][dim] = _u64(v)
    for f, v in reserved.items():
        if _u64(v):
            status.reserved[f] = _u64(v)


async def budget_status(store: Store, keys: BudgetKeys) -> t.BudgetStatus | None:
    """None when the definition is missing."""
    pipe = store.pipeline()
    for k in (keys.definition, keys.limits, keys.usage, keys.reserved):
        pipe.hgetall(k)
    pipe.zcard(keys.inflight)
    *hashes, in_flight = await store.run_pipeline(pipe)
    d, limits, usage, reserved = (hash_to_dict(r) for r in hashes)
    if not d:
        return None
    status = t.BudgetStatus(
        in_flight=int(in_flight or 0),
        budget_id=d.get("budget_id", keys.budget_id), scope_type=d.get("scope_type", ""),
        scope_id=d.get("scope_id", ""), enforcement_mode=d.get("enforcement_mode", ""),
        breach_count=_u64(d.get("breach_count", "0")),
        soft_breach_count=_u64(d.get("soft_breach_count", "0")),
        on_hard_limit=d.get("on_hard_limit", ""), on_soft_limit=d.get("on_soft_limit", ""),
        reset_interval_ms=_u64(d.get("reset_interval_ms", "0")),
        reset_count=_u64(d.get("reset_count", "0")),
    )  # fmt: skip
    for name in ("last_breach_at", "next_reset_at", "created_at", "last_reset_at"):
        at = _opt_time(d.get(name))
        if at is not None:
            setattr(status, name, at)
    if d.get("last_breach_dim"):
        status.last_breach_dim = d["last_breach_dim"]
    _dimensions(status, usage, limits, reserved)
    return status


async def quota_policy(store: Store, keys: QuotaKeys) -> t.QuotaPolicy | None:
    """None when the definition is missing. The window count is taken at Valkey's clock."""
    now = await server_time_ms(store)
    d = hash_to_dict(await store.call("HGETALL", keys.definition))
    if not d:
        return None
    window_s = _u64(d.get("requests_per_window_seconds", "0"))
    pipe = store.pipeline()
    pipe.get(keys.concurrency)
    pipe.zcount(keys.window, f"({now - window_s * 1000}", "+inf")
    concurrency, in_window = await store.run_pipeline(pipe)
    return t.QuotaPolicy(
        quota_policy_id=d.get("quota_policy_id", keys.quota_policy_id), window_seconds=window_s,
        max_requests_per_window=_u64(d.get("max_requests_per_window", "0")),
        max_concurrent=_u64(d.get("active_concurrency_cap", "0")),
        jitter_ms=_u64(d.get("jitter_ms", "0")), created_at=_opt_time(d.get("created_at")) or 0,
        current_concurrency=_u64(text(concurrency) or "0"),
        current_window_requests=int(in_window or 0),
    )  # fmt: skip


# -- listings -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Page:
    """Where a listing resumes: a partition and the last id returned on it ("" = its start)."""

    partition: int
    after: str = ""

    def token(self) -> str:
        return base64.urlsafe_b64encode(f"v1:{self.partition}:{self.after}".encode()).decode()

    @classmethod
    def parse(cls, token: str, partitions: int) -> Page:
        try:
            tag, part, after = base64.urlsafe_b64decode(token.encode()).decode().split(":", 2)
            if tag != "v1" or not 0 <= int(part) < partitions:
                raise ValueError(tag)
            return cls(int(part), after)
        except (ValueError, UnicodeDecodeError):
            raise InvalidInput("page_token", "page_token is malformed") from None


async def list_page(
    store: Store,
    partitions: int,
    index: Callable[[int], str],
    read: Callable[[int, str], Awaitable[M | None]],
    limit: int,
    page: Page | None,
) -> tuple[list[M], Page | None]:
    """Up to `limit` records from the index sets of partitions `page.partition`.., in id order
    within a partition; ids whose record is gone are skipped (the reconcilers drop them)."""
    out: list[M] = []
    cursor = page or Page(0)
    part, after = cursor.partition, cursor.after
    while part < partitions:
        ids = sorted(text(m) for m in await store.call("SMEMBERS", index(part)))
        for bid in (i for i in ids if i > after):
            if len(out) >= limit:
                return out, Page(part, after)
            record = await read(part, bid)
            after = bid
            if record is not None:
                out.append(record)
        part, after = part + 1, ""
        if len(out) >= limit:
            return out, (Page(part) if part < partitions else None)
    return out, None
