"""Retries: the execution retry policy helper, and transport retries of the SDK's own calls."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from flowfabric._errors import FlowFabricError, from_rpc_error
from flowfabric.v1 import types_pb2

T = TypeVar("T")


def policy_json(policy: Mapping[str, Any] | str, budgets: Sequence[str] = ()) -> str:
    """An execution policy given as its JSON shape (a mapping or text) as the text to send, with
    `budgets` added to its `budget_ids`. The server checks the shape and names a bad field; this
    only refuses what is not a JSON object (ValueError)."""
    if isinstance(policy, str) and not budgets:
        return policy
    if isinstance(policy, str):
        try:
            body = json.loads(policy)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise ValueError("policy is not a JSON object")
    else:
        body = dict(policy)
    if budgets:
        ids = body.get("budget_ids") or []
        body["budget_ids"] = list(dict.fromkeys([*ids, *budgets]))
    try:
        return json.dumps(body, separators=(",", ":"))
    except TypeError as exc:
        raise ValueError(f"policy is not JSON: {exc}") from None


@dataclass(frozen=True)
class RetryPolicy:
    """How an execution is retried after a failed attempt (stored at submit).

    Attributes:
        max_retries: Retries allowed (max_retries + 1 runs in all).
        backoff_ms: The delay before the first retry (exponential) or every retry (fixed).
        exponential: Grow the delay by `multiplier` per retry, capped at `max_backoff_ms`.
        max_backoff_ms: Cap of the exponential delay.
        multiplier: Growth per retry of the exponential delay.
        retryable_categories: Failure categories that may retry; empty = every category.
    """

    max_retries: int = 3
    backoff_ms: int = 1_000
    exponential: bool = True
    max_backoff_ms: int = 60_000
    multiplier: float = 2.0
    retryable_categories: tuple[str, ...] = ()

    @classmethod
    def fixed(cls, max_retries: int, backoff_ms: int) -> RetryPolicy:
        """Retry `max_retries` times, `backoff_ms` apart."""
        return cls(max_retries=max_retries, backoff_ms=backoff_ms, exponential=False)

    def to_proto(self) -> types_pb2.ExecutionPolicy:
        if self.exponential:
            backoff = types_pb2.Backoff(
                type="exponential",
                initial_delay_ms=self.backoff_ms,
                max_delay_ms=self.max_backoff_ms,
                multiplier=self.multiplier,
            )
        else:
            backoff = types_pb2.Backoff(type="fixed", delay_ms=self.backoff_ms)
        return types_pb2.ExecutionPolicy(
            retry_policy=types_pb2.RetryPolicy(
                max_retries=self.max_retries,
                backoff=backoff,
                retryable_categories=list(self.retryable_categories),
            )
        )


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter for transport retries (100 ms → 5 s, bounded attempts)."""

    initial_s: float = 0.1
    max_s: float = 5.0
    multiplier: float = 2.0
    max_attempts: int = 6

    def delay(self, retry: int) -> float:
        """Delay before retry number `retry` (0-based): half fixed, half random."""
        base = min(self.initial_s * self.multiplier**retry, self.max_s)
        return base / 2 + random.uniform(0, base / 2)


RETRY_CODES = frozenset({grpc.StatusCode.UNAVAILABLE})


async def with_retries(
    attempt: Callable[[], Awaitable[T]], backoff: Backoff, *, retry: bool = True
) -> T:
    """Run `attempt` (one RPC, or anything raising typed errors such as one item of a batch
    call), retrying UNAVAILABLE with backoff; raise typed errors."""
    tries = 0
    while True:
        try:
            return await attempt()
        except grpc.aio.AioRpcError as exc:
            error: FlowFabricError = from_rpc_error(exc)
            tries += 1
            if not retry or error.code not in RETRY_CODES or tries >= backoff.max_attempts:
                raise error from exc
        except FlowFabricError as exc:
            error = exc
            tries += 1
            if not retry or error.code not in RETRY_CODES or tries >= backoff.max_attempts:
                raise
        await asyncio.sleep(max(backoff.delay(tries - 1), error.retry_delay or 0.0))
