"""The `flowfabric` command line.

    flowfabric serve [--flag value ...]       run the server (every FF_* setting is also a flag)
    flowfabric submit KIND [--payload ...]    create an execution
    flowfabric submit-many FILE               one execution per JSON line (cli_submit)
    flowfabric get | cancel | replay | watch EXECUTION_ID
    flowfabric result EXECUTION_ID [--raw]   the result, or why there is none (exit 5)
    flowfabric why EXECUTION_ID [--json]       why it is not running, with an ETA when known
    flowfabric list [--lane L] [--state S]
    flowfabric tail EXECUTION_ID [--attempt N] [-f] [--after CURSOR]   print an attempt's frames
    flowfabric signal EXECUTION_ID NAME [--payload JSON] [--waitpoint ID] [--token T]
    flowfabric waitpoints EXECUTION_ID        open waitpoints with their tokens
    flowfabric watch-signals EXECUTION_ID [--waitpoint ID]
    flowfabric resume EXECUTION_ID [--delay-ms N]   operator resume of a suspended execution
    flowfabric worker MODULE[:ATTR] [--burst]  run a module's tasks or Worker (cli_worker)
    flowfabric admin info | kids [--partition N] | rotate-secret --kid K [--secret-hex H]
    flowfabric flow submit FILE [--wait] | show ID | cancel ID [--wait] | replay ID   (cli_flows)
    flowfabric budget create | show | list | report | reset;  quota create | show | list
                                              budgets and quota policies (cli_budgets)

Client commands talk gRPC to `--target` (env FF_TARGET, default 127.0.0.1:50051) with the bearer
token `--token` (env FF_API_TOKEN). Tables by default (times in UTC with their distance from
now, sdk/flowfabric/_humanize.py), `--json` for scripts (raw epoch ms).

Exit codes: 0 ok; 1 the server refused (the ErrorInfo reason is printed); 2 bad input (a usage
error, or INVALID_ARGUMENT from the server); 3 not found (`result`: not finished yet); 4 server
unreachable; 5 (`watch`, `result`, `flow submit --wait`) the execution or flow ended other than
completed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import secrets
import sys
from collections.abc import AsyncGenerator, Iterator, Sequence
from datetime import timedelta
from typing import Any

import click
import grpc
from google.protobuf import json_format

from flowfabric._client import Client, ExecutionState
from flowfabric._errors import ExecutionFailed, FlowFabricError, ResultNotReady
from flowfabric._humanize import stamp, when
from flowfabric._models import STATE_INDEXES
from flowfabric._signals import Signal, Waitpoint, choose_waitpoints
from flowfabric._sync import SyncClient, blocking, blocking_iter
from flowfabric._why import WhyBudget, WhyCapability, WhyDependencies, WhyQuota, WhySuspension
from flowfabric.v1 import admin_pb2, execution_pb2, signal_pb2, stream_pb2
from flowfabric.v1 import types_pb2 as t

EXIT_REFUSED, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_UNREACHABLE, EXIT_NOT_COMPLETED = 1, 2, 3, 4, 5
ROTATE_ATTEMPTS = 3
_UNREACHABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


class _CommandClient(Client):
    """`Client` plus the calls only the CLI makes: a create from a request as given (the
    `--policy` JSON goes to the server verbatim), the server's versions, and the tail's raw
    messages (with the close markers)."""

    async def create(
        self, request: execution_pb2.CreateExecutionRequest
    ) -> execution_pb2.CreateExecutionResponse:
        """CreateExecution, retried on UNAVAILABLE only when an idempotency key or an id makes
        a repeat harmless (as `submit`)."""
        safe = bool(request.idempotency_key or request.execution_id)
        transport = self._transport
        return await transport.unary(transport.executions.CreateExecution, request, retry=safe)

    async def server_info(self) -> admin_pb2.GetServerInfoResponse:
        transport = self._transport
        return await transport.unary(
            transport.admin.GetServerInfo, admin_pb2.GetServerInfoRequest()
        )

    async def result_reply(self, execution_id: str) -> execution_pb2.GetExecutionResultResponse:
        """GetExecutionResult as the server answers it; an execution that completed without a
        result answers an empty reply (as `Client.result`)."""
        transport = self._transport
        request = execution_pb2.GetExecutionResultRequest(execution_id=execution_id)
        try:
            reply: execution_pb2.GetExecutionResultResponse = await transport.unary(
                transport.executions.GetExecutionResult, request
            )
        except ResultNotReady:
            if await self.state(execution_id) is ExecutionState.COMPLETED:
                return execution_pb2.GetExecutionResultResponse()
            raise
        return reply

    def tail_messages(
        self, execution_id: str, attempt_index: int, *, after: str, follow: bool
    ) -> AsyncGenerator[stream_pb2.TailAttemptStreamResponse, None]:
        return self._tail_messages(execution_id, attempt_index, after=after, follow=follow)


class CommandClient(SyncClient):
    """The blocking client of the commands: `SyncClient` and the CLI's own calls."""

    _client_class = _CommandClient
    create = blocking(_CommandClient.create)
    server_info = blocking(_CommandClient.server_info)
    result_reply = blocking(_CommandClient.result_reply)
    tail_messages = blocking_iter(_CommandClient.tail_messages)


