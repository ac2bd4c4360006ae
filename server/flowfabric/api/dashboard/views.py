"""What the dashboard shows, as JSON-ready dicts (docs/dashboard.md#what-each-view-reads).

Every view goes through the existing reads: lane depth only through `lane_reads.lane_depths`,
executions through `reads.list_executions` / `reads.describe_execution` (which carries `why`),
flows through `flow_reads.describe_flow`, budgets and quotas through `budget_reads`. The few
things no read offered yet (a flow's member graph, the live workers and the leases they hold,
a sample of flows) are plain bounded reads here, never a `SCAN` and never a write.

Payload and result bytes are never read; output frames are handed to the page as text
(UTF-8, bad bytes replaced) and the page renders every string as text, never as HTML.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from flowfabric.server.api.servicers.base import ServerContext
from flowfabric.server.valkey import budget_reads, flow_reads, lane_reads, reads
from flowfabric.server.valkey.codec import hash_to_dict, text
from flowfabric.server.valkey.errors import FlowFabricError, InvalidInput
from flowfabric.server.valkey.ids import (
    flow_partition,
    parse_execution_id,
    parse_uuid,
    validate_lane,
)
from flowfabric.server.valkey.keys import (
    WORKERS_INDEX,
    BudgetKeys,
    ExecKeys,
    FlowKeys,
    PartitionKeys,
    QuotaKeys,
    WorkerKeys,
)
from flowfabric.server.valkey.why import Places
from flowfabric.v1 import types_pb2 as t

LIST_STATES = reads.LIST_STATES  # the lane indexes an execution list can walk
PAGE = 50  # executions per list page
HISTORY_SHOWN = 50  # lease history entries of an execution, newest first
WORKERS_SHOWN = 200
LEASES_PER_PARTITION = 200
FLOWS_SAMPLED_PER_PARTITION = 20
FLOWS_SHOWN = 100
FLOW_MEMBERS_SHOWN = 2000
COLLAPSE_AT = 6  # members of a fan-out level shown one by one below this many
BUDGETS_SHOWN = 100


def as_dict(message: Message) -> dict[str, Any]:
    """A proto message as the page reads it: field names as in the proto, enums by name."""
    return MessageToDict(message, preserving_proto_field_name=True)


def _pipe_rows(ctx: ServerContext) -> Any:
    return ctx.store.pipeline()


def _core_key(ctx: ServerContext, raw: str) -> str | None:
    """The core key of a stored execution id (None for an unparsable index member)."""
    try:
        return ExecKeys(parse_execution_id(raw, ctx.partitions)).core
    except FlowFabricError:
        return None


# -- lanes ---------------------------------------------------------------------------------------


async def lanes(ctx: ServerContext) -> dict[str, Any]:
    """Every known lane (and the configured ones) with its depth by state and head wait."""
    now = await ctx.store.time_ms()
    depths = await lane_reads.lane_depths(ctx.store, range(ctx.partitions), now_ms=now)
    for lane in ctx.config.lanes:  # a configured lane nothing was sent to yet shows as empty
        depths.setdefault(lane, lane_reads.LaneDepth(lane))
    rows = [
        {
            "lane": d.lane,
            "counts": d.counts,
            "blocked": d.blocked,
            "head_wait_ms": d.head_age_ms(now),
            "partitions": len(d.partitions),
        }
        for d in sorted(depths.values(), key=lambda d: d.lane)
    ]
    return {"now": now, "states": list(lane_reads.LANE_STATES), "lanes": rows}


# -- executions ----------------------------------------------------------------------------------


async def executions(
    ctx: ServerContext, lane: str, state: str, public_state: str, page_token: str
) -> dict[str, Any]:
    """One page of a lane's index `state`, optionally only one public state."""
    lane = validate_lane(lane or "default", "lane")
    if state not in LIST_STATES:
        raise InvalidInput("state", f"state must be one of {', '.join(LIST_STATES)}")
    wanted: frozenset[int] = frozenset()
    if public_state:
        name = "PUBLIC_STATE_" + public_state.upper()
        if name not in t.PublicState.DESCRIPTOR.values_by_name or name.endswith("UNSPECIFIED"):
            raise InvalidInput("public_state", f"unknown public state {public_state!r}")
        wanted = frozenset({t.PublicState.Value(name)})
    page = reads.Page.parse(page_token) if page_token else None
    if page and not 0 <= page.partition < ctx.partitions:
        raise InvalidInput("page_token", "page_token is out of range")
    rows, nxt = await reads.list_executions(
        ctx.store, num_partitions=ctx.partitions, lane=lane, state=state, limit=PAGE,
        partition=None, page=page, public_states=wanted,
    )  # fmt: skip
    return {
        "lane": lane,
        "state": state,
        "executions": [as_dict(r) for r in rows],
        "next_page_token": nxt.token() if nxt else "",
    }


