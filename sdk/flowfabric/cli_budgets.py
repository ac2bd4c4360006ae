"""`flowfabric budget ...` and `flowfabric quota ...`: budgets and quota policies from the shell.

    flowfabric budget create [ID] --dim NAME=HARD[:SOFT] ... [--reserve NAME=N ...] [--advisory]
                             [--reset-interval-ms N] [--scope-type T --scope-id S]
                             [--on-hard-limit A] [--on-soft-limit A]
    flowfabric budget show ID            limits, usage, reservations and counters
    flowfabric budget list [--limit N]
    flowfabric budget report ID NAME=DELTA ... [--dedup-key K]
    flowfabric budget reset ID
    flowfabric quota create [ID] --window-seconds N [--max-per-window N] [--max-concurrent N]
                            [--jitter-ms N]
    flowfabric quota show ID | list [--limit N]

The same conventions as the other commands (`flowfabric.cli`): `--json` output (one object, or
one per line for the lists; numbers as numbers), errors on stderr, exit 1 refused, 2 usage,
3 not found, 4 unreachable. A report's breach is an outcome, not an error: `budget report`
prints it and exits 0 (`--json` has it in `outcome`).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import click

from flowfabric._humanize import when
from flowfabric._models import BudgetStatus, QuotaPolicy, UsageReport


@click.group()
def budget() -> None:
    """Budgets: allowances of usage over named dimensions (docs/budgets.md)."""


@click.group()
def quota() -> None:
    """Quota policies: admissions per sliding window and a concurrency cap."""


# After the groups: `flowfabric.cli` registers them when it finishes loading.
from flowfabric.cli import _client, _print, _table  # noqa: E402


def _json(ctx: click.Context) -> bool:
    return bool(ctx.find_root().obj["json"])


def _record(model: Any) -> dict[str, Any]:
    """A model as JSON-ready data, without the raw proto."""
    body = {f.name: getattr(model, f.name) for f in dataclasses.fields(model) if f.name != "raw"}
    data: dict[str, Any] = json.loads(json.dumps(body, default=str))
    return data


def _echo(body: Any) -> None:
    click.echo(json.dumps(body))


def _amount(text: str, what: str) -> int:
    if not text.isdigit():
        raise click.UsageError(f"{what}: {text!r} is not a whole number")
    return int(text)


def _dimension(item: str) -> tuple[str, int | tuple[int, int]]:
    """`NAME=HARD` or `NAME=HARD:SOFT`; NAME may itself hold `:` (`custom:x=10:5`)."""
    name, sep, limits = item.rpartition("=")
    if not sep or not name:
        raise click.UsageError(f"--dim needs NAME=HARD[:SOFT], got {item!r}")
    hard, colon, soft = limits.partition(":")
    if colon:
        return name, (_amount(hard, name), _amount(soft, name))
    return name, _amount(hard, name)


def _delta(item: str, what: str = "usage") -> tuple[str, int]:
    name, sep, value = item.rpartition("=")
    if not sep or not name:
        raise click.UsageError(f"{what} is NAME=N, got {item!r}")
    return name, _amount(value, name)


HARD_LIMIT_ACTIONS = [
    "", "fail", "block", "cancel_running", "suspend", "deny_child", "warn", "reroute_fallback",
    "close_scope",
]  # fmt: skip


# -- budgets ------------------------------------------------------------------------------------


@budget.command(name="create")
@click.argument("budget_id", required=False)
@click.option(
    "--dim", "dims", multiple=True, metavar="NAME=HARD[:SOFT]",
    help="A dimension with its hard (and soft) limit, 0 = none; repeatable.",
)  # fmt: skip
@click.option("--advisory", is_flag=True, help="Count and report only (default: strict).")
@click.option("--reset-interval-ms", default=0, show_default=True, type=click.IntRange(0))
@click.option(
    "--scope-type", default="", type=click.Choice(["", "execution", "flow", "lane", "tenant"])
)
@click.option("--scope-id", default="")
@click.option(
    "--reserve", "reserves", multiple=True, metavar="NAME=N",
    help="Estimate each admitted execution holds on a dimension (docs/budgets.md); repeatable.",
)  # fmt: skip
@click.option(
    "--on-hard-limit", default="", type=click.Choice(HARD_LIMIT_ACTIONS),
    help="block / cancel_running are enforced; the rest are hints (default fail).",
)  # fmt: skip
@click.option("--on-soft-limit", default="", help="Stored hint (default warn).")
@click.pass_context
def budget_create(
    ctx: click.Context,
    budget_id: str | None,
    dims: tuple[str, ...],
    reserves: tuple[str, ...],
    advisory: bool,
    reset_interval_ms: int,
    scope_type: str,
    scope_id: str,
    on_hard_limit: str,
    on_soft_limit: str,
) -> None:
    """Create a budget (ID default: a new UUID); an existing ID is left unchanged."""
    dimensions = dict(_dimension(d) for d in dims)
    if len(dimensions) != len(dims):
        raise click.UsageError("a dimension is given twice")
    reserve = dict(_delta(r, "--reserve") for r in reserves)
    if len(reserve) != len(reserves):
        raise click.UsageError("a reserve is given twice")
    with _client(ctx) as client:
        created = client.create_budget(
            budget_id,
            dimensions=dimensions,
            enforcement="advisory" if advisory else "strict",
            reset_interval_ms=reset_interval_ms,
            scope_type=scope_type,  # type: ignore[arg-type]  # click.Choice checked it
            scope_id=scope_id,
            on_hard_limit=on_hard_limit,  # type: ignore[arg-type]  # click.Choice checked it
            on_soft_limit=on_soft_limit,
            reserve=reserve,
        )
    if _json(ctx):
        _echo(_record(created))
        return
    _print(None, False, [("budget_id", created.budget_id), ("existed", _yes(created.existed))])


def _yes(value: bool) -> str:
    return "yes" if value else "no"


def _ms(value: int | None) -> Any:
    return when(value)


@budget.command(name="show")
@click.argument("budget_id")
@click.pass_context
def budget_show(ctx: click.Context, budget_id: str) -> None:
    """A budget's limits, usage and counters."""
    with _client(ctx) as client:
        status = client.budget(budget_id)
    if _json(ctx):
        _echo(_record(status) | {"exhausted": status.exhausted})
        return
    scope = f"{status.scope_type} {status.scope_id}".strip() or "-"
    last = "-"
    if status.last_breach_at is not None:
        last = f"{status.last_breach_dim} at {when(status.last_breach_at)}"
    _print(
        None,
        False,
        [
            ("budget_id", status.budget_id),
            ("enforcement", status.enforcement),
            ("scope", scope),
            ("exhausted", _yes(status.exhausted)),
            ("on limits", f"hard {status.on_hard_limit}, soft {status.on_soft_limit}"),
            ("breaches", f"{status.breach_count} hard, {status.soft_breach_count} soft"),
            ("in flight", status.in_flight),
            ("last breach", last),
            ("resets", status.reset_count),
            ("reset every", f"{status.reset_interval_ms} ms" if status.reset_interval_ms else "-"),
            ("next reset", _ms(status.next_reset_at)),
            ("created_at", _ms(status.created_at)),
        ],
    )
    if status.dimensions:
        click.echo()
        _table(
            ["dimension", "usage", "hard", "soft", "reserve", "reserved", "remaining"],
            _dimension_rows(status),
        )


