"""`flowfabric schedules ...`: periodic work from the shell (docs/schedules.md).

    flowfabric schedules create KIND (--cron EXPR [--tz ZONE] | --every-ms N) [--lane L]
                                [--payload TEXT] [--overlap skip|allow|cancel_previous]
                                [--catch-up none|last|all] [--id ID]
    flowfabric schedules show ID [--next N]     the schedule and its next fire times
    flowfabric schedules list
    flowfabric schedules pause ID | resume ID | delete ID | trigger ID

The same conventions as the other commands (`flowfabric.cli`): `--json` output, errors on
stderr, exit 1 refused, 2 usage, 3 not found, 4 unreachable.
"""

from __future__ import annotations

import dataclasses
import json

import click

from flowfabric._client_schedules import CatchUp, Overlap, Schedule


@click.group()
def schedules() -> None:
    """Schedules: submit an execution on a cron expression or an interval."""


# After the group: `flowfabric.cli` registers it when it finishes loading.
from flowfabric.cli import _client, _print, _table  # noqa: E402


def _json(ctx: click.Context) -> bool:
    return bool(ctx.find_root().obj["json"])


def _echo(s: Schedule) -> None:
    click.echo(json.dumps(dataclasses.asdict(s)))


@schedules.command(name="create")
@click.argument("kind")
@click.option("--cron", default="", help="5 fields: minute hour day-of-month month day-of-week.")
@click.option("--tz", "time_zone", default="", help="IANA time zone of --cron (default UTC).")
@click.option("--every-ms", "interval_ms", type=int, default=0, help="A fixed interval instead.")
@click.option("--lane", default="default", show_default=True)
@click.option("--payload", default="", help="Input payload (text).")
@click.option("--overlap", type=click.Choice(["skip", "allow", "cancel_previous"]), default="skip")
@click.option("--catch-up", type=click.Choice(["none", "last", "all"]), default="none")
@click.option("--id", "schedule_id", default=None, help="A UUID; default: a new one.")
@click.pass_context
def create(
    ctx: click.Context, kind: str, cron: str, time_zone: str, interval_ms: int, lane: str,
    payload: str, overlap: Overlap, catch_up: CatchUp, schedule_id: str | None,
) -> None:  # fmt: skip
    """Create a schedule submitting KIND."""
    with _client(ctx) as client:
        sid, created = client.create_schedule(
            kind, cron=cron, time_zone=time_zone, interval_ms=interval_ms, lane=lane,
            payload=payload.encode(), overlap=overlap, catch_up=catch_up,
            schedule_id=schedule_id,
        )  # fmt: skip
    if _json(ctx):
        click.echo(json.dumps({"schedule_id": sid, "created": created}))
    else:
        click.echo(sid if created else f"{sid} (already existed)")


@schedules.command(name="show")
@click.argument("schedule_id")
@click.option("--next", "next_count", type=int, default=5, show_default=True)
@click.pass_context
def show(ctx: click.Context, schedule_id: str, next_count: int) -> None:
    """A schedule and its next fire times (epoch ms)."""
    with _client(ctx) as client:
        s = client.schedule(schedule_id, next_count=next_count)
    if _json(ctx):
        _echo(s)
        return
    when = f"cron {s.cron} {s.time_zone or 'UTC'}" if s.cron else f"every {s.interval_ms} ms"
    _print(
        None,
        False,
        [
            ("schedule_id", s.schedule_id), ("state", s.state), ("timetable", when),
            ("kind", f"{s.execution_kind} on {s.lane_id}"),
            ("policies", f"overlap {s.overlap}, catch-up {s.catch_up}"),
            ("fired", f"{s.fire_count} (skipped {s.skip_count})"),
            ("last execution", s.last_execution_id or "-"),
            ("next", " ".join(map(str, s.next_fire_times))),
        ],
    )  # fmt: skip


@schedules.command(name="list")
@click.pass_context
def list_(ctx: click.Context) -> None:
    """Every schedule."""
    with _client(ctx) as client:
        rows = list(client.schedules())
    if _json(ctx):
        for s in rows:
            _echo(s)
        return
    _table(
        ["schedule_id", "state", "timetable", "kind", "next_fire_at"],
        [
            [s.schedule_id, s.state, s.cron or f"{s.interval_ms}ms", s.execution_kind,
             s.next_fire_at]
            for s in rows
        ],
    )  # fmt: skip


def _simple(name: str, doc: str) -> None:
    @schedules.command(name=name, help=doc)
    @click.argument("schedule_id")
    @click.pass_context
    def cmd(ctx: click.Context, schedule_id: str) -> None:
        with _client(ctx) as client:
            out = getattr(client, f"{name}_schedule")(schedule_id)
        if name == "trigger":
            eid, dup = out
            click.echo(json.dumps({"execution_id": eid, "duplicate": dup}) if _json(ctx) else eid)
        elif _json(ctx):
            click.echo(json.dumps({"schedule_id": schedule_id, name: True, "result": out}))
        else:
            click.echo(f"{name}: {schedule_id}")


_simple("pause", "Pause a schedule: no slot fires until resumed.")
_simple("resume", "Resume from the first slot after now.")
_simple("delete", "Delete a schedule (its executions are kept).")
_simple("trigger", "Submit the template now, outside the timetable.")