def _state_name(number: int) -> str:
    return ExecutionState(number).name.lower()


def _error_message(exc: FlowFabricError) -> str:
    """The server's message without the reason it often starts with (printed once)."""
    message = exc.message
    if exc.reason and message.startswith(f"{exc.reason}: "):
        message = message[len(exc.reason) + 2 :]
    elif message == exc.reason:
        message = ""
    return message


def _fail(exc: FlowFabricError, as_json: bool = False) -> None:
    """Print a refused call's error on stderr (one line; a JSON object under --json) and exit
    with its code."""
    message = _error_message(exc)
    if as_json:
        body = {"code": exc.code.name, "reason": exc.reason, "message": message,
                "metadata": exc.metadata}  # fmt: skip
        click.echo(json.dumps({"error": body}), err=True)
    else:
        head = f"error: {exc.code.name} {exc.reason}".rstrip()
        click.echo(f"{head}: {message}" if message else head, err=True)
    if exc.code == grpc.StatusCode.NOT_FOUND:
        raise SystemExit(EXIT_NOT_FOUND)
    if exc.code == grpc.StatusCode.INVALID_ARGUMENT:
        raise SystemExit(EXIT_USAGE)  # the server found the input bad: the same as a usage error
    if exc.code in _UNREACHABLE:
        raise SystemExit(EXIT_UNREACHABLE)
    raise SystemExit(EXIT_REFUSED)


@contextlib.contextmanager
def _client(ctx: click.Context) -> Iterator[CommandClient]:
    """The command's client; a refused call prints its error and exits with its code."""
    obj = ctx.find_root().obj
    client = CommandClient(obj["target"], token=obj["token"], default_timeout=obj["timeout"])
    try:
        yield client
    except FlowFabricError as exc:
        _fail(exc, bool(obj["json"]))
    finally:
        client.close()


def _print(obj: Any, as_json: bool, rows: Sequence[tuple[str, Any]] = ()) -> None:
    if as_json:
        click.echo(json_format.MessageToJson(obj, preserving_proto_field_name=True, indent=None))
        return
    width = max((len(k) for k, _ in rows), default=0)
    for key, value in rows:
        click.echo(f"{key.ljust(width)}  {value}".rstrip(" "))


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    click.echo("  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)))
    for row in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="flowfabric", message="flowfabric %(version)s")
@click.option(
    "--target",
    envvar="FF_TARGET",
    default="127.0.0.1:50051",
    show_default=True,
    help="Server address (env FF_TARGET).",
)
@click.option(
    "--token", envvar="FF_API_TOKEN", default=None, help="Bearer token (env FF_API_TOKEN)."
)
@click.option("--timeout", default=10.0, show_default=True, help="Per-call deadline in seconds.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")
@click.pass_context
def main(ctx: click.Context, target: str, token: str | None, timeout: float, as_json: bool) -> None:
    """FlowFabric: a durable execution control plane on gRPC and Valkey Functions."""
    ctx.obj = {"target": target, "token": token or None, "timeout": timeout, "json": as_json}


@main.command(
    context_settings={
        "ignore_unknown_options": True,
        "allow_extra_args": True,
        "help_option_names": [],
    }
)
@click.argument("flags", nargs=-1, type=click.UNPROCESSED)
def serve(flags: tuple[str, ...]) -> None:
    """Run the server (embedded Valkey unless FF_VALKEY_URL is set). `serve --help` lists flags."""
    # The server's entry point: the only place the SDK loads the server (tests/test_layers.py).
    from flowfabric.server.main import serve_command

    serve_command(list(flags))