def _dimension_rows(status: BudgetStatus) -> list[tuple[Any, ...]]:
    rows = []
    for dim in status.dimensions:
        remaining = status.remaining(dim)
        rows.append(
            (
                dim,
                status.usage.get(dim, 0),
                status.hard_limits.get(dim, 0) or "-",
                status.soft_limits.get(dim, 0) or "-",
                status.reserve.get(dim, 0) or "-",
                status.reserved.get(dim, 0),
                "-" if remaining is None else remaining,
            )
        )
    return rows


@budget.command(name="list")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1))
@click.pass_context
def budget_list(ctx: click.Context, limit: int) -> None:
    """Budgets, partition by partition."""
    listed: list[BudgetStatus] = []
    with _client(ctx) as client:
        for status in client.budgets(page_size=min(limit, 1000)):
            listed.append(status)
            if len(listed) >= limit:
                break
    if _json(ctx):
        for status in listed:
            _echo(_record(status) | {"exhausted": status.exhausted})
        return
    _table(
        ["budget_id", "mode", "scope", "usage", "breaches", "exhausted"],
        [
            (
                s.budget_id,
                s.enforcement,
                f"{s.scope_type}:{s.scope_id}" if s.scope_type else "-",
                _usage_text(s),
                s.breach_count,
                _yes(s.exhausted),
            )
            for s in listed
        ],
    )


def _usage_text(status: BudgetStatus) -> str:
    parts = []
    for dim in status.dimensions:
        hard = status.hard_limits.get(dim, 0)
        used = status.usage.get(dim, 0)
        parts.append(f"{dim}={used}/{hard}" if hard else f"{dim}={used}")
    return ",".join(parts) or "-"


