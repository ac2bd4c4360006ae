"""`flowfabric lanes ...` and `flowfabric bulk ...`: lane control and bulk actions
(docs/lanes.md).

    flowfabric lanes list | get LANE
    flowfabric lanes pause LANE [--reason T] | resume LANE | drain LANE [--reason T] [--wait]
    flowfabric bulk cancel|replay [--lane L] [--state S]... [--kind K] [--tag k=v]...
                                  [--older-than 10m] [--reason T] [--dry-run] [--wait]
    flowfabric bulk get ID [--wait] | list | stop ID

`--wait` follows a job (or a drain) to its end: a progress bar on a terminal, a plain line
every second otherwise (one JSON object per line with `--json`). The same conventions as the
other commands (`flowfabric.cli`): errors on stderr, exit 1 refused, 2 usage, 3 not found,
4 unreachable.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

import click

from flowfabric._client_lanes import BULK_STATES, BulkAction, Lane

POLL_S = 1.0
_UNITS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


@click.group()
def lanes() -> None:
    """Lanes: pause, resume, drain, and depth by state."""


@click.group()
def bulk() -> None:
    """Bulk cancel / replay by filter, as durable server-side jobs."""


# After the groups: `flowfabric.cli` registers them when it finishes loading.
from flowfabric.cli import _client, _print, _table  # noqa: E402


def _json(ctx: click.Context) -> bool:
    return bool(ctx.find_root().obj["json"])


def _echo(obj: Any) -> None:
    click.echo(json.dumps(dataclasses.asdict(obj)))


def _depth(lane: Lane) -> str:
    return " ".join(f"{k}={v}" for k, v in lane.depth.items() if v) or "empty"


def _show_lane(ctx: click.Context, lane: Lane) -> None:
    if _json(ctx):
        _echo(lane)
        return
    control = lane.control + (" (drained)" if lane.drained else "")
    _print(None, False, [
        ("lane", lane.lane_id), ("control", control), ("reason", lane.reason or "-"),
        ("depth", _depth(lane)), ("head age", f"{lane.head_age_ms} ms"),
    ])  # fmt: skip


@lanes.command(name="list")
@click.pass_context
def list_lanes(ctx: click.Context) -> None:
    """Every lane with its control state and depth by state."""
    with _client(ctx) as client:
        rows = client.lanes()
    if _json(ctx):
        for lane in rows:
            _echo(lane)
        return
    _table(
        ["lane", "control", "eligible", "delayed", "active", "suspended", "blocked", "head_age_ms"],
        [
            [x.lane_id, x.control + ("*" if x.drained else ""), x.depth.get("eligible", 0),
             x.depth.get("delayed", 0), x.depth.get("active", 0), x.depth.get("suspended", 0),
             sum(v for k, v in x.depth.items() if k.startswith("blocked:")), x.head_age_ms]
            for x in rows
        ],
    )  # fmt: skip


@lanes.command(name="get")
@click.argument("lane")
@click.pass_context
def get_lane(ctx: click.Context, lane: str) -> None:
    """One lane: control state, reason, depth by state."""
    with _client(ctx) as client:
        _show_lane(ctx, client.lane(lane))


@lanes.command(name="pause")
@click.argument("lane")
@click.option("--reason", default="", help="Shown by `lanes get` (at most 256 bytes).")
@click.pass_context
def pause(ctx: click.Context, lane: str, reason: str) -> None:
    """Stop handing out the lane's work; everything in it stays."""
    with _client(ctx) as client:
        _show_lane(ctx, client.pause_lane(lane, reason=reason))


@lanes.command(name="resume")
@click.argument("lane")
@click.pass_context
def resume(ctx: click.Context, lane: str) -> None:
    """Hand out the lane's work again."""
    with _client(ctx) as client:
        _show_lane(ctx, client.resume_lane(lane))


@lanes.command(name="drain")
@click.argument("lane")
@click.option("--reason", default="", help="Shown by `lanes get` (at most 256 bytes).")
@click.option("--wait", is_flag=True, help="Wait until all of the lane's work is terminal.")
@click.pass_context
def drain(ctx: click.Context, lane: str, reason: str, wait: bool) -> None:
    """Refuse new creates; workers finish what is there."""
    with _client(ctx) as client:
        got = client.drain_lane(lane, reason=reason)
        while wait and not got.drained and got.control == "draining":
            if not _json(ctx):
                left = sum(n for s, n in got.depth.items() if s != "terminal")
                click.echo(f"{lane}: {left} not terminal", err=True)
            time.sleep(POLL_S)
            got = client.lane(lane)
        _show_lane(ctx, got)


# -- bulk ------------------------------------------------------------------------------------


def parse_age(text: str) -> int:
    """`500ms`, `30s`, `10m`, `2h`, `7d` or a number of ms -> ms."""
    m = re.fullmatch(r"\s*(\d+)\s*(ms|s|m|h|d)?\s*", text)
    if not m:
        raise click.UsageError(f"--older-than needs a duration like 30s, 10m, 2h, 7d; got {text!r}")
    return int(m.group(1)) * _UNITS[m.group(2) or "ms"]