@main.command()
@click.argument("kind")
@click.option("--payload", default="", help="Input payload (text); use @FILE to read a file.")
@click.option("--lane", default="default", show_default=True)
@click.option("--priority", default=0, show_default=True, type=int)
@click.option("--namespace", default="default", show_default=True)
@click.option("--idempotency-key", default=None)
@click.option("--delay-ms", default=None, type=int, help="Start no earlier than now + this.")
@click.option("--tag", "tags", multiple=True, help="key=value (key like app.name); repeatable.")
@click.option("--policy", "policy_json", default=None, help="Execution policy as JSON.")
@click.option("--budget", "budgets", multiple=True, help="Attach a budget (id); repeatable.")
@click.option("--quota", "quota_id", default=None, help="Attach a quota policy (id).")
@click.option("--concurrency-key", default=None, help="The quota's per-key bucket (needs --quota).")
@click.pass_context
def submit(
    ctx: click.Context,
    kind: str,
    payload: str,
    lane: str,
    priority: int,
    namespace: str,
    idempotency_key: str | None,
    delay_ms: int | None,
    tags: tuple[str, ...],
    policy_json: str | None,
    budgets: tuple[str, ...],
    quota_id: str | None,
    concurrency_key: str | None,
) -> None:
    """Create an execution of KIND."""
    import time

    data = _read_at_file(payload[1:], "--payload") if payload.startswith("@") else payload.encode()
    tag_map = {}
    for item in tags:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.UsageError(f"--tag needs key=value, got {item!r}")
        tag_map[key] = value
    request = execution_pb2.CreateExecutionRequest(
        execution_kind=kind,
        input_payload=data,
        lane_id=lane,
        priority=priority,
        namespace=namespace,
        tags=tag_map,
    )
    if idempotency_key:
        request.idempotency_key = idempotency_key
    if delay_ms is not None:
        request.delay_until = int(time.time() * 1000) + delay_ms
    if budgets:
        policy_json = _with_budgets(policy_json, budgets)
    if policy_json:
        request.policy_json = policy_json
    if quota_id is not None:
        request.quota_policy_id = quota_id
    if concurrency_key is not None:
        request.concurrency_key = concurrency_key
    with _client(ctx) as client:
        reply = client.create(request)
    which = reply.WhichOneof("outcome")
    if which == "created":
        rows = [
            ("execution_id", reply.created.execution_id),
            ("state", _state_name(reply.created.public_state)),
        ]
    else:
        rows = [("execution_id", reply.duplicate.execution_id), ("duplicate", "yes")]
    _print(reply, ctx.obj["json"], rows)


def _with_budgets(policy_json: str | None, budgets: Sequence[str]) -> str:
    """The `--policy` JSON with the `--budget` ids added to its `budget_ids`."""
    try:
        policy = json.loads(policy_json) if policy_json else {}
    except ValueError as exc:
        raise click.UsageError(f"--policy is not JSON: {exc}") from None
    if not isinstance(policy, dict):
        raise click.UsageError("--policy must be a JSON object to add --budget ids to it")
    ids = list(policy.get("budget_ids") or [])
    policy["budget_ids"] = list(dict.fromkeys([*ids, *budgets]))
    return json.dumps(policy, separators=(",", ":"))


@main.command()
@click.argument("execution_id")
@click.pass_context
def get(ctx: click.Context, execution_id: str) -> None:
    """Show one execution."""
    with _client(ctx) as client:
        snap = client.describe(execution_id)
    rows: list[tuple[str, Any]] = [
        ("execution_id", snap.execution_id),
        ("state", _state_name(snap.public_state)),
        ("kind", snap.execution_kind),
        ("lane", snap.lane_id),
        ("namespace", snap.namespace),
        ("priority", snap.priority),
        ("attempts", snap.total_attempt_count),
        ("created_at", when(snap.created_at)),
    ]
    if snap.HasField("blocking_detail"):
        rows.append(("blocked", snap.blocking_detail))
    if snap.HasField("progress_pct") or snap.HasField("progress_message"):
        rows.append(("progress", f"{snap.progress_pct}% {snap.progress_message}".strip()))
    if snap.HasField("current_lease"):
        rows.append(
            (
                "lease",
                f"epoch {snap.current_lease.lease_epoch} held by "
                f"{snap.current_lease.worker_instance_id}, expires "
                f"{when(snap.current_lease.expires_at)}",
            )
        )
    rows += [(f"tag {k}", v) for k, v in sorted(snap.tags.items())]
    rows += _failure_rows(snap)
    _print(snap, ctx.obj["json"], rows)


def _failure_rows(snap: Any) -> list[tuple[str, Any]]:
    """Why it last failed and how each attempt ended (docs/lifecycle.md#why-did-it-fail)."""
    rows: list[tuple[str, Any]] = []
    for a in snap.attempts:
        end = f" ({a.failure_reason})" if a.failure_reason else ""
        rows.append((f"attempt {a.attempt_index}", f"{a.outcome} on {a.worker_instance_id}{end}"))
    if snap.HasField("last_failure"):
        rows += _last_failure_rows(snap.last_failure)
    return rows


def _last_failure_rows(f: t.LastFailure) -> list[tuple[str, Any]]:
    category = f" [{f.category}]" if f.category else ""
    rows: list[tuple[str, Any]] = [
        ("failure", f"{f.reason}{category} attempt {f.attempt_index}"),
        ("worker", f.worker_instance_id or "-"),
        ("failed_at", when(f.failed_at)),
    ]
    if f.details:
        rows.append(("details", "\n" + f.details.rstrip()))
    return rows


