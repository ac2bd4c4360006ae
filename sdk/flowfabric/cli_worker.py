"""`flowfabric worker MODULE[:ATTR]`: run a module's tasks, or its `Worker` (docs/tasks.md).

ATTR names a `Worker` (run as configured; the flags given override its lanes, capabilities
and concurrency) or a `Task`; without it the module's `Task` attributes run on a new worker
of `--target` / `--token`. The first SIGTERM or SIGINT drains (in-flight tasks finish or are
handed back), a second exits at once; `--burst` exits 0 once the lanes have nothing
claimable and nothing is in flight.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import sys
import threading

import click

from flowfabric._client import Client
from flowfabric._errors import FlowFabricError
from flowfabric._tasks import Task, tasks_of
from flowfabric._worker import Worker

#: --burst: how often the lanes are checked for work once nothing is in flight.
BURST_CHECK_S = 0.25


def load_worker(spec: str, target: str, token: str | None) -> Worker:
    """The worker `MODULE[:ATTR]` names (click.UsageError naming what is wrong)."""
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as celery and rq do: the app is where you run it
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the app's own import error, named on one line
        raise click.UsageError(
            f"cannot import {module_name!r}: {type(exc).__name__}: {exc}"
        ) from None
    if attr:
        value = getattr(module, attr, None)
        if isinstance(value, Worker):
            return value
        if not isinstance(value, Task):
            raise click.UsageError(f"{spec}: not a flowfabric Worker or task ({value!r})")
        found = [value]
    else:
        found = tasks_of(module)
        if not found:
            raise click.UsageError(f"{module_name} defines no tasks (@flowfabric.task)")
    worker = Worker(target, token=token)
    for made in found:
        worker.add_task(made)
    return worker


def _in_flight(worker: Worker) -> int:
    s = worker.stats
    return max(s.claimed - s.completed - s.failed - s.released - s.suspended - s.lease_lost, 0)


async def _summaries(worker: Worker, every: float) -> None:
    while True:
        await asyncio.sleep(every)
        s = worker.stats
        click.echo(
            f"flowfabric worker: {s.completed} completed, {s.failed} failed, "
            f"{_in_flight(worker)} in flight",
            err=True,
        )


async def _burst(worker: Worker, client: Client) -> None:
    """Stop the worker once two checks in a row find nothing in flight and every lane's
    eligible index empty."""
    quiet = 0
    while quiet < 2:
        await asyncio.sleep(BURST_CHECK_S)
        empty = _in_flight(worker) == 0
        for lane in worker.lanes:
            if empty:
                empty = not (await client.list(lane=lane, state="eligible", limit=1)).executions
        quiet = quiet + 1 if empty else 0
    worker.stop()


async def serve_worker(worker: Worker, burst: bool, summary_every: float) -> None:
    async with worker:
        click.echo(
            f"flowfabric worker {worker.worker_instance_id}: lanes {','.join(worker.lanes)}, "
            f"kinds {','.join(worker.kinds)}, concurrency {worker.concurrency}"
            + (f", capabilities {','.join(worker.capabilities)}" if worker.capabilities else "")
            + (", burst" if burst else ""),
            err=True,
        )
        helpers = []
        if summary_every > 0:
            helpers.append(asyncio.create_task(_summaries(worker, summary_every)))
        if burst:
            helpers.append(asyncio.create_task(_burst(worker, worker.client)))
        try:
            await worker.run()
        finally:
            for helper in helpers:
                helper.cancel()
    s = worker.stats
    click.echo(
        f"flowfabric worker stopped: {s.completed} completed, {s.failed} failed, "
        f"{s.released} handed back",
        err=True,
    )


def _csv(value: str | None) -> list[str] | None:
    return None if value is None else [v for v in value.split(",") if v]


@click.command("worker")
@click.argument("app")
@click.option("--concurrency", type=click.IntRange(min=1), help="Tasks at once (default 16).")
@click.option("--lanes", help="Comma-separated lanes to claim from (default: default).")
@click.option("--capabilities", help="Comma-separated capability tokens to advertise.")
@click.option("--burst", is_flag=True, help="Exit once the lanes are empty.")
@click.option(
    "--summary-every",
    type=click.FloatRange(min=0),
    default=60.0,
    show_default=True,
    help="Seconds between summary lines (0 = none).",
)
@click.pass_context
def worker(
    ctx: click.Context,
    app: str,
    concurrency: int | None,
    lanes: str | None,
    capabilities: str | None,
    burst: bool,
    summary_every: float,
) -> None:
    """Run the tasks of MODULE (or the Worker or task MODULE:ATTR) until signalled."""
    obj = ctx.find_root().obj
    if not logging.getLogger().handlers:  # the worker's own lines (signals, failures) on stderr
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    chosen = load_worker(app, obj["target"], obj["token"])
    lane_list = _csv(lanes)
    if lane_list is not None:
        if not lane_list:
            raise click.BadParameter("at least one lane", param_hint="--lanes")
        chosen.lanes = tuple(lane_list)
    if capabilities is not None:
        chosen.capabilities = tuple(_csv(capabilities) or ())
    if concurrency is not None:
        chosen.concurrency = concurrency
    try:
        asyncio.run(serve_worker(chosen, burst, summary_every))
    except FlowFabricError as exc:
        from flowfabric.cli import _fail

        _fail(exc, bool(obj["json"]))
    if threading.active_count() > 1:  # a plain-def task still running: Python cannot stop it
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
