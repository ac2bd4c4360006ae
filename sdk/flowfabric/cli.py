"""The `flowfabric` command line.

    flowfabric serve [--flag value ...]       run the server (every FF_* setting is also a flag)
    flowfabric submit KIND [--payload ...]    create an execution
    flowfabric get | cancel | replay | watch EXECUTION_ID
    flowfabric list [--lane L] [--state S]
    flowfabric tail EXECUTION_ID [--attempt N] [-f] [--after CURSOR]   print an attempt's frames
    flowfabric signal EXECUTION_ID NAME [--payload JSON] [--waitpoint ID] [--token T]
    flowfabric waitpoints EXECUTION_ID        open waitpoints with their tokens
    flowfabric watch-signals EXECUTION_ID [--waitpoint ID]
    flowfabric resume EXECUTION_ID [--delay-ms N]   operator resume of a suspended execution
    flowfabric worker MODULE:ATTRIBUTE        run a module's flowfabric.Worker
    flowfabric admin info | kids [--partition N] | rotate-secret --kid K [--secret-hex H]

Client commands talk gRPC to `--target` (env FF_TARGET, default 127.0.0.1:50051) with the bearer
token `--token` (env FF_API_TOKEN). Tables by default, `--json` for scripts.

Exit codes: 0 ok; 1 the server refused (the ErrorInfo reason is printed); 2 usage error;
3 not found; 4 server unreachable; 5 (`watch`) the execution ended other than completed.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import click
import grpc
from google.protobuf import json_format
from google.rpc import error_details_pb2, status_pb2

from flowfabric._signals import Waitpoint, choose_waitpoints
from flowfabric.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    execution_pb2,
    execution_pb2_grpc,
    signal_pb2,
    signal_pb2_grpc,
    stream_pb2,
    stream_pb2_grpc,
)
from flowfabric.v1 import types_pb2 as t

EXIT_REFUSED, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_UNREACHABLE, EXIT_NOT_COMPLETED = 1, 2, 3, 4, 5
TERMINAL = {"completed", "failed", "cancelled", "expired", "skipped"}
ROTATE_ATTEMPTS = 3


def _state_name(number: int) -> str:
    return str(t.PublicState.Name(number)).removeprefix("PUBLIC_STATE_").lower()


def _reason(exc: grpc.RpcError) -> str:
    for key, value in exc.trailing_metadata() or ():  # type: ignore[attr-defined]
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return str(info.reason)
    return ""


class Connection:
    """A gRPC channel plus the call options every client command shares."""

    def __init__(self, target: str, token: str | None, timeout: float) -> None:
        self.channel = grpc.insecure_channel(target)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout
        self.execution = execution_pb2_grpc.ExecutionServiceStub(self.channel)
        self.admin = admin_pb2_grpc.AdminServiceStub(self.channel)
        self.streams = stream_pb2_grpc.StreamServiceStub(self.channel)
        self.signals = signal_pb2_grpc.SignalServiceStub(self.channel)

    def call(self, method: Callable[..., Any], request: Any, timeout: float | None = None) -> Any:
        try:
            return method(request, metadata=self.metadata, timeout=timeout or self.timeout)
        except grpc.RpcError as exc:
            _fail(exc)

    def stream(self, method: Callable[..., Any], request: Any) -> Iterator[Any]:
        try:
            yield from method(request, metadata=self.metadata)
        except grpc.RpcError as exc:
            _fail(exc)


def _fail(exc: grpc.RpcError) -> None:
    code = exc.code()  # type: ignore[attr-defined]
    reason = _reason(exc)
    click.echo(f"error: {code.name} {reason}: {exc.details()}", err=True)  # type: ignore[attr-defined]
    if code == grpc.StatusCode.NOT_FOUND:
        raise SystemExit(EXIT_NOT_FOUND)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        raise SystemExit(EXIT_UNREACHABLE)
    raise SystemExit(EXIT_REFUSED)


def _print(obj: Any, as_json: bool, rows: Sequence[tuple[str, Any]] = ()) -> None:
    if as_json:
        click.echo(json_format.MessageToJson(obj, preserving_proto_field_name=True, indent=None))
        return
    width = max((len(k) for k, _ in rows), default=0)
    for key, value in rows:
        click.echo(f"{key.ljust(width)}  {value}")


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    click.echo("  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)))
    for row in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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


def _conn(ctx: click.Context) -> Connection:
    obj = ctx.find_root().obj
    return Connection(obj["target"], obj["token"], obj["timeout"])


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
) -> None:
    """Create an execution of KIND."""
    import time

    data = open(payload[1:], "rb").read() if payload.startswith("@") else payload.encode()  # noqa: SIM115
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
    if policy_json:
        request.policy_json = policy_json
    conn = _conn(ctx)
    reply = conn.call(conn.execution.CreateExecution, request)
    which = reply.WhichOneof("outcome")
    if which == "created":
        rows = [
            ("execution_id", reply.created.execution_id),
            ("state", _state_name(reply.created.public_state)),
        ]
    else:
        rows = [("execution_id", reply.duplicate.execution_id), ("duplicate", "yes")]
    _print(reply, ctx.obj["json"], rows)


@main.command()
@click.argument("execution_id")
@click.pass_context
def get(ctx: click.Context, execution_id: str) -> None:
    """Show one execution."""
    conn = _conn(ctx)
    snap = conn.call(
        conn.execution.DescribeExecution,
        execution_pb2.DescribeExecutionRequest(execution_id=execution_id),
    ).snapshot
    rows: list[tuple[str, Any]] = [
        ("execution_id", snap.execution_id),
        ("state", _state_name(snap.public_state)),
        ("lane", snap.lane_id),
        ("namespace", snap.namespace),
        ("attempts", snap.total_attempt_count),
        ("created_at", snap.created_at),
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
                f"{snap.current_lease.worker_instance_id}",
            )
        )
    rows += [(f"tag {k}", v) for k, v in sorted(snap.tags.items())]
    _print(snap, ctx.obj["json"], rows)


@main.command(name="list")
@click.option("--lane", default="default", show_default=True)
@click.option(
    "--state",
    type=click.Choice(["eligible", "delayed", "active", "suspended", "terminal"]),
    default="eligible",
    show_default=True,
)
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 1000))
@click.option("--partition", default=None, type=int)
@click.pass_context
def list_(ctx: click.Context, lane: str, state: str, limit: int, partition: int | None) -> None:
    """List executions in one lane index (priority order for eligible)."""
    conn = _conn(ctx)
    request = execution_pb2.ListExecutionsRequest(
        lane=lane,
        limit=limit,
        state=execution_pb2.ExecutionIndex.Value(f"EXECUTION_INDEX_{state.upper()}"),
    )
    if partition is not None:
        request.partition = partition
    reply = conn.call(conn.execution.ListExecutions, request)
    if ctx.obj["json"]:
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
                e.created_at,
            )
            for e in reply.executions
        ],
    )
    if reply.next_page_token:
        click.echo(f"(more: next page token {reply.next_page_token})", err=True)


@main.command()
@click.argument("execution_id")
@click.option("--reason", default="cancelled from the CLI", show_default=True)
@click.pass_context
def cancel(ctx: click.Context, execution_id: str, reason: str) -> None:
    """Cancel an execution (operator override)."""
    conn = _conn(ctx)
    reply = conn.call(
        conn.execution.CancelExecution,
        execution_pb2.CancelExecutionRequest(execution_id=execution_id, reason=reason),
    )
    _print(reply, ctx.obj["json"], [("execution_id", execution_id), ("state", "cancelled")])


@main.command()
@click.argument("execution_id")
@click.pass_context
def replay(ctx: click.Context, execution_id: str) -> None:
    """Run a terminal execution again."""
    conn = _conn(ctx)
    reply = conn.call(
        conn.execution.ReplayExecution,
        execution_pb2.ReplayExecutionRequest(execution_id=execution_id),
    )
    _print(
        reply,
        ctx.obj["json"],
        [("execution_id", execution_id), ("state", _state_name(reply.replayed.public_state))],
    )


@main.command()
@click.argument("execution_id")
@click.pass_context
def watch(ctx: click.Context, execution_id: str) -> None:
    """Print each state transition until the execution ends (exit 5 unless completed)."""
    conn = _conn(ctx)
    last = ""
    request = execution_pb2.WatchExecutionRequest(execution_id=execution_id)
    for event in conn.stream(conn.execution.WatchExecution, request):
        last = _state_name(event.public_state)
        if ctx.obj["json"]:
            _print(event, True)
        else:
            click.echo(f"{event.at}  {last}")
    if last in TERMINAL and last != "completed":
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
    conn = _conn(ctx)
    request = stream_pb2.TailAttemptStreamRequest(
        execution_id=execution_id, attempt_index=attempt, after=after, follow=follow
    )
    out = click.get_binary_stream("stdout")
    for message in conn.stream(conn.streams.TailAttemptStream, request):
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
                click.echo(json_format.MessageToJson(
                    message, preserving_proto_field_name=True, indent=None))  # fmt: skip
            else:
                click.echo(f"-- closed: {message.closed_reason} at {message.closed_at}", err=True)


def _payload_text(frame: t.StreamFrame | t.SignalRecord) -> str:
    """Text payloads as text; anything that is not UTF-8 as hex."""
    try:
        return bytes(frame.payload).decode("utf-8")
    except UnicodeDecodeError:
        return "0x" + bytes(frame.payload).hex()


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
    conn = _conn(ctx)
    if waitpoint_id is None or wp_token is None:
        wp = _pick_waitpoint(conn, execution_id, name, waitpoint_id)
        waitpoint_id, wp_token = wp.id, wp_token or wp.token
    request = signal_pb2.DeliverSignalRequest(
        execution_id=execution_id,
        waitpoint_id=waitpoint_id,
        signal_name=name,
        signal_category=category,
        source_type=source_type,
        source_identity=source_identity,
        waitpoint_token=wp_token,
    )
    if data is not None:
        request.payload = data
        request.payload_encoding = "json"
    if idempotency_key:
        request.idempotency_key = idempotency_key
    reply = conn.call(conn.signals.DeliverSignal, request)
    if reply.WhichOneof("outcome") == "duplicate":
        rows = [("signal_id", reply.duplicate.existing_signal_id), ("effect", "duplicate")]
    else:
        rows = [("signal_id", reply.accepted.signal_id), ("effect", reply.accepted.effect)]
    _print(reply, ctx.obj["json"], [("waitpoint_id", waitpoint_id), *rows])


def _json_payload(payload: str | None) -> bytes | None:
    if payload is None:
        return None
    if payload.startswith("@"):
        with open(payload[1:], "rb") as f:
            payload = f.read().decode()
    try:
        json.loads(payload)
    except ValueError as exc:
        raise click.UsageError(f"--payload is not JSON: {exc}") from None
    return payload.encode()


def _open_waitpoints(conn: Connection, execution_id: str) -> list[Waitpoint]:
    out: list[Waitpoint] = []
    page = ""
    while True:
        reply = conn.call(
            conn.signals.ListPendingWaitpoints,
            signal_pb2.ListPendingWaitpointsRequest(execution_id=execution_id, page_token=page),
        )
        out += [Waitpoint.from_proto(info) for info in reply.waitpoints]
        if not reply.next_page_token:
            return out
        page = reply.next_page_token


def _pick_waitpoint(
    conn: Connection, execution_id: str, name: str, waitpoint_id: str | None
) -> Waitpoint:
    waitpoints = _open_waitpoints(conn, execution_id)
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
    conn = _conn(ctx)
    if ctx.obj["json"]:
        listed = _open_waitpoints(conn, execution_id)
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
                wp.expires_at if wp.expires_at is not None else "-",
            )
            for wp in _open_waitpoints(conn, execution_id)
        ],
    )


@main.command(name="watch-signals")
@click.argument("execution_id")
@click.option("--waitpoint", "waitpoint_id", default="", help="Only this waitpoint's signals.")
@click.option("--after", default="", help="Stream id (with --waitpoint) or accepted_at ms.")
@click.pass_context
def watch_signals(ctx: click.Context, execution_id: str, waitpoint_id: str, after: str) -> None:
    """Print each signal (stored ones first, then live) until the execution ends."""
    conn = _conn(ctx)
    request = signal_pb2.WatchSignalsRequest(execution_id=execution_id, waitpoint_id=waitpoint_id)
    if after and waitpoint_id:
        request.after_stream_id = after
    elif after:
        if not after.isdigit():
            raise click.UsageError("without --waitpoint, --after is an accepted_at time in ms")
        request.after_accepted_at = int(after)
    for message in conn.stream(conn.signals.WatchSignals, request):
        sig = message.signal
        if ctx.obj["json"]:
            _print(sig, True)
        else:
            text = _payload_text(sig) if sig.payload else "-"
            click.echo(f"{sig.accepted_at}  {sig.signal_name}  {sig.observed_effect}  {text}")
        sys.stdout.flush()


@main.command()
@click.argument("execution_id")
@click.option("--delay-ms", default=0, show_default=True, type=click.IntRange(0))
@click.pass_context
def resume(ctx: click.Context, execution_id: str, delay_ms: int) -> None:
    """Resume a suspended execution without its signals (operator override)."""
    conn = _conn(ctx)
    reply = conn.call(
        conn.execution.ResumeExecution,
        execution_pb2.ResumeExecutionRequest(
            execution_id=execution_id, trigger_type="operator", resume_delay_ms=delay_ms
        ),
    )
    _print(
        reply,
        ctx.obj["json"],
        [("execution_id", execution_id), ("state", _state_name(reply.resumed.public_state))],
    )


@main.group()
def admin() -> None:
    """Operator commands."""


@admin.command()
@click.pass_context
def info(ctx: click.Context) -> None:
    """Server, library and Valkey versions, partition counts, lanes."""
    conn = _conn(ctx.find_root())
    reply = conn.call(conn.admin.GetServerInfo, admin_pb2.GetServerInfoRequest())
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
    conn = _conn(ctx.find_root())
    request = admin_pb2.ListWaitpointKidsRequest()
    if partition is not None:
        request.partition = partition
    reply = conn.call(conn.admin.ListWaitpointKids, request)
    if ctx.find_root().obj["json"]:
        _print(reply, True)
        return
    current = reply.kids.current_kid if reply.kids.HasField("current_kid") else "(none)"
    click.echo(f"partition {reply.partition}: signing kid {current}")
    verifying = sorted(reply.kids.verifying, key=lambda v: v.expires_at_ms)
    if verifying:
        _table(["kid", "valid_until_ms"], [(v.kid, v.expires_at_ms) for v in verifying])


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
    conn = _conn(root)
    generated = secret_hex is None
    secret = secret_hex if secret_hex is not None else secrets.token_hex(32)
    request = admin_pb2.RotateWaitpointSecretRequest(new_kid=kid, new_secret_hex=secret)
    if grace_ms is not None:
        request.grace_ms = grace_ms
    for _ in range(ROTATE_ATTEMPTS):  # the same kid and secret converge on failed partitions
        reply = conn.call(
            conn.admin.RotateWaitpointSecret, request, timeout=max(conn.timeout, 130.0)
        )
        if not reply.failed:
            break
    rows: list[tuple[str, Any]] = [("new_kid", reply.new_kid), ("rotated", reply.rotated)]
    if reply.failed:
        rows.append(("failed", ",".join(str(p) for p in reply.failed)))
    if generated and (show_secret or reply.failed):  # a retry needs the same secret
        rows.append(("secret_hex", secret))
    _print(reply, root.obj["json"], rows)
    if reply.failed:
        click.echo("error: some partitions failed; re-run with the same kid and secret", err=True)
        raise SystemExit(EXIT_REFUSED)


def run(argv: Sequence[str] | None = None) -> None:
    main(args=list(sys.argv[1:] if argv is None else argv), prog_name="flowfabric")


if __name__ == "__main__":
    run()