@main.command()
@click.argument("execution_id")
@click.option("--raw", is_flag=True, help="Write only the result bytes, as stored.")
@click.pass_context
def result(ctx: click.Context, execution_id: str, raw: bool) -> None:
    """Print the result of a completed execution (text, or hex when it is not UTF-8).

    One that failed, was cancelled or expired has no result: its outcome and last failure
    (reason, category, attempt, worker, time, details such as a traceback) are printed instead
    and the exit code is 5 (on stderr with --raw, so stdout only ever holds result bytes); one
    that has not finished yet exits 3.
    """
    as_json = ctx.obj["json"]
    with _client(ctx) as client:
        try:
            reply = client.result_reply(execution_id)
        except ExecutionFailed as exc:
            snap = client.describe(execution_id)
            _no_result(exc, snap, as_json, err=raw)
            raise SystemExit(EXIT_NOT_COMPLETED) from None
    payload = bytes(reply.result_payload)
    if raw:
        sys.stdout.buffer.write(payload)
        sys.stdout.flush()
        return
    try:
        text: str | None = payload.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if as_json:
        body: dict[str, Any] = {"execution_id": execution_id, "outcome": "completed",
                                "result_encoding": reply.result_encoding}  # fmt: skip
        if text is not None:
            body["result"] = text
        else:
            body["result_hex"] = payload.hex()
        click.echo(json.dumps(body))
        return
    click.echo(text if text is not None else "0x" + payload.hex())