@budget.command(name="report")
@click.argument("budget_id")
@click.argument("usage", nargs=-1, required=True, metavar="NAME=DELTA...")
@click.option("--dedup-key", default=None, help="Makes the report safe to repeat (24 h).")
@click.pass_context
def budget_report(
    ctx: click.Context, budget_id: str, usage: tuple[str, ...], dedup_key: str | None
) -> None:
    """Add usage to a budget: applied whole, or (hard breach) not at all."""
    deltas = dict(_delta(u) for u in usage)
    if len(deltas) != len(usage):
        raise click.UsageError("a dimension is given twice")
    with _client(ctx) as client:
        outcome = client.report_usage(budget_id, deltas, dedup_key=dedup_key)
    if _json(ctx):
        _echo(_record(outcome) | {"applied": outcome.applied})
        return
    _print(None, False, _report_rows(outcome))


def _report_rows(report: UsageReport) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = [
        ("outcome", report.outcome.value),
        ("applied", _yes(report.applied)),
    ]
    if report.dimension is not None:
        limit = "soft" if report.applied else "hard"
        rows.append((report.dimension, f"{report.usage} (limit {report.limit}, {limit})"))
    return rows


@budget.command(name="reset")
@click.argument("budget_id")
@click.pass_context
def budget_reset(ctx: click.Context, budget_id: str) -> None:
    """Zero a budget's usage now (breach counts stay cumulative)."""
    with _client(ctx) as client:
        next_reset = client.reset_budget(budget_id)
    if _json(ctx):
        _echo({"budget_id": budget_id, "next_reset_at": next_reset})
        return
    _print(None, False, [("budget_id", budget_id), ("next reset", _ms(next_reset))])


# -- quota policies -----------------------------------------------------------------------------


@quota.command(name="create")
@click.argument("policy_id", required=False)
@click.option("--window-seconds", required=True, type=click.IntRange(0))
@click.option("--max-per-window", default=0, show_default=True, type=click.IntRange(0))
@click.option("--max-concurrent", default=0, show_default=True, type=click.IntRange(0))
@click.option("--jitter-ms", default=0, show_default=True, type=click.IntRange(0))
@click.pass_context
def quota_create(
    ctx: click.Context,
    policy_id: str | None,
    window_seconds: int,
    max_per_window: int,
    max_concurrent: int,
    jitter_ms: int,
) -> None:
    """Create a quota policy (ID default: a new UUID); an existing ID is left unchanged."""
    with _client(ctx) as client:
        created = client.create_quota_policy(
            policy_id,
            window_seconds=window_seconds,
            max_per_window=max_per_window,
            max_concurrent=max_concurrent,
            jitter_ms=jitter_ms,
        )
    if _json(ctx):
        _echo(_record(created))
        return
    _print(
        None,
        False,
        [("quota_policy_id", created.quota_policy_id), ("existed", _yes(created.existed))],
    )


def _quota_rows(policy: QuotaPolicy) -> list[tuple[str, Any]]:
    return [
        ("quota_policy_id", policy.quota_policy_id),
        ("window", f"{policy.window_seconds} s"),
        ("max per window", policy.max_per_window or "-"),
        ("max concurrent", policy.max_concurrent or "-"),
        ("jitter", f"{policy.jitter_ms} ms"),
        ("in window now", policy.current_window_requests),
        ("concurrent now", policy.current_concurrency),
        ("created_at", when(policy.created_at)),
    ]


@quota.command(name="show")
@click.argument("policy_id")
@click.pass_context
def quota_show(ctx: click.Context, policy_id: str) -> None:
    """A quota policy with its live concurrency and current-window admissions."""
    with _client(ctx) as client:
        policy = client.quota_policy(policy_id)
    if _json(ctx):
        _echo(_record(policy))
        return
    _print(None, False, _quota_rows(policy))


@quota.command(name="list")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1))
@click.pass_context
def quota_list(ctx: click.Context, limit: int) -> None:
    """Quota policies, partition by partition."""
    listed: list[QuotaPolicy] = []
    with _client(ctx) as client:
        for policy in client.quota_policies(page_size=min(limit, 1000)):
            listed.append(policy)
            if len(listed) >= limit:
                break
    if _json(ctx):
        for policy in listed:
            _echo(_record(policy))
        return
    _table(
        ["quota_policy_id", "window_s", "per_window", "concurrent", "in_window", "held"],
        [
            (
                p.quota_policy_id,
                p.window_seconds,
                p.max_per_window or "-",
                p.max_concurrent or "-",
                p.current_window_requests,
                p.current_concurrency,
            )
            for p in listed
        ],
    )
