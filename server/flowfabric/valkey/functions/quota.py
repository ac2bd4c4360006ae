"""`lua/quota.lua`: create quota policies, admit and release executions against them, and the
quota reconciler's per-policy repair (docs/budgets.md#quota-policies)."""

from __future__ import annotations

from dataclasses import dataclass

from flowfabric.server.valkey.codec import Reply
from flowfabric.server.valkey.functions.core import (
    Decl,
    Key,
    KeyCtx,
    Outcome,
    arg,
    call,
    key,
    ok,
    opt,
    record,
)
from flowfabric.server.valkey.keys import QuotaKeys
from flowfabric.server.valkey.store import Store


@dataclass(frozen=True)
class QuotaCreated:
    """`created` False: the policy already existed and nothing changed."""

    created: bool


@dataclass(frozen=True)
class Admission:
    """`outcome`: `admitted`, `already_admitted`, `rate_exceeded` (with `retry_after_ms`) or
    `concurrency_exceeded`."""

    outcome: str
    retry_after_ms: int | None = None


@dataclass(frozen=True)
class QuotaReconciled:
    """One page of a reconciler pass: the next SSCAN cursor (0 = pass done), members pruned,
    and the counter's new value when the last page rewrote it."""

    cursor: int
    pruned: int = 0
    counter: int | None = None
    removed: bool = False


@dataclass(frozen=True)
class NewQuotaPolicy:
    quota_policy_id: str
    window_seconds: int = 0
    max_requests_per_window: int = 0
    max_concurrent: int = 0
    jitter_ms: int = 0


def _q(attr: str) -> Key:
    return key(f"quota.{attr}", lambda c: str(getattr(c.quota, attr)))


def _guard(c: KeyCtx) -> str:
    return c.quota.guard(c.admitted_id)


CREATE: Decl[QuotaCreated] = Decl(
    "ff_create_quota_policy",
    (_q("definition"), _q("window"), _q("concurrency"), _q("admitted_set"), _q("policies")),
    (arg("quota_policy_id"), arg("window_seconds", "int"), arg("max_requests_per_window", "int"),
     arg("max_concurrent", "int"), opt("jitter_ms"), opt("now")),
    {"OK": lambda r: QuotaCreated(True), "ALREADY_SATISFIED": lambda r: QuotaCreated(False)},
)  # fmt: skip


def _admission(reply: Reply) -> Admission:
    if reply.status == "ALREADY_SATISFIED":
        return Admission("already_admitted")
    return record(Admission)(reply)


CHECK: Decl[Admission] = Decl(
    "ff_check_admission_and_record",
    (_q("window"), _q("concurrency"), _q("definition"), key("quota.guard", _guard),
     _q("admitted_set")),
    (opt("now"), arg("window_seconds", "int"), arg("rate_limit", "int"),
     arg("concurrency_cap", "int"), arg("execution_id"), opt("jitter_ms"),
     arg("quota_policy_id")),
    {"OK": _admission, "ALREADY_SATISFIED": _admission},
)  # fmt: skip
RELEASE: Decl[Outcome] = Decl(
    "ff_release_admission",
    (_q("definition"), key("quota.guard", _guard), _q("admitted_set"), _q("concurrency")),
    (arg("quota_policy_id"), arg("execution_id")),
    ok(record(Outcome)),
)


def _reconciled(reply: Reply) -> QuotaReconciled:
    if reply.status == "ALREADY_SATISFIED":
        return QuotaReconciled(0, removed=True)
    return record(QuotaReconciled)(reply)


RECONCILE: Decl[QuotaReconciled] = Decl(
    "ff_reconcile_quota_policy",
    (_q("definition"), _q("window"), _q("concurrency"), _q("admitted_set"), _q("policies")),
    (arg("quota_policy_id"), arg("cursor", "int"), opt("now")),
    {"OK": _reconciled, "ALREADY_SATISFIED": _reconciled},
)

DECLS = (CREATE, CHECK, RELEASE, RECONCILE)


def quota_ctx(keys: QuotaKeys, execution_id: str = "") -> KeyCtx:
    return KeyCtx(tag=keys.tag, quota_policy_id=keys.quota_policy_id, admitted_id=execution_id)


class QuotaFunctions:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def create_quota_policy(self, keys: QuotaKeys, q: NewQuotaPolicy) -> QuotaCreated:
        return await call(self.store, CREATE, quota_ctx(keys), {
            "quota_policy_id": keys.quota_policy_id, "window_seconds": q.window_seconds,
            "max_requests_per_window": q.max_requests_per_window,
            "max_concurrent": q.max_concurrent, "jitter_ms": q.jitter_ms, "now": None,
        })  # fmt: skip

    async def check_admission(
        self,
        keys: QuotaKeys,
        execution_id: str,
        *,
        window_seconds: int,
        rate_limit: int,
        concurrency_cap: int,
        jitter_ms: int = 0,
    ) -> Admission:
        return await call(self.store, CHECK, quota_ctx(keys, execution_id), {
            "now": None, "window_seconds": window_seconds, "rate_limit": rate_limit,
            "concurrency_cap": concurrency_cap, "execution_id": execution_id,
            "jitter_ms": jitter_ms, "quota_policy_id": keys.quota_policy_id,
        })  # fmt: skip

    async def release_admission(self, keys: QuotaKeys, execution_id: str) -> Outcome:
        """`released`, always."""
        values = {"quota_policy_id": keys.quota_policy_id, "execution_id": execution_id}
        return await call(self.store, RELEASE, quota_ctx(keys, execution_id), values)

    async def reconcile_page(self, keys: QuotaKeys, cursor: int) -> QuotaReconciled:
        values = {"quota_policy_id": keys.quota_policy_id, "cursor": cursor, "now": None}
        return await call(self.store, RECONCILE, quota_ctx(keys), values)