def _no_result(exc: ExecutionFailed, snap: t.ExecutionSnapshot, as_json: bool, err: bool) -> None:
    """The outcome of an execution that ended without a result and its last failure."""
    if as_json:
        body: dict[str, Any] = {"execution_id": snap.execution_id, "outcome": exc.outcome}
        if snap.HasField("last_failure"):
            failure = json_format.MessageToDict(snap.last_failure, preserving_proto_field_name=True)
            body["last_failure"] = failure
        click.echo(json.dumps(body), err=err)
        return
    rows: list[tuple[str, Any]] = [("execution_id", snap.execution_id), ("outcome", exc.outcome)]
    if snap.HasField("last_failure"):
        rows += _last_failure_rows(snap.last_failure)
    else:
        rows.append(("failure", exc.failure_reason or "-"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"{key.ljust(width)}  {value}".rstrip(" "), err=err)


@main.command()
@click.argument("execution_id")
@click.option("--json", "local_json", is_flag=True, help="JSON output (as the global --json).")
@click.pass_context
def why(ctx: click.Context, execution_id: str, local_json: bool) -> None:
    """Say why EXECUTION_ID is not running (or that it is), with an ETA when one is known."""
    with _client(ctx) as client:
        w = client.why(execution_id)
    if ctx.obj["json"] or local_json:
        body = json_format.MessageToDict(w.raw, preserving_proto_field_name=True)
        head = {"execution_id": w.execution_id, "state": w.state.name.lower()}
        click.echo(json.dumps({**head, **body}))
        return
    rows: list[tuple[str, Any]] = [
        ("execution_id", w.execution_id),
        ("state", w.state.name.lower()),
        ("why", w.kind.value),
        ("summary", w.summary),
    ]
    if w.eta_at is not None:
        rows.append(("eta", when(w.eta_at)))
    rows += _why_rows(w.detail)
    if w.blocking_detail and not isinstance(w.detail, WhyBudget | WhyQuota):
        rows.append(("detail", w.blocking_detail))
    _print(None, False, rows)


def _why_rows(detail: Any) -> list[tuple[str, Any]]:
    if isinstance(detail, WhyDependencies):
        rows: list[tuple[str, Any]] = [
            (
                "join",
                f"{detail.join} needs {detail.required}: {detail.satisfied} of {detail.total} "
                f"satisfied, {detail.impossible} impossible, {detail.unresolved} unresolved",
            )
        ]
        rows += [("upstream", f"{u.execution_id} {u.state.name.lower()}") for u in detail.upstreams]
        if detail.unresolved > len(detail.upstreams):
            rows.append(("upstreams", f"... {detail.unresolved - len(detail.upstreams)} more"))
        return rows
    if isinstance(detail, WhyCapability):
        return [
            ("requires", ",".join(detail.required) or "-"),
            ("missing", ",".join(detail.missing) or "-"),
            ("workers", f"{detail.live_workers} live, {detail.capable_workers} capable"),
        ]
    if isinstance(detail, WhySuspension):
        timeout = "-"
        if detail.timeout_at is not None:
            timeout = f"{when(detail.timeout_at)}, then {detail.timeout_behavior or 'fail'}"
        return [
            ("waitpoint", detail.waitpoint_id),
            ("reason", detail.reason_code),
            ("timeout", timeout),
        ]
    if isinstance(detail, WhyBudget):
        return _why_budget_rows(detail)
    if isinstance(detail, WhyQuota):
        return _why_quota_rows(detail)
    return []


def _why_budget_rows(detail: WhyBudget) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = [
        ("budgets", ",".join(detail.budget_ids) or "-"), ("detail", detail.detail),
    ]  # fmt: skip
    if detail.budget_id:
        exhausted = f"{detail.budget_id} {detail.dimension} {detail.usage}/{detail.limit}"
        rows.append(("exhausted", exhausted))
    if detail.next_reset_at is not None:
        rows.append(("next_reset", when(detail.next_reset_at)))
    return rows


def _why_quota_rows(detail: WhyQuota) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = [
        ("quota", detail.quota_policy_id or "-"), ("detail", detail.detail),
    ]  # fmt: skip
    if detail.concurrency_key:
        rows.append(("key", detail.concurrency_key))
    if detail.retry_at is not None:
        rows.append(("retry_at", when(detail.retry_at)))
    if detail.concurrency_cap:
        rows.append(("cap", detail.concurrency_cap))
    if detail.holders_total:
        more = detail.holders_total - len(detail.holders)
        tail = f" ... {more} more" if more > 0 else ""
        rows.append(("holders", ", ".join(detail.holders) + tail))
    return rows


LIST_STATES = ["eligible", "delayed", "active", "suspended", "terminal", *STATE_INDEXES]


@main.command(name="list")
@click.option("--lane", default="default", show_default=True)
@click.option(
    "--state",
    type=click.Choice(LIST_STATES),
    default="eligible",
    show_default=True,
    help="A lane index, or a public state (waiting, completed, failed, cancelled, expired, "
    "skipped: its index, filtered).",
)
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 1000))
@click.option("--partition", default=None, type=int)
@click.pass_context
def list_(ctx: click.Context, lane: str, state: str, limit: int, partition: int | None) -> None:
    """List executions in one lane index (priority order for eligible), or in one public state.

    A public state reads its index and keeps the matching rows, so a page may show fewer than
    --limit rows while more follow (the next page token is printed on stderr)."""
    with _client(ctx) as client:
        page = client.list(lane=lane, state=state, limit=limit, partition=partition)
    if ctx.obj["json"]:
        reply = execution_pb2.ListExecutionsResponse(
            executions=page.executions,
            total_returned=len(page.executions),
            next_page_token=page.next_page_token,
        )
        _print(reply, True)
        return
    _table(
        ["execution_id", "kind", "state", "priority", "created_at"],
        [
            (
                e.execution_id,
                e.execution_kind,
                _state_name(e.public_state),
                e.priority,
                when(e.created_at),
            )
            for e in page.executions
        ],
    )
    if page.next_page_token:
        click.echo(f"(more: next page token {page.next_page_token})", err=True)


@main.command()
@click.argument("execution_id")
@click.option("--reason", default="cancelled from the CLI", show_default=True)
@click.pass_context
def cancel(ctx: click.Context, execution_id: str, reason: str) -> None:
    """Cancel an execution (operator override)."""
    with _client(ctx) as client:
        state = client.cancel(execution_id, reason)
    reply = execution_pb2.CancelExecutionResponse(
        cancelled=execution_pb2.CancelExecutionResponse.Cancelled(
            execution_id=execution_id, public_state=state.value
        )
    )
    _print(reply, ctx.obj["json"], [("execution_id", execution_id), ("state", "cancelled")])


@main.command()
@click.argument("execution_id")
@click.pass_context
def replay(ctx: click.Context, execution_id: str) -> None:
    """Run a terminal execution again."""
    with _client(ctx) as client:
        state = client.replay(execution_id)
    reply = execution_pb2.ReplayExecutionResponse(
        replayed=execution_pb2.ReplayExecutionResponse.Replayed(public_state=state.value)
    )
    _print(reply, ctx.obj["json"], [("execution_id", execution_id), ("state", _state_name(state))])


@main.command()
@click.argument("execution_id")
@click.pass_context
def watch(ctx: click.Context, execution_id: str) -> None:
    """Print each state transition and progress update until the execution ends (exit 5
    unless completed)."""
    last: ExecutionState | None = None
    with _client(ctx) as client:
        for event in client.watch(execution_id, progress=True):
            state = ExecutionState(event.public_state)
            if ctx.obj["json"]:
                _print(event, True)
            elif state is last:  # same state: a progress update
                at = stamp(event.progress_updated_at)
                click.echo(f"{at}  {_state_name(state)}  {_progress(event)}")
            else:
                shown = f"  {_progress(event)}" if event.HasField("progress_updated_at") else ""
                click.echo(f"{stamp(event.at)}  {_state_name(state)}{shown}")
            last = state
            sys.stdout.flush()
    if last is not None and last.is_terminal and last is not ExecutionState.COMPLETED:
        raise SystemExit(EXIT_NOT_COMPLETED)


