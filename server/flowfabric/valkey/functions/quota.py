"""`lua/quota.lua`: create quota policies, admit, release and refund executions against them,
and the quota reconciler's per-bucket repair (docs/budgets.md#quota-policies)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from flowfabric.server.valkey.codec import Reply
from flowfabric.server.valkey.functions.core import (
    Decl,
    Key,
    KeyCtx,
    arg,
    call,
    key,
    ok,
    opt,
    record,
    tail,
)
from flowfabric.server.valkey.keys import QuotaKeys
from flowfabric.server.valkey.store import Store


@dataclass(frozen=True)
class QuotaCreated:
    """`created` False: the policy already existed and nothing changed."""

    created: bool


@dataclass(frozen=True)
class Admission:
    """`outcome`: `admitted` (with the admission's `window_member` and `admitted_at`, which a
    refund names), `already_admitted`, `rate_exceeded` (with `retry_after_ms`) or
    `concurrency_exceeded`."""

    outcome: str
    retry_after_ms: int | None = None
    window_member: str = ""
    admitted_at: int = 0


@dataclass(frozen=True)
class QuotaReconciled:
    """One bucket repaired: members removed, the live count, whether the counter had drifted
    from it, and `removed_policy` when the definition is gone (the id left the index)."""

    removed: int = 0
    live: int = 0
    drifted: bool = False
    removed_policy: bool = False


@dataclass(frozen=True)
class NewQuotaPolicy:
    quota_policy_id: str
    window_seconds: int = 0
    max_requests_per_window: int = 0
    max_concurrent: int = 0
    jitter_ms: int = 0


def _q(attr: str) -> Key:
    return key(f"quota.{attr}", lambda c: str(getattr(c.quota, attr)))


CREATE: Decl[QuotaCreated] = Decl(
    "ff_create_quota_policy",
    (_q("definition"), _q("window"), _q("concurrency"), _q("admitted"), _q("policies")),
    (arg("quota_policy_id"), arg("window_seconds", "int"), arg("max_requests_per_window", "int"),
     arg("max_concurrent", "int"), opt("jitter_ms"), opt("now")),
    {"OK": lambda r: QuotaCreated(True), "ALREADY_SATISFIED": lambda r: QuotaCreated(False)},
)  # fmt: skip


def _admission(reply: Reply) -> Admission:
    if reply.status == "ALREADY_SATISFIED":
        return Admission("already_admitted")
    outcome = reply.str(0)
    if outcome == "rate_exceeded":
        return Admission(outcome, reply.int(1))
    if outcome == "admitted":
        return Admission(outcome, None, reply.str(1), reply.int(2))
    return Admission(outcome)


CHECK: Decl[Admission] = Decl(
    "ff_check_admission_and_record",
    (_q("window"), _q("concurrency"), _q("definition"), _q("admitted"), _q("keys_index"),
     _q("admission_seq")),
    (opt("now"), arg("window_seconds", "int"), arg("rate_limit", "int"),
     arg("concurrency_cap", "int"), arg("execution_id"), opt("jitter_ms"),
     arg("quota_policy_id"), arg("concurrency_key", default="")),
    {"OK": _admission, "ALREADY_SATISFIED": _admission},
)  # fmt: skip


@dataclass(frozen=True)
class Freed:
    """ff_release_admission / ff_refund_admission: the outcome and how many executions wait
    on the bucket."""

    outcome: str = ""
    waiters: int = 0


def _bucket_waiters(c: KeyCtx) -> str:
    return c.quota.waiters()


RELEASE: Decl[Freed] = Decl(
    "ff_release_admission",
    (_q("definition"), _q("admitted"), _q("concurrency"),
     key("quota.waiters", _bucket_waiters)),
    (arg("quota_policy_id"), arg("execution_id"), arg("concurrency_key", default="")),
    ok(record(Freed)),
)  # fmt: skip
REFUND: Decl[Freed] = Decl(
    "ff_refund_admission",
    (_q("definition"), _q("window"), _q("admitted"), _q("concurrency"),
     key("quota.waiters", _bucket_waiters)),
    (arg("quota_policy_id"), arg("execution_id"), arg("concurrency_key", default=""),
     arg("window_member"), arg("admitted_at", "int")),
    ok(record(Freed)),
)  # fmt: skip


def _reconciled(reply: Reply) -> QuotaReconciled:
    if reply.status == "ALREADY_SATISFIED":
        return QuotaReconciled(removed_policy=True)
    return QuotaReconciled(reply.int(0), reply.int(1), reply.str(2) == "1")


RECONCILE: Decl[QuotaReconciled] = Decl(
    "ff_reconcile_quota_policy",
    (_q("definition"), _q("window"), _q("concurrency"), _q("admitted"), _q("keys_index"),
     _q("policies")),
    (arg("quota_policy_id"), arg("concurrency_key", default=""), opt("now"), tail("stale")),
    {"OK": _reconciled, "ALREADY_SATISFIED": _reconciled},
)  # fmt: skip

#: Stale members one reconcile call removes at most (the function's own bound).
RECONCILE_PAIRS = 100

DECLS = (CREATE, CHECK, RELEASE, REFUND, RECONCILE)


def quota_ctx(keys: QuotaKeys) -> KeyCtx:
    return KeyCtx(
        tag=keys.tag, quota_policy_id=keys.quota_policy_id, concurrency_key=keys.concurrency_key
    )


class QuotaFunctions:
    """Every call acts on the bucket `keys` names (its `concurrency_key`, or policy-wide)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def create_quota_policy(self, keys: QuotaKeys, q: NewQuotaPolicy) -> QuotaCreated:
        return await call(self.store, CREATE, quota_ctx(keys.bucket("")), {
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
        now: int | None = None,
    ) -> Admission:
        return await call(self.store, CHECK, quota_ctx(keys), {
            "now": now, "window_seconds": window_seconds, "rate_limit": rate_limit,
            "concurrency_cap": concurrency_cap, "execution_id": execution_id,
            "jitter_ms": jitter_ms, "quota_policy_id": keys.quota_policy_id,
            "concurrency_key": keys.concurrency_key,
        })  # fmt: skip

    async def release_admission(self, keys: QuotaKeys, execution_id: str) -> Freed:
        """`released` (a slot was freed) or `not_held`, with the bucket's waiter count."""
        return await call(self.store, RELEASE, quota_ctx(keys), {
            "quota_policy_id": keys.quota_policy_id, "execution_id": execution_id,
            "concurrency_key": keys.concurrency_key,
        })  # fmt: skip

    async def refund_admission(self, keys: QuotaKeys, execution_id: str, got: Admission) -> Freed:
        """Undo the admission `got` (`refunded`, or `not_held` when the slot is no longer
        its own; the window entry goes either way)."""
        return await call(self.store, REFUND, quota_ctx(keys), {
            "quota_policy_id": keys.quota_policy_id, "execution_id": execution_id,
            "concurrency_key": keys.concurrency_key, "window_member": got.window_member,
            "admitted_at": got.admitted_at,
        })  # fmt: skip

    async def reconcile_bucket(
        self, keys: QuotaKeys, stale: Sequence[tuple[str, int]] = (), now: int | None = None
    ) -> QuotaReconciled:
        flat = [v for eid, at in stale for v in (eid, str(at))]
        return await call(self.store, RECONCILE, quota_ctx(keys), {
            "quota_policy_id": keys.quota_policy_id, "concurrency_key": keys.concurrency_key,
            "now": now, "stale": flat,
        })  # fmt: skip