async def execution(ctx: ServerContext, raw_id: str) -> dict[str, Any]:
    """Snapshot (attempts included), why it is not running, and its lease history."""
    eid = ctx.execution_id(raw_id)
    cfg = ctx.config
    snap, why = await reads.describe_execution(
        ctx.store, eid, Places(cfg.budget_partitions, cfg.quota_partitions)
    )
    entries = await ctx.store.call(
        "XREVRANGE", ExecKeys(eid).lease_history, "+", "-", "COUNT", HISTORY_SHOWN
    )
    history = []
    for entry in entries or ():
        raw = entry[1]
        if isinstance(raw, dict):
            fields = {text(k): text(v) for k, v in raw.items()}
        else:
            flat = list(raw or [])
            fields = {text(flat[i]): text(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}
        history.append({"id": text(entry[0]), **fields})
    return {"snapshot": as_dict(snap), "why": as_dict(why), "history": history}


# -- flows ---------------------------------------------------------------------------------------


async def flows(ctx: ServerContext) -> dict[str, Any]:
    """A bounded sample of flows (up to FLOWS_SAMPLED_PER_PARTITION per partition, one SSCAN
    step each), newest first."""
    pipe = _pipe_rows(ctx)
    for p in range(ctx.partitions):
        pipe.sscan(PartitionKeys.of(p).flow_index, 0, count=FLOWS_SAMPLED_PER_PARTITION)
    ids: list[tuple[int, str]] = []
    for p, (_cursor, members) in enumerate(await ctx.store.run_pipeline(pipe)):
        ids.extend((p, text(m)) for m in members)
    if not ids:
        return {"flows": []}
    pipe = _pipe_rows(ctx)
    fields = ("flow_kind", "public_flow_state", "node_count", "created_at", "namespace")
    for p, fid in ids:
        pipe.hmget(FlowKeys(f"{{fp:{p}}}", fid).core, list(fields))
    rows = []
    for (_p, fid), values in zip(ids, await ctx.store.run_pipeline(pipe), strict=True):
        row = dict(zip(fields, (text(v) for v in values), strict=True))
        if row["public_flow_state"]:
            rows.append({"flow_id": fid, **row})
    rows.sort(key=lambda r: int(r["created_at"] or 0), reverse=True)
    return {"flows": rows[:FLOWS_SHOWN]}


def _collapse(
    members: dict[str, dict[str, str]], edges: list[tuple[str, str, str]]
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Nodes and edges for the graph: members with the same kind, upstreams and downstreams
    (the branches of a fan-out) become one node with their states counted, once there are at
    least COLLAPSE_AT of them."""
    ups: dict[str, set[str]] = defaultdict(set)
    downs: dict[str, set[str]] = defaultdict(set)
    for up, down, _kind in edges:
        ups[down].add(up)
        downs[up].add(down)
    groups: dict[tuple[str, frozenset[str], frozenset[str]], list[str]] = defaultdict(list)
    for eid in sorted(members):
        key = (members[eid]["kind"], frozenset(ups[eid]), frozenset(downs[eid]))
        groups[key].append(eid)
    node_of: dict[str, str] = {}
    nodes: list[dict[str, Any]] = []
    for n, ((kind, _u, _d), ids) in enumerate(groups.items()):
        if len(ids) >= COLLAPSE_AT:
            gid = f"group:{n}"
            states = Counter(members[i]["state"] for i in ids)
            nodes.append({"id": gid, "kind": kind, "count": len(ids), "states": dict(states),
                          "members": ids[:5]})  # fmt: skip
            node_of.update(dict.fromkeys(ids, gid))
        else:
            for i in ids:
                nodes.append({"id": i, "kind": kind, "count": 1, "state": members[i]["state"]})
                node_of[i] = i
    seen: set[tuple[str, str]] = set()
    out_edges = []
    for up, down, kind in edges:
        pair = (node_of.get(up, up), node_of.get(down, down))
        if pair not in seen and pair[0] in node_of.values() and pair[1] in node_of.values():
            seen.add(pair)
            out_edges.append({"from": pair[0], "to": pair[1], "kind": kind})
    return nodes, out_edges


async def flow(ctx: ServerContext, raw_id: str) -> dict[str, Any]:
    """The flow record and its member graph (large fan-outs collapsed)."""
    fid = parse_uuid(raw_id, "flow_id")
    tag = f"{{fp:{flow_partition(fid, ctx.partitions)}}}"
    keys = FlowKeys(tag, fid)
    view = await flow_reads.describe_flow(ctx.store, keys)
    if view is None:
        raise FlowFabricError("flow_not_found", message=f"no flow {fid}")
    ids = sorted(text(m) for m in await ctx.store.call("SMEMBERS", keys.members))
    truncated = len(ids) > FLOW_MEMBERS_SHOWN
    ids = [i for i in ids[:FLOW_MEMBERS_SHOWN] if _core_key(ctx, i)]
    pipe = _pipe_rows(ctx)
    for eid in ids:
        pipe.hmget(_core_key(ctx, eid), ["public_state", "execution_kind"])
        pipe.smembers(keys.outgoing(eid))
    rows = await ctx.store.run_pipeline(pipe) if ids else []
    members: dict[str, dict[str, str]] = {}
    edge_ids: list[str] = []
    for i, eid in enumerate(ids):
        state, kind = (text(v) for v in rows[2 * i])
        members[eid] = {"state": state or "unknown", "kind": kind}
        edge_ids.extend(sorted(text(e) for e in rows[2 * i + 1]))
    pipe = _pipe_rows(ctx)
    for edge_id in edge_ids:
        pipe.hmget(keys.edge(edge_id), ["upstream_execution_id", "downstream_execution_id",
                                         "dependency_kind"])  # fmt: skip
    edges = []
    for values in await ctx.store.run_pipeline(pipe) if edge_ids else []:
        up, down, kind = (text(v) for v in values)
        if up in members and down in members:
            edges.append((up, down, kind))
    nodes, graph_edges = _collapse(members, edges)
    return {
        "flow": as_dict(view.snapshot),
        "members_by_state": view.members_by_state,
        "failures": [as_dict(f) for f in view.failures],
        "nodes": nodes,
        "edges": graph_edges,
        "truncated": truncated,
    }


# -- budgets and quotas --------------------------------------------------------------------------


async def budgets(ctx: ServerContext) -> dict[str, Any]:
    n, q = ctx.config.budget_partitions, ctx.config.quota_partitions

    async def budget(part: int, bid: str) -> t.BudgetStatus | None:
        return await budget_reads.budget_status(ctx.store, BudgetKeys.of(part, bid))

    async def quota(part: int, qid: str) -> t.QuotaPolicy | None:
        return await budget_reads.quota_policy(ctx.store, QuotaKeys.of(part, qid))

    rows, _ = await budget_reads.list_page(
        ctx.store, n, lambda p: BudgetKeys.of(p).policies, budget, BUDGETS_SHOWN, None
    )
    quotas, _ = await budget_reads.list_page(
        ctx.store, q, lambda p: QuotaKeys.of(p).policies, quota, BUDGETS_SHOWN, None
    )
    return {"budgets": [as_dict(b) for b in rows], "quotas": [as_dict(x) for x in quotas]}


# -- workers -------------------------------------------------------------------------------------


async def workers(ctx: ServerContext) -> dict[str, Any]:
    """Live workers (the registry) and the leases held, read from each partition's lease-expiry
    index (the soonest LEASES_PER_PARTITION each) and grouped by holder."""
    store = ctx.store
    instances = sorted(text(m) for m in await store.call("SMEMBERS", WORKERS_INDEX))
    instances = instances[:WORKERS_SHOWN]
    pipe = store.pipeline()
    for inst in instances:
        k = WorkerKeys(inst)
        pipe.hgetall(k.info)
        pipe.get(k.caps)
        pipe.pttl(k.alive)
    info_rows = await store.run_pipeline(pipe) if instances else []
    pipe = store.pipeline()
    for p in range(ctx.partitions):
        pipe.zrange(PartitionKeys.of(p).lease_expiry, 0, LEASES_PER_PARTITION - 1)
    leased = [text(m) for members in await store.run_pipeline(pipe) for m in members]
    leased = [eid for eid in leased if _core_key(ctx, eid)]
    fields = ("current_worker_instance_id", "lane_id", "execution_kind", "lease_expires_at",
              "current_attempt_index", "ownership_state")  # fmt: skip
    pipe = store.pipeline()
    for eid in leased:
        pipe.hmget(_core_key(ctx, eid), list(fields))
    by_worker: dict[str, list[dict[str, str]]] = defaultdict(list)
    for eid, values in zip(leased, await store.run_pipeline(pipe) if leased else [], strict=True):
        row = dict(zip(fields, (text(v) for v in values), strict=True))
        holder = row.pop("current_worker_instance_id")
        if holder:
            by_worker[holder].append({"execution_id": eid, **row})
    out = []
    for i, inst in enumerate(instances):
        info = hash_to_dict(info_rows[3 * i])
        ttl = int(info_rows[3 * i + 2] or -2)
        if ttl < 0:
            continue  # gone; its index entry is pruned by the registry, not by a read
        out.append({
            "worker_instance_id": inst,
            "worker_id": info.get("worker_id", ""),
            "lanes": [x for x in info.get("lanes", "").split(",") if x],
            "capabilities": [x for x in text(info_rows[3 * i + 1]).split(",") if x],
            "registered_at": int(info.get("registered_at") or 0),
            "last_heartbeat_at": int(info.get("last_heartbeat_at") or 0),
            "alive_ttl_ms": ttl,
            "leases": by_worker.get(inst, []),
        })  # fmt: skip
    return {"workers": out}
