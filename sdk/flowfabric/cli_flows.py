"""`flowfabric flow ...`: submit a flow from a file, show it as a tree, cancel it, replay it.

    flowfabric flow submit FILE [--wait]     FILE: JSON (YAML too when PyYAML is installed)
    flowfabric flow show FLOW_ID             the DAG as a tree, each member with its state
    flowfabric flow cancel FLOW_ID [--wait] [--flow-only] [--reason R]
    flowfabric flow replay FLOW_ID [--reason R]

The same conventions as the other commands (`flowfabric.cli`): `--json` output, errors on
stderr, exit 1 refused, 2 usage, 3 not found, 4 unreachable, 5 (`submit --wait`) the flow ended
other than completed.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from collections.abc import Mapping
from typing import Any

import click
import grpc
from google.protobuf import json_format

from flowfabric._errors import FlowFabricError
from flowfabric._flows import MEMBER_TAG, FlowBuilder, InvalidFlow
from flowfabric._models import ExecutionState, FlowInfo, FlowState, SubmittedFlow
from flowfabric.v1 import flow_pb2


@click.group()
def flow() -> None:
    """Flows: DAGs of executions submitted in one call."""


# After the group: `flowfabric.cli` registers it when it finishes loading, whichever module is
# imported first.
from flowfabric.cli import (  # noqa: E402
    EXIT_NOT_COMPLETED,
    EXIT_REFUSED,
    CommandClient,
    _client,
    _print,
    _state_name,
    _table,
)


def _root(ctx: click.Context) -> dict[str, Any]:
    obj: dict[str, Any] = ctx.find_root().obj
    return obj


def _load_spec(path: str) -> Mapping[str, Any]:
    """A flow spec from JSON, or YAML (`.yaml`/`.yml`, or text that is not JSON) when PyYAML
    is importable."""
    try:
        text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()  # noqa: SIM115
    except OSError as exc:
        raise click.UsageError(f"cannot read {path}: {exc.strerror}") from None
    wants_yaml = path.endswith((".yaml", ".yml"))
    not_json = ""
    if not wants_yaml:
        try:
            spec = json.loads(text)
        except ValueError as exc:
            if not _has_yaml():
                raise click.UsageError(f"{path} is not JSON: {exc}") from None
            wants_yaml, not_json = True, f"is not JSON ({exc}) nor YAML"
    if wants_yaml:
        if not _has_yaml():
            raise click.UsageError("YAML needs PyYAML (pip install pyyaml); or give JSON")
        yaml: Any = importlib.import_module("yaml")  # optional, and without type stubs
        try:
            spec = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "bad YAML"
            raise click.UsageError(f"{path} {not_json or 'is not YAML'}: {first}") from None
    if not isinstance(spec, Mapping):
        raise click.UsageError(f"{path}: a flow is a mapping with a `members` list")
    return spec


def _has_yaml() -> bool:
    return importlib.util.find_spec("yaml") is not None


def _submitted_proto(sub: SubmittedFlow) -> flow_pb2.SubmitFlowResponse:
    rows = [
        flow_pb2.SubmitFlowResponse.SubmittedMember(
            key=key, execution_id=eid, public_state=sub.states.get(key, ExecutionState(0)).value
        )
        for key, eid in sub.members.items()
    ]
    if sub.duplicate:
        return flow_pb2.SubmitFlowResponse(
            already_submitted=flow_pb2.SubmitFlowResponse.AlreadySubmitted(
                flow_id=sub.flow_id, graph_revision=sub.graph_revision, members=rows
            )
        )
    return flow_pb2.SubmitFlowResponse(
        submitted=flow_pb2.SubmitFlowResponse.Submitted(
            flow_id=sub.flow_id, graph_revision=sub.graph_revision, members=rows
        )
    )


@flow.command(name="submit")
@click.argument("file")
@click.option("--flow-id", default=None, help="Use this flow id (a UUID) instead of the file's.")
@click.option("--wait", is_flag=True, help="Wait until the flow ends (exit 5 unless completed).")
@click.option("--wait-timeout", default=None, type=float, help="Seconds to wait at most.")
@click.pass_context
def submit_flow(
    ctx: click.Context, file: str, flow_id: str | None, wait: bool, wait_timeout: float | None
) -> None:
    """Submit the flow described in FILE (`-` = stdin) in one call.

    FILE is JSON: {"kind": "dag", "namespace": "default", "flow_id": "...",
    "failure_policy": "...", "members": [{"key": "fetch", "kind": "fetch", "payload": ...,
    "lane": "default", "priority": 0, "policy": {...}, "tags": {...}, "after": ["key", ...],
    "join": "all" | "any" | {"quorum": 2}, "edge_kind": "success" | "completion",
    "data_from": "key"}, ...]}. YAML of the same shape is read too when PyYAML is installed
    (it is not a dependency). The graph is checked before anything is sent.
    """
    spec = dict(_load_spec(file))
    if flow_id:
        spec["flow_id"] = flow_id
    try:
        builder: FlowBuilder[Any] = FlowBuilder.from_spec(spec)
    except InvalidFlow as exc:
        click.echo(f"error: {exc.reason}: {exc}", err=True)
        raise SystemExit(EXIT_REFUSED) from None
    with _client(ctx) as client:
        sub = client.submit_flow(builder)
        info = client.wait_flow(sub.flow_id, timeout=wait_timeout) if wait else None
    as_json = _root(ctx)["json"]
    _print(_submitted_proto(sub), as_json, [("flow_id", sub.flow_id)])
    if not as_json:
        states = {k: _state_name(s) for k, s in sub.states.items()}
        _table(
            ["key", "execution_id", "state"],
            [(k, eid, states.get(k, "-")) for k, eid in sub.members.items()],
        )
        if sub.duplicate:
            click.echo("(the flow already existed: nothing was written)", err=True)
    if info is not None:
        _print(_describe_proto(info), as_json, [("state", info.state.value)])
        if info.state is not FlowState.COMPLETED:
            raise SystemExit(EXIT_NOT_COMPLETED)


def _describe_proto(info: FlowInfo) -> flow_pb2.DescribeFlowResponse:
    reply = flow_pb2.DescribeFlowResponse(members_by_state=dict(info.counts))
    reply.flow.CopyFrom(info.snapshot)
    for f in info.failures:
        reply.failures.add(
            execution_id=f.execution_id, public_state=f.state.name.lower(), reason=f.reason,
            at=f.at,
        )  # fmt: skip
    return reply


def _summary(info: FlowInfo) -> str:
    counts = ", ".join(f"{n} {state}" for state, n in sorted(info.counts.items()))
    return (
        f"flow {info.flow_id}  {info.state.value}  ({info.node_count} members: "
        f"{counts or 'none'}; {info.edge_count} edges; revision {info.graph_revision})"
    )


class _Graph:
    """The members of one flow with their labels, states and edges, for the tree."""

    def __init__(self, client: CommandClient, flow_id: str) -> None:
        self.states = client.flow_members(flow_id)
        self.labels: dict[str, str] = {}
        self.kinds: dict[str, str] = {}
        self.children: dict[str, list[tuple[str, str]]] = {eid: [] for eid in self.states}
        self.parents: dict[str, list[str]] = {eid: [] for eid in self.states}
        for eid in self.states:
            self.kinds[eid] = client.get(eid).execution_kind
            tags = client.describe(eid).tags
            self.labels[eid] = tags[MEMBER_TAG] if MEMBER_TAG in tags else self.kinds[eid]
            for edge in client.edges(eid, flow_id=flow_id):
                down = edge.downstream_execution_id
                self.children[eid].append((down, edge.dependency_kind))
                self.parents.setdefault(down, []).append(eid)
        for kids in self.children.values():
            kids.sort(key=lambda kid: (self.labels.get(kid[0], ""), kid[0]))

    def roots(self) -> list[str]:
        return sorted((e for e in self.states if not self.parents.get(e)), key=self._order)

    def _order(self, eid: str) -> tuple[str, str]:
        return self.labels.get(eid, ""), eid

    def line(self, eid: str, kind: str = "success") -> str:
        state = _state_name(self.states[eid]) if eid in self.states else "?"
        note = "" if kind == "success" else f"  (after {kind})"
        return f"{self.labels.get(eid, eid)}  {state}  {eid}{note}"

    def render(self) -> list[str]:
        """Each member under each of its upstreams; a member already shown in full is shown
        again as a reference (`^`) rather than repeating its subtree."""
        out: list[str] = []
        shown: set[str] = set()

        def walk(eid: str, kind: str, prefix: str, tail: str) -> None:
            seen = eid in shown
            out.append(
                prefix + self.line(eid, kind) + ("  ^" if seen and self.children[eid] else "")
            )
            if seen:
                return
            shown.add(eid)
            kids = self.children.get(eid, [])
            for i, (kid, edge_kind) in enumerate(kids):
                last = i == len(kids) - 1
                walk(kid, edge_kind, tail + ("└── " if last else "├── "),
                     tail + ("    " if last else "│   "))  # fmt: skip

        for root in self.roots():
            walk(root, "success", "", "")
        return out

    def as_json(self) -> list[dict[str, Any]]:
        return [
            {
                "execution_id": eid,
                "key": self.labels[eid],
                "kind": self.kinds[eid],
                "state": _state_name(state),
                "upstreams": sorted(self.parents.get(eid, [])),
            }
            for eid, state in sorted(self.states.items(), key=lambda kv: self._order(kv[0]))
        ]


@flow.command(name="show")
@click.argument("flow_id")
@click.pass_context
def show_flow(ctx: click.Context, flow_id: str) -> None:
    """Show a flow: its state and counts, then the DAG as a tree (each member under each of
    its upstreams, with its state; `^` marks a member shown in full above)."""
    as_json = _root(ctx)["json"]
    graph: _Graph | None = None
    with _client(ctx) as client:
        info = client.describe_flow(flow_id)
        try:
            graph = _Graph(client, flow_id)
        except FlowFabricError as exc:
            if exc.code != grpc.StatusCode.UNIMPLEMENTED:
                raise
            click.echo("(the server has no WatchFlow: members cannot be listed)", err=True)
    if as_json:
        out: dict[str, Any] = json_format.MessageToDict(
            _describe_proto(info), preserving_proto_field_name=True
        )
        if graph is not None:
            out["members"] = graph.as_json()
        click.echo(json.dumps(out))
        return
    click.echo(_summary(info))
    for failure in info.failures:
        click.echo(f"  {failure.state.name.lower()}: {failure.execution_id}  {failure.reason}")
    if graph is not None:
        for line in graph.render():
            click.echo(line)


@flow.command(name="cancel")
@click.argument("flow_id")
@click.option("--reason", default="cancelled from the CLI", show_default=True)
@click.option("--wait", is_flag=True, help="Cancel the members before answering.")
@click.option("--flow-only", is_flag=True, help="Mark the flow cancelled; leave members be.")
@click.pass_context
def cancel_flow(ctx: click.Context, flow_id: str, reason: str, wait: bool, flow_only: bool) -> None:
    """Cancel a flow and (unless --flow-only) every member not yet finished; exit 1 if some
    member cancels failed (they are retried in the background)."""
    with _client(ctx) as client:
        done = client.cancel_flow(flow_id, reason, cancel_members=not flow_only, wait=wait)
    reply = flow_pb2.CancelFlowResponse()
    if done.outcome == "partial":
        reply.partially_cancelled.cancellation_policy = done.policy
        reply.partially_cancelled.member_execution_ids.extend(done.members)
        reply.partially_cancelled.failed_member_execution_ids.extend(done.failed)
    elif done.outcome == "scheduled":
        reply.cancellation_scheduled.cancellation_policy = done.policy
        reply.cancellation_scheduled.member_count = len(done.members)
        reply.cancellation_scheduled.member_execution_ids.extend(done.members)
    else:
        reply.cancelled.cancellation_policy = done.policy
        reply.cancelled.member_execution_ids.extend(done.members)
    rows: list[tuple[str, Any]] = [
        ("flow_id", flow_id), ("outcome", done.outcome), ("policy", done.policy),
        ("members", len(done.members)),
    ]  # fmt: skip
    if done.failed:
        rows.append(("failed", ",".join(done.failed)))
    _print(reply, _root(ctx)["json"], rows)
    if done.failed:
        click.echo("error: some member cancels failed; they are retried", err=True)
        raise SystemExit(EXIT_REFUSED)


@flow.command(name="replay")
@click.argument("flow_id")
@click.option("--reason", default="", help="Recorded as each replayed member's reason.")
@click.pass_context
def replay_flow(ctx: click.Context, flow_id: str, reason: str) -> None:
    """Re-run every member of a flow that did not complete (failed, expired, cancelled,
    skipped); completed members keep their results."""
    with _client(ctx) as client:
        done = client.replay_flow(flow_id, reason)
    reply = flow_pb2.ReplayFlowResponse()
    if done.execution_ids:
        reply.replayed.execution_ids.extend(done.execution_ids)
        reply.replayed.reopened_edge_count = done.reopened_edges
        reply.replayed.public_flow_state = done.state.value
    else:
        reply.nothing_to_replay.public_flow_state = done.state.value
    rows: list[tuple[str, Any]] = [
        ("flow_id", flow_id), ("replayed", len(done.execution_ids) or "nothing to replay"),
        ("reopened_edges", done.reopened_edges), ("state", done.state.value),
    ]  # fmt: skip
    rows += [("member", eid) for eid in done.execution_ids]
    _print(reply, _root(ctx)["json"], rows)