@main.command()
@click.argument("execution_id")
@click.option("--attempt", default=0, show_default=True, type=click.IntRange(0), help="Attempt.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new frames until it closes.")
@click.option("--after", default="0-0", show_default=True, help="Print frames after this id.")
@click.option("--raw", is_flag=True, help="Write only the payload bytes, frame after frame.")
@click.pass_context
def tail(
    ctx: click.Context, execution_id: str, attempt: int, follow: bool, after: str, raw: bool
) -> None:
    """Print an attempt's output frames (`-f`: live, until the stream closes)."""
    out = sys.stdout.buffer
    with _client(ctx) as client:
        messages = client.tail_messages(execution_id, attempt, after=after, follow=follow)
        for message in messages:
            for frame in message.frames:
                if ctx.obj["json"]:
                    _print(frame, True)
                elif raw:
                    out.write(frame.payload)
                else:
                    click.echo(f"{frame.id}  {frame.frame_type}  {_payload_text(frame)}")
                sys.stdout.flush()
                out.flush()
            if message.HasField("closed_at") and not raw:
                if ctx.obj["json"]:
                    text = json_format.MessageToJson(
                        message, preserving_proto_field_name=True, indent=None
                    )
                    click.echo(text)
                else:
                    click.echo(
                        f"-- closed: {message.closed_reason} at {stamp(message.closed_at)}",
                        err=True,
                    )


def _progress(event: execution_pb2.WatchExecutionResponse) -> str:
    """`42%  message` (either part may be missing)."""
    parts = [f"{event.progress_pct}%"] if event.HasField("progress_pct") else []
    if event.progress_message:
        parts.append(event.progress_message)
    return "  ".join(parts) or "progress"


def _payload_text(item: t.StreamFrame | Signal) -> str:
    """Text payloads as text; anything that is not UTF-8 as hex."""
    try:
        return bytes(item.payload).decode("utf-8")
    except UnicodeDecodeError:
        return "0x" + bytes(item.payload).hex()


@main.command(name="signal")
@click.argument("execution_id")
@click.argument("name")
@click.option("--payload", default=None, help="JSON payload; @FILE reads it from a file.")
@click.option("--waitpoint", "waitpoint_id", default=None, help="Target waitpoint id.")
@click.option(
    "--token", "wp_token", default=None, help="The waitpoint's token (not the API token)."
)
@click.option("--idempotency-key", default=None, help="Dedup key (scoped to the waitpoint).")
@click.option("--category", default="", help="Signal category, e.g. approval.")
@click.option("--source-type", default="cli", show_default=True)
@click.option("--source-identity", default="", help="Who sends it.")
@click.pass_context
def signal_(
    ctx: click.Context,
    execution_id: str,
    name: str,
    payload: str | None,
    waitpoint_id: str | None,
    wp_token: str | None,
    idempotency_key: str | None,
    category: str,
    source_type: str,
    source_identity: str,
) -> None:
    """Deliver signal NAME to a waitpoint of EXECUTION_ID.

    Without --waitpoint and --token, the one open waitpoint that takes NAME is looked up
    (ListPendingWaitpoints) and its token used.
    """
    data = _json_payload(payload)
    with _client(ctx) as client:
        if waitpoint_id is None or wp_token is None:
            wp = _pick_waitpoint(client, execution_id, name, waitpoint_id)
            waitpoint_id, wp_token = wp.id, wp_token or wp.token
        delivery = client.deliver_signal(
            execution_id,
            waitpoint_id,
            name,
            wp_token,
            data,
            payload_encoding="json" if data is not None else None,
            idempotency_key=idempotency_key or None,
            category=category,
            source_type=source_type,
            source_identity=source_identity,
        )
    reply = signal_pb2.DeliverSignalResponse()
    if delivery.duplicate:
        reply.duplicate.existing_signal_id = delivery.signal_id
        rows = [("signal_id", delivery.signal_id), ("effect", "duplicate")]
    else:
        reply.accepted.signal_id = delivery.signal_id
        reply.accepted.effect = delivery.effect
        rows = [("signal_id", delivery.signal_id), ("effect", delivery.effect)]
    _print(reply, ctx.obj["json"], [("waitpoint_id", waitpoint_id), *rows])


