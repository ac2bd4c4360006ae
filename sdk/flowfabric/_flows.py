"""Building a flow: members, the edges between them and each member's join, checked locally.

`Client.flow()` returns a `FlowBuilder`; `add()` returns a `FlowHandle` that later members name
in `after=`; `submit()` sends the whole graph in one SubmitFlow call. The builder checks what it
can before anything is sent (unknown handles, joins against the inbound edges, edge kinds, data
passing, cycles, the submit's bounds) and raises `InvalidFlow` with the reason the server would
give; the server checks everything again and stays the authority (lanes, policies, tags,
payload sizes). The flow id is minted here, so a submit retried after UNAVAILABLE is answered
as a duplicate instead of creating a second flow.

`FlowBuilder.from_spec` reads the same graph from a mapping (the CLI's `flow submit FILE`).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar, cast

from flowfabric._models import Payload, encode_payload
from flowfabric._retry import RetryPolicy, policy_json
from flowfabric.v1 import flow_pb2, types_pb2

R = TypeVar("R")
T = TypeVar("T")

Join = Literal["all", "any"] | tuple[Literal["quorum"], int]
"""A member's join over its inbound edges: `"all"`, `"any"` or `("quorum", k)`."""
EdgeKind = Literal["success", "completion"]
"""`success`: satisfied when the upstream completes. `completion`: by any terminal outcome."""
Policy = types_pb2.ExecutionPolicy | RetryPolicy | Mapping[str, Any] | str
"""A member's execution policy: the message, a `RetryPolicy`, or its JSON (mapping or text)."""

#: SubmitFlow's bounds (docs/flows.md#submitflow); larger graphs are built incrementally.
MAX_MEMBERS = 1000
MAX_EDGES = 5000
MAX_KEY_BYTES = 64
#: The tag each member gets with its key, so reads (`flowfabric flow show`) can name it.
MEMBER_TAG = "flowfabric.member"

_JOIN_KINDS = {
    "all": flow_pb2.Join.KIND_ALL,
    "any": flow_pb2.Join.KIND_ANY,
    "quorum": flow_pb2.Join.KIND_QUORUM,
}
_EDGE_KINDS = {
    "success": flow_pb2.DEPENDENCY_KIND_SUCCESS,
    "completion": flow_pb2.DEPENDENCY_KIND_COMPLETION,
}


