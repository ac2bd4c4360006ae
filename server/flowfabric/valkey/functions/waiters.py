"""`lua/waiters.lua`: the waiters indexes of quota policies and budgets
(docs/budgets.md#waking-blocked-work)."""

from __future__ import annotations

from dataclasses import dataclass

from flowfabric.server.valkey.functions.core import (
    Decl,
    KeyCtx,
    Outcome,
    arg,
    call,
    key,
    opt,
    record,
)
from flowfabric.server.valkey.keys import BudgetKeys, QuotaKeys
from flowfabric.server.valkey.store import Store

#: Most entries one take call removes.
MAX_TAKE = 1000


@dataclass(frozen=True)
class Bucket:
    """One waiters index: a quota policy's (for one concurrency key, when given) or a
    budget's."""

    owner_kind: str  # "quota" or "budget"
    tag: str
    owner_id: str
    concurrency_key: str = ""

    @classmethod
    def quota(cls, keys: QuotaKeys, concurrency_key: str = "") -> Bucket:
        return cls("quota", keys.tag, keys.quota_policy_id, concurrency_key)

    @classmethod
    def budget(cls, keys: BudgetKeys) -> Bucket:
        return cls("budget", keys.tag, keys.budget_id)

    @property
    def index(self) -> str:
        return _index(self.ctx)

    @property
    def ctx(self) -> KeyCtx:
        if self.owner_kind == "budget":
            return KeyCtx(tag=self.tag, budget_id=self.owner_id)
        return KeyCtx(
            tag=self.tag, quota_policy_id=self.owner_id, concurrency_key=self.concurrency_key
        )

    def values(self, **more: object) -> dict[str, object]:
        return {
            "owner_kind": self.owner_kind, "owner_id": self.owner_id,
            "concurrency_key": self.concurrency_key, **more,
        }  # fmt: skip


@dataclass(frozen=True)
class Taken:
    """`execution_ids`: the oldest entries, removed from the index (none when it was empty)."""

    outcome: str
    execution_ids: tuple[str, ...] = ()


def _index(c: KeyCtx) -> str:
    if c.budget_id:
        return c.budget.waiters
    return c.quota.waiters(c.concurrency_key)


_OWNER = (arg("owner_kind"), arg("owner_id"), arg("concurrency_key", default=""))

ADD: Decl[Outcome] = Decl(
    "ff_add_waiter",
    (key("waiters.index", _index),),
    (*_OWNER, arg("execution_id"), opt("now")),
    {"OK": record(Outcome), "ALREADY_SATISFIED": record(Outcome)},
)
TAKE: Decl[Taken] = Decl(
    "ff_take_waiters",
    (key("waiters.index", _index),),
    (*_OWNER, arg("count", "int")),
    {"OK": record(Taken)},
)
REMOVE: Decl[Outcome] = Decl(
    "ff_remove_waiter",
    (key("waiters.index", _index),),
    (*_OWNER, arg("execution_id")),
    {"OK": record(Outcome), "ALREADY_SATISFIED": record(Outcome)},
)

DECLS = (ADD, TAKE, REMOVE)


class WaiterFunctions:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def add(self, bucket: Bucket, execution_id: str) -> bool:
        """Register `execution_id`; False when it was already waiting (it keeps its place)."""
        values = bucket.values(execution_id=execution_id, now=None)
        return (await call(self.store, ADD, bucket.ctx, values)).outcome == "added"

    async def take(self, bucket: Bucket, count: int) -> tuple[str, ...]:
        """Remove and return up to `count` (1..MAX_TAKE) oldest entries."""
        return (await call(self.store, TAKE, bucket.ctx, bucket.values(count=count))).execution_ids

    async def remove(self, bucket: Bucket, execution_id: str) -> bool:
        """Remove one entry; True when this call removed it."""
        values = bucket.values(execution_id=execution_id)
        return (await call(self.store, REMOVE, bucket.ctx, values)).outcome == "removed"