def _read_at_file(path: str, option: str) -> bytes:
    """The bytes of an `@file` option value; a file that cannot be read is a usage error (exit
    2, one line naming it), not a traceback."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise click.UsageError(f"{option} @{path}: {exc.strerror or exc}") from None


def _json_payload(payload: str | None) -> bytes | None:
    if payload is None:
        return None
    if payload.startswith("@"):
        payload = _read_at_file(payload[1:], "--payload").decode("utf-8", "replace")
    try:
        json.loads(payload)
    except ValueError as exc:
        raise click.UsageError(f"--payload is not JSON: {exc}") from None
    return payload.encode()


def _pick_waitpoint(
    client: CommandClient, execution_id: str, name: str, waitpoint_id: str | None
) -> Waitpoint:
    waitpoints = client.list_waitpoints(execution_id)
    if waitpoint_id is not None:
        chosen = [wp for wp in waitpoints if wp.id == waitpoint_id]
    else:
        chosen = choose_waitpoints(waitpoints, name)
    if not chosen:
        which = waitpoint_id or f"that takes {name!r}"
        click.echo(f"error: no open waitpoint {which} on {execution_id}", err=True)
        raise SystemExit(EXIT_NOT_FOUND)
    if len(chosen) > 1:
        raise click.UsageError(
            f"{len(chosen)} open waitpoints take {name!r}: pass --waitpoint "
            f"({', '.join(wp.id for wp in chosen)})"
        )
    return chosen[0]


@main.command()
@click.argument("execution_id")
@click.pass_context
def waitpoints(ctx: click.Context, execution_id: str) -> None:
    """List the open waitpoints of EXECUTION_ID with their tokens (credentials: keep them out of
    logs)."""
    with _client(ctx) as client:
        listed = client.list_waitpoints(execution_id)
    if ctx.obj["json"]:
        for wp in listed:
            click.echo(json.dumps(dataclasses.asdict(wp)))
        return
    _table(
        ["waitpoint_id", "state", "signals", "token", "expires_at"],
        [
            (
                wp.id,
                wp.state,
                ",".join(wp.signal_names) or "*",
                wp.token,
                when(wp.expires_at),
            )
            for wp in listed
        ],
    )


@main.command(name="watch-signals")
@click.argument("execution_id")
@click.option("--waitpoint", "waitpoint_id", default="", help="Only this waitpoint's signals.")
@click.option("--after", default="", help="Stream id (with --waitpoint) or accepted_at ms.")
@click.pass_context
def watch_signals(ctx: click.Context, execution_id: str, waitpoint_id: str, after: str) -> None:
    """Print each signal (stored ones first, then live) until the execution ends."""
    cursor: str | int | None = None
    if after and waitpoint_id:
        cursor = after
    elif after:
        if not after.isdigit():
            raise click.UsageError("without --waitpoint, --after is an accepted_at time in ms")
        cursor = int(after)
    with _client(ctx) as client:
        for sig in client.watch_signals(execution_id, waitpoint_id or None, after=cursor):
            if ctx.obj["json"]:
                _print(_signal_record(sig), True)
            else:
                text = _payload_text(sig) if sig.payload else "-"
                click.echo(f"{sig.accepted_at}  {sig.name}  {sig.effect}  {text}")
            sys.stdout.flush()


def _signal_record(sig: Signal) -> t.SignalRecord:
    """The signal as the server sent it."""
    record = t.SignalRecord(
        signal_id=sig.signal_id,
        execution_id=sig.execution_id,
        waitpoint_id=sig.waitpoint_id,
        signal_name=sig.name,
        signal_category=sig.category,
        source_type=sig.source_type,
        source_identity=sig.source_identity,
        payload=sig.payload,
        payload_encoding=sig.payload_encoding,
        observed_effect=sig.effect,
        created_at=sig.created_at,
        accepted_at=sig.accepted_at,
        stream_id=sig.stream_id,
    )
    if sig.correlation_id is not None:
        record.correlation_id = sig.correlation_id
    return record


@main.command()
@click.argument("execution_id")
@click.option("--delay-ms", default=0, show_default=True, type=click.IntRange(0))
@click.pass_context
def resume(ctx: click.Context, execution_id: str, delay_ms: int) -> None:
    """Resume a suspended execution without its signals (operator override)."""
    with _client(ctx) as client:
        state = client.resume(execution_id, delay=timedelta(milliseconds=delay_ms))
    reply = execution_pb2.ResumeExecutionResponse(
        resumed=execution_pb2.ResumeExecutionResponse.Resumed(public_state=state.value)
    )
    _print(reply, ctx.obj["json"], [("execution_id", execution_id), ("state", _state_name(state))])


@main.group()
def admin() -> None:
    """Operator commands."""


@admin.command()
@click.pass_context
def info(ctx: click.Context) -> None:
    """Server, library and Valkey versions, partition counts, lanes."""
    with _client(ctx) as client:
        reply = client.server_info()
    _print(
        reply,
        ctx.find_root().obj["json"],
        [
            ("server", reply.server_version),
            ("library", reply.library_version),
            ("valkey", reply.valkey_version),
            ("flow partitions", reply.num_flow_partitions),
            ("budget partitions", reply.num_budget_partitions),
            ("quota partitions", reply.num_quota_partitions),
            ("lanes", ", ".join(reply.lanes)),
        ],
    )


@admin.command()
@click.option("--partition", default=None, type=click.IntRange(0), help="Default 0.")
@click.pass_context
def kids(ctx: click.Context, partition: int | None) -> None:
    """The waitpoint HMAC kids of one partition: the signing kid and those in their grace."""
    with _client(ctx) as client:
        keystore = client.waitpoint_kids(partition)
    reply = admin_pb2.ListWaitpointKidsResponse(partition=keystore.partition)
    if keystore.current_kid is not None:
        reply.kids.current_kid = keystore.current_kid
    for kid, expires_at_ms in keystore.verifying.items():
        reply.kids.verifying.add(kid=kid, expires_at_ms=expires_at_ms)
    if ctx.find_root().obj["json"]:
        _print(reply, True)
        return
    current = keystore.current_kid if keystore.current_kid is not None else "(none)"
    click.echo(f"partition {keystore.partition}: signing kid {current}")
    verifying = sorted(keystore.verifying.items(), key=lambda kv: kv[1])
    if verifying:
        _table(["kid", "valid_until_ms"], verifying)


@admin.command(name="rotate-secret")
@click.option("--kid", required=True, help="New key id: non-empty, no ':', never used before.")
@click.option("--secret-hex", default=None, help="New secret (hex); default: 32 random bytes.")
@click.option("--grace-ms", default=None, type=click.IntRange(0), help="Old kid's grace.")
@click.option("--show-secret", is_flag=True, help="Print a generated secret.")
@click.pass_context
def rotate_secret(
    ctx: click.Context, kid: str, secret_hex: str | None, grace_ms: int | None, show_secret: bool
) -> None:
    """Sign new waitpoint tokens with a new kid and secret on every partition; tokens of the old
    kid stay valid for the grace period. Re-running with the same kid and secret is safe."""
    root = ctx.find_root()
    generated = secret_hex is None
    secret = secret_hex if secret_hex is not None else secrets.token_hex(32)
    grace = timedelta(milliseconds=grace_ms) if grace_ms is not None else None
    with _client(ctx) as client:
        for _ in range(ROTATE_ATTEMPTS):  # the same kid and secret converge on failed partitions
            rotation = client.rotate_waitpoint_secret(kid, secret, grace=grace)
            if not rotation.failed:
                break
    reply = admin_pb2.RotateWaitpointSecretResponse(
        rotated=rotation.rotated, failed=rotation.failed, new_kid=rotation.new_kid
    )
    rows: list[tuple[str, Any]] = [("new_kid", reply.new_kid), ("rotated", reply.rotated)]
    if reply.failed:
        rows.append(("failed", ",".join(str(p) for p in reply.failed)))
    if generated and (show_secret or reply.failed):  # a retry needs the same secret
        rows.append(("secret_hex", secret))
    _print(reply, root.obj["json"], rows)
    if reply.failed:
        click.echo("error: some partitions failed; re-run with the same kid and secret", err=True)
        raise SystemExit(EXIT_REFUSED)


# Registered last: the flow, budget and quota commands use this module's client and output helpers.
from flowfabric.cli_flows import flow as _flow_commands  # noqa: E402

main.add_command(_flow_commands)

from flowfabric.cli_budgets import budget as _budget_commands  # noqa: E402
from flowfabric.cli_budgets import quota as _quota_commands  # noqa: E402

main.add_command(_budget_commands)
main.add_command(_quota_commands)

from flowfabric.cli_schedules import schedules as _schedule_commands  # noqa: E402

main.add_command(_schedule_commands)

from flowfabric.cli_lanes import bulk as _bulk_commands  # noqa: E402
from flowfabric.cli_lanes import lanes as _lane_commands  # noqa: E402

main.add_command(_lane_commands)
main.add_command(_bulk_commands)

from flowfabric.cli_submit import submit_many as _submit_many_command  # noqa: E402
from flowfabric.cli_worker import worker as _worker_command  # noqa: E402

main.add_command(_submit_many_command)

main.add_command(_worker_command)


def run(argv: Sequence[str] | None = None) -> None:
    main(args=list(sys.argv[1:] if argv is None else argv), prog_name="flowfabric")


if __name__ == "__main__":
    run()