class InvalidFlow(ValueError):
    """The flow cannot be submitted as built; nothing was sent.

    Attributes:
        reason: What the server would answer: `invalid_input`, `invalid_dependency`,
            `self_referencing_edge` or `cycle_detected`.
        member: The member concerned (for a cycle, one on it), if any.
    """

    def __init__(self, reason: str, message: str, member: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.member = member


@dataclass(frozen=True)
class FlowHandle:
    """A member of a flow being built: pass it in `after=` and `data_from=` of later members,
    and index the submitted flow with it (`submitted[handle]` is its execution id)."""

    key: str
    kind: str
    _builder: int = field(repr=False, compare=False)


@dataclass
class _Member:
    key: str
    kind: str
    payload: bytes
    encoding: str | None
    lane: str
    priority: int
    policy: Policy | None
    tags: dict[str, str]
    join: tuple[str, int]
    budgets: tuple[str, ...] = ()
    quota: str = ""
    concurrency_key: str = ""


@dataclass(frozen=True)
class _Edge:
    upstream: str
    downstream: str
    kind: str
    data: bool


def _join(join: Any, key: str) -> tuple[str, int]:
    if join in ("all", "any"):
        return str(join), 0
    if isinstance(join, Sequence) and not isinstance(join, str) and len(join) == 2:
        name, k = join
        if name == "quorum" and isinstance(k, int) and not isinstance(k, bool) and k >= 1:
            return "quorum", k
    raise InvalidFlow(
        "invalid_dependency",
        f'member {key!r}: join must be "all", "any" or ("quorum", k) with k >= 1, got {join!r}',
        key,
    )


class FlowBuilder(Generic[R]):
    """A flow being built; `submit()` sends it.

    Args:
        kind: The flow's kind (free-form, e.g. `dag`).
        namespace: The flow's namespace.
        flow_id: A UUID; default: a new one (a resubmit with the same id is a duplicate).
        failure_policy: What a member failure does to the rest of the flow; empty = the
            server's default (`skip_dependents`: its dependents are skipped).
        submitter: What `submit()` calls (set by `Client.flow` and `SyncClient.flow`).
    """

    def __init__(
        self,
        kind: str = "dag",
        *,
        namespace: str = "default",
        flow_id: str | None = None,
        failure_policy: str = "",
        submitter: Callable[[FlowBuilder[Any]], R] | None = None,
    ) -> None:
        if not kind or not namespace:
            raise InvalidFlow("invalid_input", "a flow needs a kind and a namespace")
        self.kind = kind
        self.namespace = namespace
        self.flow_id = flow_id or str(uuid.uuid4())
        self.failure_policy = failure_policy
        self._submitter = submitter
        self._members: dict[str, _Member] = {}
        self._edges: dict[tuple[str, str], _Edge] = {}

    # -- building -------------------------------------------------------------------------------

    def add(
        self,
        kind: str,
        payload: Payload = b"",
        *,
        key: str | None = None,
        lane: str = "default",
        priority: int = 0,
        policy: Policy | None = None,
        tags: Mapping[str, str] | None = None,
        after: Iterable[FlowHandle] = (),
        join: Join = "all",
        edge_kind: EdgeKind = "success",
        data_from: FlowHandle | None = None,
        payload_encoding: str | None = None,
        budgets: Sequence[str] = (),
        quota: str | None = None,
        concurrency_key: str | None = None,
    ) -> FlowHandle:
        """Add a member of `kind` that runs once the members in `after` decide it.

        Args:
            payload: bytes verbatim, str as UTF-8, mappings and lists as JSON.
            key: Names the member in the flow (1..64 bytes, unique); default: `kind`, then
                `kind-2`, `kind-3`, ...
            lane, priority, policy, tags: As in `Client.submit`.
            after: Its upstreams: it waits for them, and its join decides it.
            join: `"all"` (every upstream must satisfy its edge; the first impossible edge
                skips it), `"any"` (the first satisfied edge releases it) or `("quorum", k)`.
            edge_kind: Of the edges from `after`: `success` (the upstream must complete) or
                `completion` (any terminal outcome will do: ordering only).
            data_from: An upstream whose result becomes this member's input once its edge is
                satisfied (added to `after` if missing; success edges only).
            budgets: Budget ids added to the member's policy `budget_ids` (as in
                `Client.submit`).
            quota: The quota policy id admitting it (as in `Client.submit`).
            concurrency_key: Its key under that policy (as in `Client.submit`).

        Raises:
            InvalidFlow: A handle of another flow, a repeated upstream, a bad join or edge
                kind, data passing on a completion edge, a duplicate or oversized key.
        """
        ups = [self._own(h, "after") for h in after]
        if data_from is not None and self._own(data_from, "data_from") not in ups:
            ups.append(data_from.key)
        key = self._new_key(kind, key)
        parsed = _join(join, key)
        if parsed[0] != "all" and not ups:
            raise InvalidFlow(
                "invalid_dependency", f"member {key!r}: a {parsed[0]} join needs upstreams", key
            )
        if parsed[0] == "quorum" and parsed[1] > len(ups):
            raise InvalidFlow(
                "invalid_dependency",
                f"member {key!r}: quorum {parsed[1]} is more than its {len(ups)} upstreams",
                key,
            )
        if len(set(ups)) != len(ups):
            raise InvalidFlow("invalid_dependency", f"member {key!r}: an upstream is repeated", key)
        self._check_edge_kind(edge_kind, key)
        if data_from is not None and edge_kind == "completion":
            raise InvalidFlow(
                "invalid_dependency",
                f"member {key!r}: data_from needs a success edge (a completion edge may follow "
                "a failed upstream, which has no result)",
                key,
            )
        data, encoding = encode_payload(payload)
        self._members[key] = _Member(
            key=key, kind=kind, payload=data or b"", encoding=payload_encoding or encoding,
            lane=lane, priority=priority, policy=policy, tags=dict(tags or {}), join=parsed,
            budgets=_budgets(budgets, key), quota=_quota(quota, key),
            concurrency_key=_label(concurrency_key, key, "concurrency_key"),
        )  # fmt: skip
        for up in ups:
            is_data = data_from is not None and up == data_from.key
            self._edges[(up, key)] = _Edge(up, key, edge_kind, is_data)
        return FlowHandle(key, kind, id(self))

    def edge(
        self,
        upstream: FlowHandle,
        downstream: FlowHandle,
        *,
        kind: EdgeKind = "success",
        data: bool = False,
    ) -> None:
        """Add one edge between two members already added (for graphs `after=` cannot say in
        adding order). The downstream keeps the join it was added with; `submit()` checks the
        graph (cycles, quorum against the inbound edges).

        Raises:
            InvalidFlow: A handle of another flow, a self-edge, a repeated pair, a bad kind,
                data passing on a completion edge.
        """
        up, down = self._own(upstream, "upstream"), self._own(downstream, "downstream")
        self._link(up, down, kind, data)

    def _link(self, up: str, down: str, kind: str, data: bool) -> None:
        if up == down:
            raise InvalidFlow("self_referencing_edge", f"member {up!r} cannot wait for itself", up)
        if (up, down) in self._edges:
            raise InvalidFlow("invalid_dependency", f"edge {up!r} -> {down!r} is repeated", down)
        self._check_edge_kind(kind, down)
        if data and kind == "completion":
            raise InvalidFlow(
                "invalid_dependency", f"edge {up!r} -> {down!r}: data passing needs a success "
                "edge", down,
            )  # fmt: skip
        self._edges[(up, down)] = _Edge(up, down, kind, data)

    @staticmethod
    def _check_edge_kind(kind: str, key: str) -> None:
        if kind not in _EDGE_KINDS:
            raise InvalidFlow(
                "invalid_dependency",
                f"member {key!r}: edge kind must be success or completion, got {kind!r}",
                key,
            )

    def _own(self, handle: Any, what: str) -> str:
        if not isinstance(handle, FlowHandle):
            raise InvalidFlow(
                "invalid_dependency", f"{what} takes handles from add(), got {handle!r}"
            )
        if handle._builder != id(self) or handle.key not in self._members:
            raise InvalidFlow(
                "invalid_dependency", f"{what}: {handle.key!r} was not added to this flow",
                handle.key,
            )  # fmt: skip
        return handle.key

    def _new_key(self, kind: str, key: str | None) -> str:
        if not kind:
            raise InvalidFlow("invalid_input", "a member needs a kind")
        if key is None:
            key, n = kind, 1
            while key in self._members:
                n += 1
                key = f"{kind}-{n}"
        if not 1 <= len(key.encode()) <= MAX_KEY_BYTES:
            raise InvalidFlow("invalid_input", f"member key {key!r} must be 1..64 bytes", key)
        if key in self._members:
            raise InvalidFlow("invalid_input", f"member key {key!r} is used twice", key)
        return key

    # -- reading back -----------------------------------------------------------------------------

    @property
    def handles(self) -> list[FlowHandle]:
        """Every member, in the order added."""
        return [FlowHandle(m.key, m.kind, id(self)) for m in self._members.values()]

    def __len__(self) -> int:
        return len(self._members)

    def upstreams(self, member: FlowHandle) -> list[str]:
        """The keys of the members `member` waits for."""
        key = self._own(member, "member")
        return [e.upstream for e in self._edges.values() if e.downstream == key]

    # -- checking and sending -------------------------------------------------------------------

    def validate(self) -> None:
        """Check the whole graph as the server will: bounds, joins against inbound edges,
        cycles.

        Raises:
            InvalidFlow: With the reason the server would answer.
        """
        if not 1 <= len(self._members) <= MAX_MEMBERS:
            raise InvalidFlow(
                "invalid_input", f"a submit has 1..{MAX_MEMBERS} members, this flow has "
                f"{len(self._members)}",
            )  # fmt: skip
        if len(self._edges) > MAX_EDGES:
            raise InvalidFlow("invalid_input", f"a submit has at most {MAX_EDGES} edges")
        inbound = dict.fromkeys(self._members, 0)
        for edge in self._edges.values():
            inbound[edge.downstream] += 1
        for m in self._members.values():
            join, k = m.join
            if join != "all" and inbound[m.key] == 0:
                raise InvalidFlow(
                    "invalid_dependency", f"member {m.key!r}: a {join} join needs upstreams",
                    m.key,
                )  # fmt: skip
            if join == "quorum" and k > inbound[m.key]:
                raise InvalidFlow(
                    "invalid_dependency", f"member {m.key!r}: quorum {k} is more than its "
                    f"{inbound[m.key]} upstreams", m.key,
                )  # fmt: skip
        self._check_acyclic(inbound)

    def _check_acyclic(self, inbound: dict[str, int]) -> None:
        """Kahn's sort; what is left lies on or after a cycle, so walking back along inbound
        edges from it must come round to a member twice: that loop is named."""
        children: dict[str, list[str]] = {k: [] for k in self._members}
        parents: dict[str, list[str]] = {k: [] for k in self._members}
        for up, down in self._edges:
            children[up].append(down)
            parents[down].append(up)
        left = dict(inbound)
        ready = [k for k, n in left.items() if n == 0]
        while ready:
            for child in children[ready.pop()]:
                left[child] -= 1
                if left[child] == 0:
                    ready.append(child)
        stuck = {k for k, n in left.items() if n > 0}
        if not stuck:
            return
        path = [min(stuck)]
        while path.count(path[-1]) < 2:
            path.append(next(p for p in parents[path[-1]] if p in stuck))
        loop = path[path.index(path[-1]) :][::-1]
        raise InvalidFlow("cycle_detected", "the flow has a cycle: " + " -> ".join(loop), loop[0])

    def to_request(self) -> flow_pb2.SubmitFlowRequest:
        """The SubmitFlow request (after `validate()`)."""
        self.validate()
        request = flow_pb2.SubmitFlowRequest(
            flow_id=self.flow_id, flow_kind=self.kind, namespace=self.namespace,
            failure_policy=self.failure_policy,
        )  # fmt: skip
        for m in self._members.values():
            member = request.members.add(
                key=m.key, lane_id=m.lane, execution_kind=m.kind, input_payload=m.payload,
                priority=m.priority, tags={MEMBER_TAG: m.key, **m.tags},
            )  # fmt: skip
            if m.encoding:
                member.payload_encoding = m.encoding
            if m.join != ("all", 0):
                member.join.kind = _JOIN_KINDS[m.join[0]]
                member.join.quorum = m.join[1]
            _set_policy(member, m.policy, m.budgets)
            if m.quota:
                member.quota_policy_id = m.quota
            if m.concurrency_key:
                member.concurrency_key = m.concurrency_key
        for e in self._edges.values():
            edge = request.edges.add(
                upstream_key=e.upstream, downstream_key=e.downstream, kind=_EDGE_KINDS[e.kind]
            )
            if e.data:
                edge.data_passing_ref = e.upstream
        return request

    def submit(self) -> R:
        """Send the flow (one SubmitFlow call): awaitable from `Client.flow`, blocking from
        `SyncClient.flow`. Returns a `SubmittedFlow`.

        Raises:
            InvalidFlow: The local checks failed (nothing was sent).
        """
        if self._submitter is None:
            raise RuntimeError("this builder has no client: use client.submit_flow(builder)")
        return self._submitter(self)

    def map_submit(self, wrap: Callable[[R], T]) -> FlowBuilder[T]:
        """This builder, with `submit()` returning `wrap(what it returned)` (how
        `SyncClient.flow` makes `submit()` blocking)."""
        inner = self._submitter
        if inner is None:
            raise RuntimeError("this builder has no client to submit to")
        rebound = cast("FlowBuilder[T]", self)
        rebound._submitter = lambda builder: wrap(inner(builder))
        return rebound

    # -- from a file ----------------------------------------------------------------------------

    @classmethod
    def from_spec(
        cls, spec: Mapping[str, Any], *, submitter: Callable[[FlowBuilder[Any]], R] | None = None
    ) -> FlowBuilder[R]:
        """A builder from a mapping (JSON or YAML), members in any order:

            {"kind": "dag", "namespace": "default", "flow_id": "...", "failure_policy": "...",
             "members": [{"key": "fetch", "kind": "fetch", "payload": {...}, "lane": "default",
                          "priority": 0, "policy": {...}, "tags": {...},
                          "after": ["other-key"], "join": "all" | "any" | {"quorum": 2},
                          "edge_kind": "success" | "completion", "data_from": "other-key",
                          "budgets": ["budget-id"]}]}

        Raises:
            InvalidFlow: An unknown field or member key, or any check of `add`/`validate`.
        """
        _known(spec, {"kind", "namespace", "flow_id", "failure_policy", "members"}, "the flow")
        builder: FlowBuilder[R] = cls(
            str(spec.get("kind", "dag")), namespace=str(spec.get("namespace", "default")),
            flow_id=spec.get("flow_id"), failure_policy=str(spec.get("failure_policy", "")),
            submitter=submitter,
        )  # fmt: skip
        members = spec.get("members")
        if not isinstance(members, list) or not members:
            raise InvalidFlow("invalid_input", "the flow needs a non-empty `members` list")
        links: list[tuple[str, dict[str, Any]]] = []
        for i, raw in enumerate(members):
            if not isinstance(raw, Mapping) or "kind" not in raw:
                raise InvalidFlow("invalid_input", f"members[{i}] needs at least a `kind`")
            _known(raw, _MEMBER_FIELDS, f"members[{i}]")
            join = raw.get("join", "all")
            if isinstance(join, Mapping) and set(join) == {"quorum"}:
                join = ("quorum", join["quorum"])
            data, encoding = encode_payload(raw.get("payload", b""))
            key = builder._new_key(str(raw["kind"]), raw.get("key"))
            builder._members[key] = _Member(
                key=key, kind=str(raw["kind"]), payload=data or b"", encoding=encoding,
                lane=str(raw.get("lane", "default")), priority=int(raw.get("priority", 0)),
                policy=raw.get("policy"), tags={str(k): str(v) for k, v in
                                                 dict(raw.get("tags") or {}).items()},
                join=_join(join, key), budgets=_budgets(raw.get("budgets", ()), key),
                quota=_quota(raw.get("quota"), key),
                concurrency_key=_label(raw.get("concurrency_key"), key, "concurrency_key"),
            )  # fmt: skip
            links.append((key, dict(raw)))
        for key, raw in links:
            after = raw.get("after", [])
            if not isinstance(after, list):
                raise InvalidFlow("invalid_input", f"member {key!r}: `after` must be a list", key)
            after = [str(a) for a in after]
            data_from = raw.get("data_from")
            if data_from is not None and data_from not in after:
                after.append(str(data_from))
            for up in after:
                if up not in builder._members:
                    raise InvalidFlow(
                        "invalid_dependency", f"member {key!r}: unknown upstream {up!r}", key
                    )
                builder._link(up, key, str(raw.get("edge_kind", "success")), up == data_from)
        builder.validate()
        return builder


_MEMBER_FIELDS = {
    "key", "kind", "payload", "lane", "priority", "policy", "tags", "after", "join",
    "edge_kind", "data_from", "budgets", "quota", "concurrency_key",
}  # fmt: skip


def _label(value: Any, key: str, name: str) -> str:
    """A member's optional text field; the server checks its bounds."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidFlow("invalid_input", f"member {key!r}: {name} is a string", key)
    return value


def _quota(quota: Any, key: str) -> str:
    if quota is None:
        return ""
    if not isinstance(quota, str):
        raise InvalidFlow("invalid_input", f"member {key!r}: quota is a policy id", key)
    return quota


def _budgets(budgets: Any, key: str) -> tuple[str, ...]:
    if isinstance(budgets, str) or not isinstance(budgets, Iterable):
        raise InvalidFlow("invalid_input", f"member {key!r}: budgets is a list of ids", key)
    return tuple(str(b) for b in budgets)


def _known(obj: Mapping[str, Any], fields: set[str], where: str) -> None:
    unknown = sorted(set(obj) - fields)
    if unknown:
        raise InvalidFlow("invalid_input", f"{where}: unknown field(s) {', '.join(unknown)}")


def _set_policy(
    member: flow_pb2.SubmitFlowRequest.Member, policy: Policy | None, budgets: Sequence[str] = ()
) -> None:
    if policy is None:
        if budgets:
            member.policy.budget_ids.extend(dict.fromkeys(budgets))
        return
    if isinstance(policy, RetryPolicy):
        member.policy.CopyFrom(policy.to_proto())
    elif isinstance(policy, types_pb2.ExecutionPolicy):
        member.policy.CopyFrom(policy)
    else:  # verbatim: the server checks it (and names a bad field) as it does for a create
        try:
            member.policy_json = policy_json(policy, budgets)
        except ValueError as exc:
            raise InvalidFlow(
                "invalid_policy_json", f"member {member.key!r}: {exc}", member.key
            ) from None
        return
    for budget_id in budgets:
        if budget_id not in member.policy.budget_ids:
            member.policy.budget_ids.append(budget_id)