def _tags(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.UsageError(f"--tag needs key=value, got {item!r}")
        out[key] = value
    return out


def _line(job: BulkAction) -> str:
    return (
        f"{job.bulk_action_id} {job.action} {job.state}: {job.processed}/{job.total} "
        f"(done {job.done}, skipped {job.skipped}, failed {job.failed})"
        + (f" last error {job.last_error}" if job.last_error else "")
    )


def _follow(ctx: click.Context, client: Any, job: BulkAction) -> BulkAction:
    """Poll the job to its end: a progress bar on a TTY, periodic lines otherwise."""
    if _json(ctx) or not sys.stdout.isatty():
        while not job.finished:
            click.echo(json.dumps(dataclasses.asdict(job)) if _json(ctx) else _line(job))
            time.sleep(POLL_S)
            job = client.bulk_action(job.bulk_action_id)
        return job
    with click.progressbar(length=max(job.total, 1), label=f"{job.action} {job.bulk_action_id[:8]}",
                           show_pos=True) as bar:  # fmt: skip
        shown = 0
        while True:
            now = min(job.processed, max(job.total, 1))
            bar.update(now - shown)
            shown = now
            if job.finished:
                break
            time.sleep(POLL_S)
            job = client.bulk_action(job.bulk_action_id)
    return job


def _finish(ctx: click.Context, job: BulkAction) -> None:
    if _json(ctx):
        _echo(job)
    else:
        click.echo(_line(job))
    if job.failed:
        raise SystemExit(1)


def _start(action: str):  # type: ignore[no-untyped-def]
    @bulk.command(name=action)
    @click.option("--lane", default="", help="Only this lane.")
    @click.option("--state", "states", multiple=True, type=click.Choice(BULK_STATES),
                  help="Only these public states (repeatable).")  # fmt: skip
    @click.option("--kind", default="", help="Only this execution kind.")
    @click.option("--tag", "tags", multiple=True, help="namespace.key=value (repeatable).")
    @click.option("--older-than", default=None, help="Created at least this long ago (10m, 2h).")
    @click.option("--reason", default="", help="Recorded on the job and each cancel.")
    @click.option("--dry-run", is_flag=True, help="Only count the matches.")
    @click.option("--wait", is_flag=True, help="Follow the job to its end.")
    @click.pass_context
    def cmd(
        ctx: click.Context, lane: str, states: tuple[str, ...], kind: str,
        tags: tuple[str, ...], older_than: str | None, reason: str, dry_run: bool, wait: bool,
    ) -> None:  # fmt: skip
        age = parse_age(older_than) if older_than is not None else 0
        tag_map = _tags(tags)
        if not (lane or states or kind or tag_map or age):
            raise click.UsageError(
                "an empty filter matches everything: give --lane, --state, --kind, --tag "
                "or --older-than"
            )
        with _client(ctx) as client:
            out = getattr(client, f"bulk_{action}")(
                lane=lane, states=states, kind=kind, tags=tag_map, older_than_ms=age,
                reason=reason, dry_run=dry_run,
            )  # fmt: skip
            if dry_run:
                click.echo(json.dumps({"matched": out}) if _json(ctx) else f"{out} match")
                return
            if wait:
                out = _follow(ctx, client, out)
        _finish(ctx, out) if wait else (_echo(out) if _json(ctx) else click.echo(_line(out)))

    cmd.__doc__ = f"Start a durable bulk {action} of the matching executions."


_start("cancel")
_start("replay")


@bulk.command(name="get")
@click.argument("bulk_action_id")
@click.option("--wait", is_flag=True, help="Follow the job to its end.")
@click.pass_context
def get_bulk(ctx: click.Context, bulk_action_id: str, wait: bool) -> None:
    """A bulk job and its progress."""
    with _client(ctx) as client:
        job = client.bulk_action(bulk_action_id)
        if wait:
            job = _follow(ctx, client, job)
    _finish(ctx, job) if wait else (_echo(job) if _json(ctx) else click.echo(_line(job)))


@bulk.command(name="list")
@click.pass_context
def list_bulk(ctx: click.Context) -> None:
    """Bulk jobs, newest first."""
    with _client(ctx) as client:
        rows = list(client.bulk_actions())
    if _json(ctx):
        for job in rows:
            _echo(job)
        return
    _table(
        ["bulk_action_id", "action", "state", "progress", "done", "skipped", "failed"],
        [[j.bulk_action_id, j.action, j.state, f"{j.processed}/{j.total}", j.done, j.skipped,
          j.failed] for j in rows],
    )  # fmt: skip


@bulk.command(name="stop")
@click.argument("bulk_action_id")
@click.pass_context
def stop(ctx: click.Context, bulk_action_id: str) -> None:
    """Stop a running job after its current page."""
    with _client(ctx) as client:
        job = client.cancel_bulk_action(bulk_action_id)
    _echo(job) if _json(ctx) else click.echo(_line(job))
