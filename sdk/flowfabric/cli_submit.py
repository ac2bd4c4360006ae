"""`flowfabric submit-many FILE`: create one execution per JSON line of FILE (`-` = stdin) with
`Client.submit_many` (CreateExecutions, at most 1000 jobs per call).

Each non-blank line is one JSON object of `Client.submit`'s arguments: `kind` (required),
`payload` (any JSON; a string is sent as text), `lane`, `priority`, `namespace`, `tags`,
`idempotency_key`, `execution_id`, `policy` (the policy's JSON object), `delay_until` and
`deadline` (epoch ms), `budgets`, `quota`, `concurrency_key`, `payload_encoding`. Every line is
checked before anything is sent: a bad one exits 2 naming its line number. Then one line per job
(`<line> created|duplicate <execution id>` or `<line> error <reason>: <message>`) and a summary;
`--json` prints one object per job and the summary as JSON. Exit 1 when any job failed.
"""

from __future__ import annotations

import inspect
import json
import sys
from typing import Any

import click

from flowfabric._client_executions import create_request
from flowfabric._errors import FlowFabricError

FIELDS = frozenset(inspect.signature(create_request).parameters)


def read_jobs(path: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, job) per non-blank line; a bad line is a usage error naming it."""
    try:
        text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()  # noqa: SIM115
    except OSError as exc:
        raise click.UsageError(f"cannot read {path}: {exc.strerror}") from None
    jobs: list[tuple[int, dict[str, Any]]] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            job = json.loads(line)
        except ValueError as exc:
            raise click.UsageError(f"line {n}: not JSON: {exc}") from None
        if not isinstance(job, dict):
            raise click.UsageError(f"line {n}: a job is a JSON object")
        if not isinstance(job.get("kind"), str) or not job["kind"]:
            raise click.UsageError(f"line {n}: `kind` (a non-empty string) is required")
        unknown = sorted(set(job) - FIELDS)
        if unknown:
            raise click.UsageError(f"line {n}: unknown field(s) {', '.join(unknown)}")
        try:
            create_request(**job)
        except (TypeError, ValueError) as exc:
            raise click.UsageError(f"line {n}: {exc}") from None
        jobs.append((n, job))
    if not jobs:
        raise click.UsageError(f"{path}: no jobs")
    return jobs


@click.command("submit-many")
@click.argument("path", metavar="FILE")
@click.pass_context
def submit_many(ctx: click.Context, path: str) -> None:
    """Create one execution per JSON line of FILE (`-` = stdin), in batches."""
    from flowfabric.cli import EXIT_REFUSED, _client, _error_message

    jobs = read_jobs(path)
    as_json = bool(ctx.find_root().obj["json"])
    with _client(ctx) as client:
        answers = client.submit_many([job for _, job in jobs])
    counts = {"created": 0, "duplicate": 0, "failed": 0}
    for (n, _), a in zip(jobs, answers, strict=True):
        if isinstance(a, FlowFabricError):
            counts["failed"] += 1
            row = {"line": n, "error": a.reason, "message": _error_message(a)}
            plain = f"{n} error {a.reason}: {_error_message(a)}".rstrip(": ")
        else:
            outcome = "duplicate" if a.duplicate else "created"
            counts[outcome] += 1
            row = {"line": n, outcome: a.execution_id}
            plain = f"{n} {outcome} {a.execution_id}"
        click.echo(json.dumps(row) if as_json else plain)
    if as_json:
        click.echo(json.dumps(counts))
    else:
        click.echo(", ".join(f"{v} {k}" for k, v in counts.items()))
    if counts["failed"]:
        raise SystemExit(EXIT_REFUSED)
