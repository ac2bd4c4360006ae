-- flow.lua: flows, dependency edges and their resolution (docs/flows.md).
--
-- Every flow key and every member key share the flow's partition tag {fp:N}, so one call may
-- touch the flow and all its members (docs/flows.md#keys). Keys other than KEYS[1..n] are built
-- from the tag of KEYS[1] (docs/architecture.md#keys-built-inside-lua).
--
-- uses: reply, util, bounds, argv, keys, flowstate, state, eligible, deps, cancel, create, replay

local TERMINAL_FLOW = {cancelled = true, completed = true, failed = true}
local JOINS = {all = true, any = true, quorum = true}
local FAILURE_POLICIES = {skip_dependents = true, fail_fast = true, continue = true}
-- Edge kinds (docs/flows.md#joins-and-edge-kinds); success_only is the reference's name.
local EDGE_KINDS = {[''] = 'success', success = 'success', success_only = 'success',
  completion = 'completion'}
local SATISFACTION = {success = 'upstream_success', completion = 'upstream_terminal'}
local CYCLE_WALK_MAX = 1000
-- Member ids per ff_cancel_flow_members call (the server sends at most this many).
local CANCEL_BATCH = 500
local MAX_MEMBERS = 1000
local MAX_EDGES = 5000

-- A flow bound breached (docs/flows.md#limits): the bound's name, its maximum, a detail.
local function limit_err(name, detail)
  return Reply.err('flow_limit_exceeded', name, Util.num(Bounds[name]), detail)
end

-- Flow watchers learn of a change no member transition announces (docs/flows.md#watching-a-flow).
local function flow_changed(tag, fid, now)
  redis.call('SPUBLISH', 'ff:exec_events:' .. tag, cjson.encode({type = 'flow_changed',
    flow_id = fid, at = now}))
end

local function flow_key(tag, fid, suffix)
  return Keys.flow(tag, fid, suffix)
end

-- Flow core fields as a table, or nil when the flow does not exist.
local function load_flow(key)
  local f = Util.hgetall(key)
  if next(f) == nil then
    return nil
  end
  return f
end

-- The edge kind of a request: canonical name, or nil plus invalid_dependency.
local function edge_kind(kind, ref)
  local k = EDGE_KINDS[kind or '']
  if not k then
    return nil, Reply.err('invalid_dependency', 'unknown dependency_kind ' .. tostring(kind)
      .. ' (success or completion)')
  end
  if k == 'completion' and Util.is_set(ref) then
    return nil, Reply.err('invalid_dependency',
      'data_passing_ref needs a success edge: a completion edge may be satisfied by a failure')
  end
  return k, nil
end

-- A join spec: (kind, k, expected_edges) or nil plus invalid_dependency. `indegree` (when
-- known: a submit) bounds k and must equal a non-zero expected_edges.
local function join_of(kind, quorum, expected, indegree, who)
  kind = (Util.is_set(kind) and kind) or 'all'
  if not JOINS[kind] then
    return nil, nil, nil, Reply.err('invalid_dependency', who .. ': unknown join '
      .. tostring(kind) .. ' (all, any or quorum)')
  end
  local e = tonumber((Util.is_set(expected) and expected) or '0')
  if not e or e ~= math.floor(e) or e < 0 or e > Bounds.FLOW_EDGES_PER_MEMBER_MAX then
    return nil, nil, nil, Reply.err('invalid_dependency', who .. ': expected_edges must be 0..'
      .. Bounds.FLOW_EDGES_PER_MEMBER_MAX)
  elseif indegree and e > 0 and e ~= indegree then
    return nil, nil, nil, Reply.err('invalid_dependency', who .. ': expected_edges ' .. e
      .. ' differs from its ' .. indegree .. ' inbound edge(s)')
  end
  local k = ''
  if kind == 'quorum' then
    local n = tonumber(quorum)
    if not n or n ~= math.floor(n) or n < 1 then
      return nil, nil, nil, Reply.err('invalid_dependency', who .. ': a quorum join needs k >= 1')
    end
    local bound = indegree or (e > 0 and e) or nil
    if bound and n > bound then
      return nil, nil, nil, Reply.err('invalid_dependency', who .. ': quorum k=' .. n
        .. ' exceeds its ' .. bound .. ' inbound edge(s)')
    end
    k = Util.num(n)
  elseif Util.is_set(quorum) and tostring(quorum) ~= '0' then
    return nil, nil, nil, Reply.err('invalid_dependency', who .. ': k is only for a quorum join')
  end
  if indegree == 0 and kind ~= 'all' then
    return nil, nil, nil, Reply.err('invalid_dependency', who .. ': a ' .. kind
      .. ' join needs inbound edges')
  end
  return kind, k, ((e > 0) and Util.num(e)) or '', nil
end

-- Writes the flow-side edge record and the adjacency sets.
local function write_edge(tag, fid, e, now)
  redis.call('HSET', flow_key(tag, fid, 'edge:' .. e.id), 'edge_id', e.id, 'flow_id', fid,
    'upstream_execution_id', e.up, 'downstream_execution_id', e.down, 'dependency_kind', e.kind,
    'satisfaction_condition', SATISFACTION[e.kind], 'data_passing_ref', e.ref or '',
    'edge_state', 'pending', 'created_at', Util.num(now), 'created_by', 'engine')
  redis.call('SADD', flow_key(tag, fid, 'out:' .. e.up), e.id)
  redis.call('SADD', flow_key(tag, fid, 'in:' .. e.down), e.id)
end

-- Writes the child's copy of one inbound edge (state unsatisfied) and indexes it.
local function write_dep(tag, fid, e, now)
  redis.call('HSET', Keys.exec(tag, e.down, 'dep:' .. e.id), 'edge_id', e.id, 'flow_id', fid,
    'upstream_execution_id', e.up, 'downstream_execution_id', e.down, 'dependency_kind', e.kind,
    'state', 'unsatisfied', 'data_passing_ref', e.ref or '', 'last_resolved_at', '',
    'created_at', Util.num(now))
  redis.call('SADD', Keys.exec(tag, e.down, 'deps:unresolved'), e.id)
  redis.call('SADD', Keys.exec(tag, e.down, 'deps:all_edges'), e.id)
end

local function new_flow_fields(fid, kind, namespace, policy, now)
  local f = {'flow_id', fid, 'flow_kind', kind, 'namespace', namespace, 'graph_revision', '0',
    'node_count', '0', 'edge_count', '0', 'public_flow_state', 'open',
    'failure_policy', policy, 'created_at', Util.num(now), 'last_mutation_at', Util.num(now)}
  for _, s in ipairs(FlowState.MEMBER_STATES) do
    f[#f + 1] = 'members_' .. s
    f[#f + 1] = '0'
  end
  return f
end

local function failure_policy(p)
  p = (Util.is_set(p) and p) or 'skip_dependents'
  if not FAILURE_POLICIES[p] then
    return nil, Reply.err('invalid_input', 'failure_policy must be skip_dependents, fail_fast or '
      .. 'continue, got: ' .. p)
  end
  return p, nil
end

-- ff_create_flow
--   KEYS (2): 1 flow core, 2 flow_index.
--   ARGV (4): 1 flow_id, 2 flow_kind (non-empty), 3 namespace (non-empty), 4 failure_policy
--     ("" = skip_dependents; fail_fast; continue: docs/flows.md#failure-policies).
--   Now: TIME.
--   Replies: {1,"OK",flow_id} | {1,"ALREADY_SATISFIED",flow_id} (existing flow unchanged).
--   Errors: invalid_input (flow_kind, namespace, failure_policy).
--   Writes: flow core (open, revision 0, counts 0, member counters 0); SADD flow_index (also
--     on ALREADY_SATISFIED: self-healing).
local CREATE_FLOW_ARGV = {{2, 'flow_kind', 'str'}, {3, 'namespace', 'str'}}

local function create_flow(keys, argv)
  local _, e = Argv.parse(argv, CREATE_FLOW_ARGV)
  if e then
    return e
  end
  local policy, perr = failure_policy(argv[4])
  if not policy then
    return perr
  end
  redis.call('SADD', keys[2], argv[1])
  if redis.call('EXISTS', keys[1]) == 1 then
    return Reply.already(argv[1])
  end
  redis.call('HSET', keys[1], unpack(new_flow_fields(argv[1], argv[2], argv[3], policy,
    Util.now_ms())))
  return Reply.ok(argv[1])
end

redis.register_function('ff_create_flow', create_flow)

-- ff_add_execution_to_flow
--   KEYS (4): 1 flow core, 2 members, 3 flow_index, 4 exec core (the member; same tag).
--   ARGV (2): 1 flow_id, 2 execution_id.
--   Now: TIME.
--   Replies: {1,"OK",execution_id,node_count}
--     | {1,"ALREADY_SATISFIED",execution_id,node_count}: already a member (a missing back-pointer
--       is healed; no counter or revision change).
--   Errors (in order): flow_not_found, flow_already_terminal (cancelled, completed, failed;
--     detail = state), execution_not_found, execution_already_in_flow (detail = the other flow),
--     flow_limit_exceeded (FLOW_MEMBERS_MAX; a new member only).
--   Writes: SADD members, flow_index; core flow_id; flow node_count+1, graph_revision+1,
--     last_mutation_at, members_<public_state>+1 and public_flow_state; SPUBLISH ready on
--     ff:ready:{p} when the member is eligible.
local function add_execution_to_flow(keys, argv)
  local fid, eid = argv[1], argv[2]
  local tag = Util.tag_of(keys[1])
  if keys[4] ~= Keys.exec(tag, eid, 'core') then
    error({err = 'ERR flowfabric: KEYS[4] is not the core of ARGV[2] on the flow\'s tag'})
  end
  local f = load_flow(keys[1])
  if not f then
    return Reply.err('flow_not_found')
  elseif TERMINAL_FLOW[f.public_flow_state] then
    return Reply.err('flow_already_terminal', f.public_flow_state)
  end
  local c = redis.call('HMGET', keys[4], 'flow_id', 'public_state', 'eligibility_state', 'lane_id')
  if not c[2] then
    return Reply.err('execution_not_found')
  elseif Util.is_set(c[1]) and c[1] ~= fid then
    return Reply.err('execution_already_in_flow', c[1])
  end
  redis.call('SADD', keys[3], fid)
  if redis.call('SISMEMBER', keys[2], eid) == 1 then
    redis.call('HSET', keys[4], 'flow_id', fid)
    return Reply.already(eid, f.node_count or '0')
  end
  if redis.call('SCARD', keys[2]) >= Bounds.FLOW_MEMBERS_MAX then
    return limit_err('FLOW_MEMBERS_MAX', 'the flow has ' .. Bounds.FLOW_MEMBERS_MAX .. ' members')
  end
  local now = Util.now_ms()
  redis.call('SADD', keys[2], eid)
  redis.call('HSET', keys[4], 'flow_id', fid)
  local n = redis.call('HINCRBY', keys[1], 'node_count', 1)
  redis.call('HINCRBY', keys[1], 'graph_revision', 1)
  redis.call('HSET', keys[1], 'last_mutation_at', Util.num(now))
  FlowState.moved(tag, fid, eid, nil, c[2], nil, now)
  if c[3] == 'eligible_now' then
    State.ready(tag, c[4])
  end
  return Reply.ok(eid, Util.num(n))
end

redis.register_function('ff_add_execution_to_flow', add_execution_to_flow)

-- Depth-first walk of the members below `from` over the stored out-edges. Returns (seen,
-- height, dist): every member reached (from included), the longest chain of edges below
-- `from`, and each reached member's longest distance from it; nil when the walk passes
-- CYCLE_WALK_MAX members (too large to verify).
local function below(tag, fid, from)
  local seen, kids, order, count = {}, {}, {}, 0
  local stack = {{from, false}}
  while #stack > 0 do
    local top = table.remove(stack)
    local node = top[1]
    if top[2] then
      order[#order + 1] = node
    elseif not seen[node] then
      seen[node] = true
      count = count + 1
      if count > CYCLE_WALK_MAX then
        return nil
      end
      local list = {}
      for _, edge in ipairs(redis.call('SMEMBERS', flow_key(tag, fid, 'out:' .. node))) do
        local down = redis.call('HGET', flow_key(tag, fid, 'edge:' .. edge),
          'downstream_execution_id')
        if down then
          list[#list + 1] = down
        end
      end
      kids[node] = list
      stack[#stack + 1] = {node, true}
      for _, k in ipairs(list) do
        if not seen[k] then
          stack[#stack + 1] = {k, false}
        end
      end
    end
  end
  -- `order` is a post-order, so reversed it is topological: relax each member's children.
  local dist, height = {[from] = 0}, 0
  for i = #order, 1, -1 do
    local d = dist[order[i]]
    if d then
      height = math.max(height, d)
      for _, k in ipairs(kids[order[i]]) do
        if (dist[k] or -1) < d + 1 then
          dist[k] = d + 1
        end
      end
    end
  end
  return seen, height, dist
end

-- ff_stage_dependency_edge
--   KEYS (2): 1 flow core, 2 members.
--   ARGV (7): 1 flow_id, 2 edge_id, 3 upstream_execution_id, 4 downstream_execution_id,
--     5 dependency_kind ("" | success | success_only = success; completion), 6 data_passing_ref
--     ("" = none; success edges only), 7 expected_graph_revision.
--   Now: TIME.
--   Replies: {1,"OK",edge_id,new_graph_revision}
--   Errors (in order): self_referencing_edge, invalid_dependency (kind, data_passing_ref on a
--     completion edge), invalid_input (expected_graph_revision), flow_not_found,
--     flow_already_terminal (detail = state), stale_graph_revision (detail = current),
--     execution_not_in_flow (detail = the id; upstream first), cycle_detected (also when the walk
--     passes 1000 nodes), dependency_already_exists, flow_limit_exceeded (details: bound, max,
--     what; FLOW_EDGES_PER_MEMBER_MAX for U's outbound or D's inbound edges, FLOW_DEPTH_MAX for
--     the longest chain through the edge).
--   Writes: flow edge hash (immutable; edge_state pending), SADD out:<U>, in:<D>;
--     graph_revision+1, edge_count+1, last_mutation_at; the depth hash of D and the members
--     below it (longest chain of edges above each).
local STAGE_ARGV = {{7, 'expected_graph_revision', 'int', min = 0}}

local function stage_dependency_edge(keys, argv)
  local fid, edge, up, down = argv[1], argv[2], argv[3], argv[4]
  if up == down then
    return Reply.err('self_referencing_edge', up)
  end
  local kind, kerr = edge_kind(argv[5], argv[6])
  if not kind then
    return kerr
  end
  local a, e = Argv.parse(argv, STAGE_ARGV)
  if not a then
    return e
  end
  local tag = Util.tag_of(keys[1])
  local f = load_flow(keys[1])
  if not f then
    return Reply.err('flow_not_found')
  elseif TERMINAL_FLOW[f.public_flow_state] then
    return Reply.err('flow_already_terminal', f.public_flow_state)
  elseif (f.graph_revision or '0') ~= Util.num(a.expected_graph_revision) then
    return Reply.err('stale_graph_revision', f.graph_revision or '0')
  end
  for _, m in ipairs({up, down}) do
    if redis.call('SISMEMBER', keys[2], m) == 0 then
      return Reply.err('execution_not_in_flow', m)
    end
  end
  local seen, height, dist = below(tag, fid, down)
  if not seen or seen[up] then
    return Reply.err('cycle_detected', up .. ' is reachable from ' .. down)
  end
  if redis.call('EXISTS', flow_key(tag, fid, 'edge:' .. edge)) == 1 then
    return Reply.err('dependency_already_exists', edge)
  end
  local max_edges = Bounds.FLOW_EDGES_PER_MEMBER_MAX
  if redis.call('SCARD', flow_key(tag, fid, 'out:' .. up)) >= max_edges then
    return limit_err('FLOW_EDGES_PER_MEMBER_MAX', up .. ' already has ' .. max_edges
      .. ' outbound edges')
  elseif redis.call('SCARD', flow_key(tag, fid, 'in:' .. down)) >= max_edges then
    return limit_err('FLOW_EDGES_PER_MEMBER_MAX', down .. ' already has ' .. max_edges
      .. ' inbound edges')
  end
  local depth_key = flow_key(tag, fid, 'depth')
  local up_depth = tonumber(redis.call('HGET', depth_key, up) or '0') or 0
  if up_depth + 1 + height + 1 > Bounds.FLOW_DEPTH_MAX then
    return limit_err('FLOW_DEPTH_MAX', 'the edge makes a chain of ' .. (up_depth + height + 2)
      .. ' members')
  end
  local now = Util.now_ms()
  write_edge(tag, fid, {id = edge, up = up, down = down, kind = kind, ref = argv[6]}, now)
  for m, d in pairs(dist) do
    local cand = up_depth + 1 + d
    if cand > (tonumber(redis.call('HGET', depth_key, m) or '0') or 0) then
      redis.call('HSET', depth_key, m, Util.num(cand))
    end
  end
  local rev = redis.call('HINCRBY', keys[1], 'graph_revision', 1)
  redis.call('HINCRBY', keys[1], 'edge_count', 1)
  redis.call('HSET', keys[1], 'last_mutation_at', Util.num(now))
  return Reply.ok(edge, Util.num(rev))
end

redis.register_function('ff_stage_dependency_edge', stage_dependency_edge)

-- The lane set of a runnable execution's eligibility state (a re-gated child leaves the
-- index it is in, not only eligible).
local RUNNABLE_SET = {
  eligible_now = 'eligible', not_eligible_until_time = 'delayed',
  blocked_by_budget = 'blocked:budget', blocked_by_quota = 'blocked:quota',
  blocked_by_route = 'blocked:route', blocked_by_operator = 'blocked:operator',
  blocked_by_lane_state = 'blocked:operator',
}

-- ff_apply_dependency_to_child
--   KEYS (2): 1 exec core (the downstream child), 2 flow core.
--   ARGV (6): 1 execution_id (the child), 2 flow_id, 3 edge_id (staged on this flow with this
--     downstream), 4 join_kind ("" = keep the child's join, all by default; all | any |
--     quorum), 5 join_quorum (k of a quorum join; "" otherwise), 6 join_expected_edges (the
--     inbound edges the child will have, 0..Bounds.FLOW_EDGES_PER_MEMBER_MAX; "" = judge by
--     the edges applied so far).
--   Reads: the staged edge (kind, upstream, data_passing_ref); the upstream's core.
--   Now: TIME.
--   Replies: {1,"OK",unsatisfied_count} | {1,"ALREADY_SATISFIED","already_applied"}
--   Errors (in order): execution_not_found, execution_not_in_flow (child not stamped with a
--     flow), execution_already_in_flow (stamped with another; detail = it), invalid_dependency
--     (edge not staged, edge of another child, bad join, join differs from the child's, child
--     already active or suspended).
--   Writes: dep:<edge> (unsatisfied), SADD deps:unresolved, deps:all_edges; deps:meta
--     total_count+1, unsatisfied_required_count+1, join_kind/join_quorum, flow_id,
--     last_flow_graph_revision, last_dependency_update_at. A runnable child the join does not
--     release yet is gated: blocked_by_dependencies / waiting_for_children (attempt state
--     kept), moved from its lane set to blocked:dependencies. An upstream that is already
--     terminal resolves the edge in the same call (release or skip, with the skip cascade).
local function apply_dependency_to_child(keys, argv)
  local x = State.load_exec(keys, argv)
  if not x then
    return Reply.err('execution_not_found')
  end
  local c, fid, edge = x.core, argv[2], argv[3]
  if not Util.is_set(c.flow_id) then
    return Reply.err('execution_not_in_flow', x.eid)
  elseif c.flow_id ~= fid then
    return Reply.err('execution_already_in_flow', c.flow_id)
  end
  local ed = Util.hgetall(flow_key(x.tag, fid, 'edge:' .. edge))
  if next(ed) == nil then
    return Reply.err('invalid_dependency', 'edge ' .. edge .. ' is not staged on flow ' .. fid)
  elseif ed.downstream_execution_id ~= x.eid then
    return Reply.err('invalid_dependency', 'edge ' .. edge .. ' leads to '
      .. tostring(ed.downstream_execution_id))
  end
  local mkey = Keys.exec(x.tag, x.eid, 'deps:meta')
  local stored = redis.call('HMGET', mkey, 'join_kind', 'join_quorum', 'join_edges')
  local join, k, expect, jerr = join_of(argv[4], argv[5], argv[6], nil, x.eid)
  if not join then
    return jerr
  end
  if Util.is_set(stored[1]) and Util.is_set(argv[4])
      and (stored[1] ~= join or (stored[2] or '') ~= k or (stored[3] or '') ~= expect) then
    return Reply.err('invalid_dependency', x.eid .. ': its join is already ' .. stored[1])
  end
  local dkey = Keys.exec(x.tag, x.eid, 'dep:' .. edge)
  if redis.call('EXISTS', dkey) == 1 then
    return Reply.already('already_applied')
  end
  if c.lifecycle_phase == 'active' or c.lifecycle_phase == 'suspended' then
    return Reply.err('invalid_dependency', x.eid .. ' has already started ('
      .. c.lifecycle_phase .. ')')
  end
  local now = Util.now_ms()
  local fields = {'flow_id', fid, 'last_dependency_update_at', Util.num(now),
    'last_flow_graph_revision', redis.call('HGET', keys[2], 'graph_revision') or '0'}
  if not Util.is_set(stored[1]) or Util.is_set(argv[4]) then
    for _, v in ipairs({'join_kind', join, 'join_quorum', k, 'join_edges', expect}) do
      fields[#fields + 1] = v
    end
  end
  local up = ed.upstream_execution_id
  write_dep(x.tag, fid, {id = edge, up = up, down = x.eid, kind = ed.dependency_kind,
    ref = ed.data_passing_ref}, now)
  redis.call('HINCRBY', mkey, 'total_count', 1)
  local n = redis.call('HINCRBY', mkey, 'unsatisfied_required_count', 1)
  redis.call('HSET', mkey, unpack(fields))
  local from = RUNNABLE_SET[c.eligibility_state]
  if c.lifecycle_phase == 'runnable' and from
      and Deps.verdict(Deps.counts(x.tag, x.eid)) ~= 'release' then
    local attempt = c.attempt_state
    if not Util.is_set(attempt) or attempt == 'none' then
      attempt = 'pending_first_attempt'
    end
    State.write_vector(x.core_key, x.eid, {'runnable', 'unowned', 'blocked_by_dependencies',
      'waiting_for_children', n .. ' dep(s) unresolved incl ' .. edge, 'none', attempt}, now)
    if from == 'eligible' then
      Eligible.remove(x.tag, c.lane_id, x.eid, c.namespace)
    else
      redis.call('ZREM', Keys.lane(x.tag, c.lane_id, from), x.eid)
    end
    redis.call('ZADD', Keys.lane(x.tag, c.lane_id, 'blocked:dependencies'),
      c.created_at or Util.num(now), x.eid)
  end
  local outcome = redis.call('HMGET', Keys.exec(x.tag, up, 'core'), 'lifecycle_phase',
    'terminal_outcome')
  if outcome[1] == 'terminal' and Deps.OUTCOMES[outcome[2] or ''] then
    local _, effect = Deps.resolve_edge(x.tag, x.eid, edge, up, outcome[2], now)
    if effect == 'skipped' then
      Deps.upstream_done(x.tag, x.eid, fid, 'skipped', now)
    end
    n = tonumber(redis.call('HGET', mkey, 'unsatisfied_required_count') or '0') or 0
  end
  return Reply.ok(Util.num(n))
end

redis.register_function('ff_apply_dependency_to_child', apply_dependency_to_child)

-- ff_resolve_dependency (engine-internal: the dependency reconciler's single-edge path)
--   KEYS (1): 1 exec core (the downstream child).
--   ARGV (3): 1 execution_id (the child), 2 edge_id, 3 upstream_outcome (success, failed,
--     cancelled, expired or skipped: the upstream's terminal outcome, checked against its core).
--   Now: TIME.
--   Replies: {1,"OK","satisfied"|"impossible",effect}   effect: released | skipped | ""
--     | {1,"ALREADY_SATISFIED","already_resolved"} (first resolution wins).
--   Errors (in order): invalid_input (upstream_outcome unknown, or not the upstream's terminal
--     outcome), invalid_dependency (no such inbound edge).
--   Writes: as Deps.resolve_edge (docs/flows.md#resolution): dep state, last_resolved_at,
--     upstream_outcome; SREM deps:unresolved; deps:meta counters; a data-passing copy; the
--     child's release or skip (and the skip cascade, bounded).
local function resolve_dependency(keys, argv)
  local edge, outcome = argv[2], argv[3]
  if not Deps.OUTCOMES[outcome or ''] then
    return Reply.err('invalid_input', 'upstream_outcome must be success, failed, cancelled, '
      .. 'expired or skipped, got: ' .. tostring(outcome))
  end
  local tag, child = Util.tag_of(keys[1]), argv[1]
  State.load_exec(keys, argv)
  local dep = redis.call('HMGET', Keys.exec(tag, child, 'dep:' .. edge), 'state',
    'upstream_execution_id', 'flow_id')
  if not dep[1] then
    return Reply.err('invalid_dependency', 'no inbound edge ' .. edge .. ' on ' .. child)
  elseif dep[1] ~= 'unsatisfied' then
    return Reply.already('already_resolved')
  end
  local up = redis.call('HMGET', Keys.exec(tag, dep[2], 'core'), 'lifecycle_phase',
    'terminal_outcome')
  if up[1] and (up[1] ~= 'terminal' or up[2] ~= outcome) then
    return Reply.err('invalid_input', 'upstream ' .. dep[2] .. ' is not terminal with outcome '
      .. outcome)
  end
  local now = Util.now_ms()
  local result, effect = Deps.resolve_edge(tag, child, edge, dep[2], outcome, now)
  if effect == 'skipped' then
    Deps.upstream_done(tag, child, dep[3], 'skipped', now)
  end
  return Reply.ok(result, effect)
end

redis.register_function('ff_resolve_dependency', resolve_dependency)

-- ff_resolve_outgoing (dependency reconciler: finishes what a terminal call left past its bound)
--   KEYS (2): 1 exec core (the upstream), 2 deps_pending index.
--   ARGV (1): 1 execution_id.
--   Now: TIME.
--   Replies: {1,"OK",resolved,released,skipped,pending}
--     | {1,"ALREADY_SATISFIED",reason}: not_found | not_terminal | not_a_flow_member (the
--       entry is removed from deps_pending).
--   Errors: none.
--   Writes: as Deps.upstream_done (docs/flows.md#the-dependency-reconciler).
local function resolve_outgoing(keys, argv)
  local x = State.load_exec(keys, argv)
  local reason
  if not x then
    reason = 'not_found'
  elseif x.core.lifecycle_phase ~= 'terminal' or not Deps.OUTCOMES[x.core.terminal_outcome or ''] then
    reason = 'not_terminal'
  elseif not Util.is_set(x.core.flow_id) then
    reason = 'not_a_flow_member'
  end
  if reason then
    redis.call('ZREM', keys[2], argv[1])
    return Reply.already(reason)
  end
  local s = Deps.upstream_done(x.tag, x.eid, x.core.flow_id, x.core.terminal_outcome, Util.now_ms())
  return Reply.ok(Util.num(s.resolved), Util.num(s.released), Util.num(s.skipped),
    Util.num(s.pending))
end

redis.register_function('ff_resolve_outgoing', resolve_outgoing)

-- ff_promote_blocked_to_eligible
--   KEYS (1): 1 exec core.
--   ARGV (1): 1 execution_id.
--   Now: TIME.
--   Replies: {1,"OK"}
--   Errors (in order): execution_not_found, not_runnable, not_blocked_by_deps, terminal,
--     deps_not_satisfied (details: unsatisfied count, SCARD deps:unresolved; the child's join
--     does not release it).
--   Writes: the release of docs/flows.md#release-and-skip (eligible_now / waiting_for_worker,
--     attempt state kept or pending_first_attempt; blocked:dependencies -> eligible).
local function promote_blocked_to_eligible(keys, argv)
  local x = State.load_exec(keys, argv)
  if not x then
    return Reply.err('execution_not_found')
  end
  local c = x.core
  if c.lifecycle_phase ~= 'runnable' then
    return Reply.err('not_runnable')
  elseif c.eligibility_state ~= 'blocked_by_dependencies' then
    return Reply.err('not_blocked_by_deps')
  elseif (c.terminal_outcome or 'none') ~= 'none' then
    return Reply.err('terminal')
  end
  local d = Deps.counts(x.tag, x.eid)
  if Deps.verdict(d) ~= 'release' then
    return Reply.err('deps_not_satisfied', Util.num(d.u),
      Util.num(redis.call('SCARD', Keys.exec(x.tag, x.eid, 'deps:unresolved'))))
  end
  Deps.release(x.tag, x.eid, c, Util.now_ms())
  return Reply.ok()
end

redis.register_function('ff_promote_blocked_to_eligible', promote_blocked_to_eligible)

-- ff_evaluate_flow_eligibility (read-only)
--   KEYS (2): 1 exec core, 2 deps:meta.
--   ARGV (1): 1 execution_id.
--   Replies: {1,"OK",status}, first match: not_found, not_runnable, owned, terminal, eligible
--     (no deps:meta), impossible (the join can no longer be met), blocked_by_dependencies
--     (not met yet), eligible.
--   Errors: none. Writes: none.
local function evaluate_flow_eligibility(keys, argv)
  local c = redis.call('HMGET', keys[1], 'lifecycle_phase', 'ownership_state', 'terminal_outcome')
  local status
  if not c[1] then
    status = 'not_found'
  elseif c[1] ~= 'runnable' then
    status = 'not_runnable'
  elseif c[2] ~= 'unowned' then
    status = 'owned'
  elseif (c[3] or 'none') ~= 'none' then
    status = 'terminal'
  elseif redis.call('EXISTS', keys[2]) == 0 then
    status = 'eligible'
  else
    local v = Deps.verdict(Deps.counts(Util.tag_of(keys[1]), argv[1]))
    status = (v == 'skip' and 'impossible') or (v == 'wait' and 'blocked_by_dependencies')
      or 'eligible'
  end
  return Reply.ok(status)
end

redis.register_function {
  function_name = 'ff_evaluate_flow_eligibility',
  callback = evaluate_flow_eligibility,
  flags = {'no-writes'},
}

-- ff_cancel_flow
--   KEYS (4): 1 flow core, 2 members, 3 pending_cancels, 4 cancel_backlog.
--   ARGV (4): 1 flow_id, 2 reason, 3 cancellation_policy (free text; cancel_all cancels every
--     member, docs/flows.md#cancelling-a-flow), 4 grace_ms (when the cancel reconciler may
--     take the backlog over from the server dispatching it; 0..2^53-1).
--   Now: TIME.
--   Replies: {1,"OK",cancellation_policy,member_1,member_2,...}
--   Errors (in order): invalid_grace_ms, flow_not_found, flow_already_terminal (details:
--     state, stored cancellation_policy).
--   Writes: flow core public_flow_state=cancelled, cancelled_at, cancel_reason,
--     cancellation_policy, last_mutation_at, state_changed_at; SPUBLISH flow_changed on
--     ff:exec_events:{p}. cancel_all with members not
--     yet terminal: SADD pending_cancels those members, ZADD cancel_backlog now+grace_ms.
--     Members are cancelled by ff_cancel_flow_members.
local GRACE_MS_MAX = 9007199254740991

local function cancel_flow(keys, argv)
  local grace = Argv.is_int(argv[4]) and tonumber(argv[4])
  if not grace or grace < 0 or grace > GRACE_MS_MAX then
    return Reply.err('invalid_grace_ms', 'grace_ms must be an integer 0..' .. GRACE_MS_MAX
      .. ', got: ' .. tostring(argv[4]))
  end
  local f = load_flow(keys[1])
  if not f then
    return Reply.err('flow_not_found')
  elseif TERMINAL_FLOW[f.public_flow_state] then
    return Reply.err('flow_already_terminal', f.public_flow_state, f.cancellation_policy or '')
  end
  local tag, now = Util.tag_of(keys[1]), Util.now_ms()
  redis.call('HSET', keys[1], 'public_flow_state', 'cancelled', 'cancelled_at', Util.num(now),
    'cancel_reason', argv[2], 'cancellation_policy', argv[3], 'last_mutation_at', Util.num(now),
    'state_changed_at', Util.num(now))
  local reply, owed = Reply.ok(argv[3]), {}
  for _, m in ipairs(redis.call('SMEMBERS', keys[2])) do
    reply[#reply + 1] = m
    -- pcall: a corrupt member is owed a cancel too (its cancel then fails and is reported)
    if argv[3] == 'cancel_all'
        and redis.pcall('HGET', Keys.exec(tag, m, 'core'), 'lifecycle_phase') ~= 'terminal' then
      owed[#owed + 1] = m
      if #owed == 1000 then
        redis.call('SADD', keys[3], unpack(owed))
        owed = {}
      end
    end
  end
  if #owed > 0 then
    redis.call('SADD', keys[3], unpack(owed))
  end
  if redis.call('EXISTS', keys[3]) == 1 then
    redis.call('ZADD', keys[4], Util.num(now + grace), argv[1])
  end
  flow_changed(tag, argv[1], now)
  return reply
end

redis.register_function('ff_cancel_flow', cancel_flow)

-- ff_cancel_flow_members (CancelFlow's dispatch and the cancel reconciler)
--   KEYS (4): 1 flow core, 2 pending_cancels, 3 cancel_backlog, 4 cancel_attempts.
--   ARGV (1+n): 1 flow_id, 2.. member execution ids (at most CANCEL_BATCH).
--   Now: TIME.
--   Replies: {1,"OK",cancelled,already_done,remaining}: `cancelled` members were cancelled
--     now (operator override for a cancelled flow; flow_cascade for a fail_fast flow), the
--     `already_done` ones were already terminal, missing or no longer owed; `remaining` is
--     what is still owed.
--     | {1,"ALREADY_SATISFIED","flow_not_found"}: the flow is gone; the backlog is dropped.
--   Errors: invalid_input (no ids, too many).
--   Writes: per owed member the cancel of docs/lifecycle.md#cancel (a running member loses
--     its lease), SREM pending_cancels, HDEL cancel_attempts; once nothing is owed, ZREM
--     cancel_backlog and DEL cancel_attempts.
local function cancel_flow_members(keys, argv)
  if #argv < 2 or #argv - 1 > CANCEL_BATCH then
    return Reply.err('invalid_input', 'give 1..' .. CANCEL_BATCH .. ' member ids')
  end
  local fid, tag = argv[1], Util.tag_of(keys[1])
  local f = redis.call('HMGET', keys[1], 'public_flow_state', 'cancel_reason', 'halted_reason')
  if not f[1] then
    redis.call('DEL', keys[2], keys[4])
    redis.call('ZREM', keys[3], fid)
    return Reply.already('flow_not_found')
  end
  local source, reason = 'operator_override', f[2]
  if f[1] ~= 'cancelled' then
    source, reason = 'flow_cascade', f[3]
  end
  reason = (Util.is_set(reason) and reason) or 'flow_cancelled'
  local now, cancelled, done = Util.now_ms(), 0, 0
  for i = 2, #argv do
    local m = argv[i]
    if redis.call('SISMEMBER', keys[2], m) == 1 then
      if string.sub(m, 1, #tag + 1) == tag .. ':'
          and Cancel.member(tag, m, reason, source, now) == 'cancelled' then
        cancelled = cancelled + 1
      else
        done = done + 1
      end
      redis.call('SREM', keys[2], m)
      redis.call('HDEL', keys[4], m)
    else
      done = done + 1
    end
  end
  local remaining = redis.call('SCARD', keys[2])
  if remaining == 0 then
    redis.call('ZREM', keys[3], fid)
    redis.call('DEL', keys[4])
  end
  return Reply.ok(Util.num(cancelled), Util.num(done), Util.num(remaining))
end

redis.register_function('ff_cancel_flow_members', cancel_flow_members)

-- ff_cancel_member_failed (a member's cancel raised: bounded retries, docs/flows.md#cancelling-a-flow)
--   KEYS (4): 1 flow core, 2 pending_cancels, 3 cancel_backlog, 4 cancel_attempts.
--   ARGV (3): 1 flow_id, 2 execution_id, 3 max_attempts (1..100).
--   Now: TIME.
--   Replies: {1,"OK","retry",attempts} (still owed) | {1,"OK","gave_up",attempts} (dropped from
--     the backlog, logged to the Valkey log) | {1,"ALREADY_SATISFIED","not_owed"}.
--   Errors: invalid_input (max_attempts).
--   Writes: HINCRBY cancel_attempts; on giving up SREM pending_cancels, HDEL cancel_attempts,
--     and ZREM cancel_backlog once nothing is owed.
local CANCEL_FAILED_ARGV = {{3, 'max_attempts', 'int', min = 1, max = 100}}

local function cancel_member_failed(keys, argv)
  local a, e = Argv.parse(argv, CANCEL_FAILED_ARGV)
  if not a then
    return e
  end
  local fid, m = argv[1], argv[2]
  if redis.call('SISMEMBER', keys[2], m) == 0 then
    return Reply.already('not_owed')
  end
  local n = redis.call('HINCRBY', keys[4], m, 1)
  if n < a.max_attempts then
    return Reply.ok('retry', Util.num(n))
  end
  redis.call('SREM', keys[2], m)
  redis.call('HDEL', keys[4], m)
  if redis.call('SCARD', keys[2]) == 0 then
    redis.call('ZREM', keys[3], fid)
    redis.call('DEL', keys[4])
  end
  redis.log(redis.LOG_WARNING, 'flowfabric: gave up cancelling ' .. m .. ' of flow ' .. fid
    .. ' after ' .. n .. ' failed attempts')
  return Reply.ok('gave_up', Util.num(n))
end

redis.register_function('ff_cancel_member_failed', cancel_member_failed)

-- ff_set_flow_tags
--   KEYS (2): 1 flow core, 2 flow tags.
--   ARGV: k1, v1, k2, v2, ... (non-empty, even length).
--   Now: TIME.
--   Replies: {1,"OK","<pairs written>"}
--   Errors (in order): invalid_input (empty or odd ARGV), flow_not_found, invalid_tag_key
--     (detail = key; nothing written). Allowed on terminal flows.
--   Writes: tags (HSET), flow last_mutation_at.
local function set_flow_tags(keys, argv)
  if #argv == 0 or #argv % 2 == 1 then
    return Reply.err('invalid_input', 'tags must be non-empty even-length key/value pairs')
  end
  if redis.call('EXISTS', keys[1]) == 0 then
    return Reply.err('flow_not_found')
  end
  for i = 1, #argv, 2 do
    if not State.valid_tag_key(argv[i]) then
      return Reply.err('invalid_tag_key', argv[i])
    end
  end
  redis.call('HSET', keys[2], unpack(argv))
  redis.call('HSET', keys[1], 'last_mutation_at', Util.num(Util.now_ms()))
  return Reply.ok(tostring(#argv / 2))
end

redis.register_function('ff_set_flow_tags', set_flow_tags)

-- -------------------------------------------------------------------------------------------
-- ff_submit_flow: a whole DAG in one call (docs/flows.md#submitflow).
-- -------------------------------------------------------------------------------------------

-- Decodes and checks the members; returns (members, by_key) or nil plus the error reply.
local function submit_members(tag, list, argv)
  if type(list) ~= 'table' or #list == 0 or #list > MAX_MEMBERS then
    return nil, nil, Reply.err('invalid_input', 'members must be a JSON array of 1..'
      .. MAX_MEMBERS .. ' members')
  end
  local by_key, ids = {}, {}
  for i, m in ipairs(list) do
    if type(m) ~= 'table' or type(m.key) ~= 'string' or m.key == '' then
      return nil, nil, Reply.err('invalid_input', 'member ' .. i .. ': key must be a non-empty string')
    elseif by_key[m.key] then
      return nil, nil, Reply.err('invalid_input', 'member key ' .. m.key .. ' is given twice')
    elseif type(m.id) ~= 'string' or string.sub(m.id, 1, #tag + 1) ~= tag .. ':' then
      return nil, nil, Reply.err('invalid_input', 'member ' .. m.key
        .. ': execution id must be on the flow partition ' .. tag)
    elseif ids[m.id] then
      return nil, nil, Reply.err('invalid_input', 'execution id ' .. m.id .. ' is given twice')
    elseif redis.call('EXISTS', Keys.exec(tag, m.id, 'core')) == 1 then
      return nil, nil, Reply.err('invalid_input', 'execution ' .. m.id .. ' already exists')
    elseif type(m.lane) ~= 'string' or m.lane == '' or type(m.kind) ~= 'string' or m.kind == '' then
      return nil, nil, Reply.err('invalid_input', 'member ' .. m.key .. ': lane and kind are required')
    elseif type(m.priority) ~= 'number' then
      return nil, nil, Reply.err('invalid_input', 'member ' .. m.key .. ': priority must be a number')
    elseif m.quota ~= nil and type(m.quota) ~= 'string' then
      return nil, nil, Reply.err('invalid_input', 'member ' .. m.key .. ': quota must be a string')
    elseif Create.check_concurrency_key(m.concurrency_key, m.quota, 'member ' .. m.key .. ': ') then
      return nil, nil, Create.check_concurrency_key(m.concurrency_key, m.quota,
        'member ' .. m.key .. ': ')
    elseif Create.check_trace_context(m.trace_context, 'member ' .. m.key .. ': ') then
      return nil, nil, Create.check_trace_context(m.trace_context, 'member ' .. m.key .. ': ')
    elseif argv[7 + i] == nil then
      return nil, nil, Reply.err('invalid_input', 'member ' .. m.key .. ': no input payload')
    end
    local policy, caps, perr = Create.parse_policy(m.policy or '')
    if policy == nil then
      return nil, nil, perr
    end
    local tags, terr = Create.parse_tags(m.tags or {})
    if not tags then
      return nil, nil, terr
    end
    m.policy_table, m.caps, m.tag_table, m.payload, m.indegree = policy, caps, tags, argv[7 + i], 0
    by_key[m.key], ids[m.id] = m, true
  end
  return list, by_key
end

-- Decodes and checks the edges against the members; returns the edges (endpoints resolved to
-- execution ids) or nil plus the error reply.
local function submit_edges(list, by_key)
  if type(list) ~= 'table' or #list > MAX_EDGES then
    return nil, Reply.err('invalid_input', 'edges must be a JSON array of at most ' .. MAX_EDGES)
  end
  local out, ids, pairs_seen = {}, {}, {}
  for i, e in ipairs(list) do
    if type(e) ~= 'table' or type(e.id) ~= 'string' or e.id == '' or ids[e.id] then
      return nil, Reply.err('invalid_input', 'edge ' .. i .. ': id must be a unique non-empty string')
    end
    local up, down = by_key[e.up], by_key[e.down]
    if not up or not down then
      return nil, Reply.err('invalid_dependency', 'edge ' .. e.id .. ' names an unknown member')
    elseif up == down then
      return nil, Reply.err('self_referencing_edge', e.up)
    end
    local kind, kerr = edge_kind(e.kind, e.ref)
    if not kind then
      return nil, kerr
    end
    local pair = e.up .. '\0' .. e.down
    if pairs_seen[pair] then
      return nil, Reply.err('invalid_dependency', 'edge ' .. e.up .. ' -> ' .. e.down
        .. ' is given twice')
    end
    pairs_seen[pair], ids[e.id] = true, true
    down.indegree = down.indegree + 1
    out[i] = {id = e.id, up = up.id, down = down.id, up_key = e.up, down_key = e.down,
      kind = kind, ref = (type(e.ref) == 'string' and e.ref) or ''}
  end
  return out
end

-- Kahn's algorithm over the submitted graph. Returns (on_cycle, depth, deepest): the key of a
-- member on a cycle (or nil), each member's longest chain of edges above it by key, and the
-- longest chain of edges in the graph.
local function cycle_member(members, edges)
  local indeg, outs, depth = {}, {}, {}
  for _, m in ipairs(members) do
    indeg[m.key], outs[m.key], depth[m.key] = m.indegree, {}, 0
  end
  for _, e in ipairs(edges) do
    table.insert(outs[e.up_key], e.down_key)
  end
  local queue, head, deepest = {}, 1, 0
  for _, m in ipairs(members) do
    if indeg[m.key] == 0 then
      queue[#queue + 1] = m.key
    end
  end
  while head <= #queue do
    local u = queue[head]
    deepest = math.max(deepest, depth[u])
    for _, d in ipairs(outs[u]) do
      depth[d] = math.max(depth[d], depth[u] + 1)
      indeg[d] = indeg[d] - 1
      if indeg[d] == 0 then
        queue[#queue + 1] = d
      end
    end
    head = head + 1
  end
  if #queue == #members then
    return nil, depth, deepest
  end
  for _, m in ipairs(members) do
    if indeg[m.key] > 0 then
      return m.key, depth, deepest
    end
  end
end

-- The flow bounds of a submitted graph (docs/flows.md#limits), or nil.
local function submit_limits(members, edges, deepest)
  local max_edges, outdeg = Bounds.FLOW_EDGES_PER_MEMBER_MAX, {}
  for _, e in ipairs(edges) do
    outdeg[e.up_key] = (outdeg[e.up_key] or 0) + 1
    if outdeg[e.up_key] > max_edges then
      return limit_err('FLOW_EDGES_PER_MEMBER_MAX', e.up_key .. ' has more than ' .. max_edges
        .. ' outbound edges')
    end
  end
  for _, m in ipairs(members) do
    if m.indegree > max_edges then
      return limit_err('FLOW_EDGES_PER_MEMBER_MAX', m.key .. ' has more than ' .. max_edges
        .. ' inbound edges')
    end
  end
  if deepest + 1 > Bounds.FLOW_DEPTH_MAX then
    return limit_err('FLOW_DEPTH_MAX', 'the graph has a chain of ' .. (deepest + 1) .. ' members')
  end
  return nil
end

-- ff_submit_flow
--   KEYS (3): 1 flow core, 2 members, 3 flow_index.
--   ARGV (7+n): 1 flow_id, 2 flow_kind (non-empty), 3 namespace (non-empty), 4 partition_id,
--     5 members_json: [{key, id (execution id on the flow's tag), lane, kind, priority,
--     creator, policy (policy JSON text, "" = none), encoding, tags {k: v}, join (all | any |
--     quorum), quorum (k), expected_edges (0 or its inbound edge count), trace_context
--     ("" = none; stored as ff_create_execution's ARGV 18: docs/observability.md#traces)}]
--     (1..1000),
--     6 edges_json: [{id, up, down (member keys), kind (success | completion), ref
--     (data_passing_ref)}] (0..5000), 7 failure_policy ("" = skip_dependents; fail_fast,
--     continue), 8.. one input payload per member, in member order.
--   Now: TIME.
--   Replies: {1,"OK",flow_id,graph_revision,key_1,execution_id_1,public_state_1,...}
--     | {1,"ALREADY_SATISFIED",flow_id,graph_revision,key_1,execution_id_1,...}: the flow
--       exists; nothing written (the pairs are the members the submit that created it named).
--   Errors (in order; nothing written on any): invalid_input (flow_kind, namespace,
--     partition_id, failure_policy, malformed JSON, member count, member fields, an execution
--     id off the flow's tag, repeated or existing, a missing payload, edge count or ids),
--     invalid_policy_json, invalid_capabilities, invalid_tag_key, invalid_dependency (unknown
--     member, kind, data_passing_ref on a completion edge, a repeated pair, a join: unknown, k
--     outside 1..inbound edges, any/quorum without inbound edges, k without quorum),
--     self_referencing_edge (detail = key), cycle_detected (detail = a member key on it),
--     flow_limit_exceeded (details: bound, max, what: edges of one member, the longest chain).
--   Writes: flow core (revision = members + edges, counts, member counters, state), SADD
--     flow_index, members; ff:flow:{p}:<fid>:refs (key -> execution id); each member as
--     ff_create_execution writes it with flow_id set (no idempotency key), members with
--     inbound edges blocked_by_dependencies in blocked:dependencies, the others eligible; per
--     edge the flow edge hash, out/in sets and the child's dep hash, deps:unresolved,
--     deps:all_edges; per child deps:meta (total and unsatisfied counts, join); the depth
--     hash (each member's longest chain of edges above it, when > 0).
local SUBMIT_ARGV = {{2, 'flow_kind', 'str'}, {3, 'namespace', 'str'}, {4, 'partition_id', 'int'}}

local function submit_flow(keys, argv)
  local a, e = Argv.parse(argv, SUBMIT_ARGV)
  if not a then
    return e
  end
  local policy, perr = failure_policy(argv[7])
  if not policy then
    return perr
  end
  local fid, tag = argv[1], Util.tag_of(keys[1])
  if redis.call('EXISTS', keys[1]) == 1 then
    local reply = Reply.already(fid, redis.call('HGET', keys[1], 'graph_revision') or '0')
    for _, v in ipairs(redis.call('HGETALL', flow_key(tag, fid, 'refs'))) do
      reply[#reply + 1] = v
    end
    return reply
  end
  local mlist, elist = Util.decode_json(argv[5]), Util.decode_json(argv[6])
  if mlist == nil or elist == nil then
    return Reply.err('invalid_input', 'members_json and edges_json must be JSON arrays')
  end
  local members, by_key, merr = submit_members(tag, mlist, argv)
  if not members then
    return merr
  end
  local edges, eerr = submit_edges(elist, by_key)
  if not edges then
    return eerr
  end
  for _, m in ipairs(members) do
    local join, k, expect, jerr = join_of(m.join, m.quorum, m.expected_edges, m.indegree, m.key)
    if not join then
      return jerr
    end
    m.join_kind, m.join_k, m.join_edges = join, k, expect
  end
  local on_cycle, depth, deepest = cycle_member(members, edges)
  if on_cycle then
    return Reply.err('cycle_detected', on_cycle)
  end
  local lerr = submit_limits(members, edges, deepest)
  if lerr then
    return lerr
  end

  local now = Util.now_ms()
  local rev = #members + #edges
  local f = new_flow_fields(fid, argv[2], argv[3], policy, now)
  redis.call('HSET', keys[1], unpack(f))
  redis.call('HSET', keys[1], 'graph_revision', Util.num(rev), 'node_count', Util.num(#members),
    'edge_count', Util.num(#edges))
  redis.call('SADD', keys[3], fid)
  local reply, refs, ready = Reply.ok(fid, Util.num(rev)), {}, {}
  for _, m in ipairs(members) do
    local public = Create.write(tag, {eid = m.id, namespace = argv[3], lane = m.lane,
      kind = m.kind, priority = m.priority, creator = m.creator or '', policy = m.policy_table,
      policy_json = m.policy or '', caps_csv = m.caps, payload = m.payload,
      encoding = m.encoding or '', tags = m.tag_table, delay_until = false, deadline = false,
      partition = a.partition_id, quota_policy_id = m.quota or '',
      concurrency_key = m.concurrency_key or '', trace_context = m.trace_context or '',
      flow_id = fid, blocked = m.indegree > 0, quiet = true}, now)
    if m.indegree == 0 and not ready[m.lane] then
      ready[m.lane] = true
      State.ready(tag, m.lane)
    end
    redis.call('SADD', keys[2], m.id)
    redis.call('HINCRBY', keys[1], 'members_' .. public, 1)
    refs[#refs + 1], refs[#refs + 2] = m.key, m.id
    reply[#reply + 1], reply[#reply + 2], reply[#reply + 3] = m.key, m.id, public
    if m.indegree > 0 then
      redis.call('HSET', Keys.exec(tag, m.id, 'deps:meta'), 'flow_id', fid,
        'total_count', Util.num(m.indegree), 'unsatisfied_required_count', Util.num(m.indegree),
        'satisfied_count', '0', 'impossible_required_count', '0', 'join_kind', m.join_kind,
        'join_quorum', m.join_k, 'join_edges', m.join_edges, 'last_flow_graph_revision', Util.num(rev),
        'last_dependency_update_at', Util.num(now))
    end
  end
  redis.call('HSET', flow_key(tag, fid, 'refs'), unpack(refs))
  local depths = {}
  for _, m in ipairs(members) do
    if depth[m.key] > 0 then
      depths[#depths + 1], depths[#depths + 2] = m.id, Util.num(depth[m.key])
    end
  end
  if #depths > 0 then
    redis.call('HSET', flow_key(tag, fid, 'depth'), unpack(depths))
  end
  for _, ed in ipairs(edges) do
    write_edge(tag, fid, ed, now)
    write_dep(tag, fid, ed, now)
  end
  FlowState.refresh(keys[1], now)
  return reply
end

redis.register_function('ff_submit_flow', submit_flow)

-- -------------------------------------------------------------------------------------------
-- Scanners' functions (docs/flows.md#scanners) and ff_replay_flow.
-- -------------------------------------------------------------------------------------------

-- Unresolved edges one ff_reconcile_dependencies call looks at.
local RECONCILE_EDGES = 64

-- ff_reconcile_dependencies (dependency reconciler, over each lane's blocked:dependencies)
--   KEYS (1): 1 exec core (a member waiting for its dependencies).
--   ARGV (2): 1 execution_id, 2 min_age_ms (a member with no edges at all is released only once
--     it has waited this long: its builder may still be adding them).
--   Now: TIME.
--   Replies: {1,"OK",resolved,effect}: `resolved` edges whose upstream had ended were resolved
--     now; effect released | skipped | "" (still waiting)
--     | {1,"ALREADY_SATISFIED","not_blocked"} (not runnable and waiting for dependencies).
--   Errors: invalid_input (min_age_ms).
--   Writes: as Deps.resolve_edge per resolved edge (with the skip cascade, bounded); the release
--     or skip of docs/flows.md#release-and-skip when the join is decided.
local RECONCILE_ARGV = {{2, 'min_age_ms', 'int', min = 0, max = 86400000}}

local function reconcile_dependencies(keys, argv)
  local a, e = Argv.parse(argv, RECONCILE_ARGV)
  if not a then
    return e
  end
  local x = State.load_exec(keys, argv)
  if not x or x.core.lifecycle_phase ~= 'runnable'
      or x.core.eligibility_state ~= 'blocked_by_dependencies' then
    return Reply.already('not_blocked')
  end
  local tag, eid, now, resolved = x.tag, x.eid, Util.now_ms(), 0
  local unresolved = redis.call('SMEMBERS', Keys.exec(tag, eid, 'deps:unresolved'))
  table.sort(unresolved)
  for i = 1, math.min(#unresolved, RECONCILE_EDGES) do
    local edge = unresolved[i]
    local up = redis.call('HGET', Keys.exec(tag, eid, 'dep:' .. edge), 'upstream_execution_id')
    local o = up and redis.call('HMGET', Keys.exec(tag, up, 'core'), 'lifecycle_phase',
      'terminal_outcome')
    if o and o[1] == 'terminal' and Deps.OUTCOMES[o[2] or ''] then
      local r, effect = Deps.resolve_edge(tag, eid, edge, up, o[2], now)
      if r == 'satisfied' or r == 'impossible' then
        resolved = resolved + 1
      end
      if effect ~= '' then
        if effect == 'skipped' then
          Deps.upstream_done(tag, eid, x.core.flow_id, 'skipped', now)
        end
        return Reply.ok(Util.num(resolved), effect)
      end
    end
  end
  local d = Deps.counts(tag, eid)
  local v = Deps.verdict(d)
  local waited = now - (tonumber(x.core.last_transition_at or '0') or 0)
  if v == 'release' and (d.n > 0 or waited >= a.min_age_ms) then
    Deps.release(tag, eid, x.core, now)
    return Reply.ok(Util.num(resolved), 'released')
  elseif v == 'skip' then
    Deps.skip(tag, eid, x.core, {edge = '', upstream = '', outcome = 'reconciled'}, now)
    Deps.upstream_done(tag, eid, x.core.flow_id, 'skipped', now)
    return Reply.ok(Util.num(resolved), 'skipped')
  end
  return Reply.ok(Util.num(resolved), '')
end

redis.register_function('ff_reconcile_dependencies', reconcile_dependencies)

-- ff_project_flow (flow projector: a backstop that repairs, docs/flows.md#the-flow-projector)
--   KEYS (3): 1 flow core, 2 members, 3 flow_index.
--   ARGV (1): 1 flow_id.
--   Now: TIME.
--   Replies: {1,"OK",state,repaired}: every member's public state counted (never a sample);
--     repaired = "1" when a stored counter differed and was rewritten
--     | {1,"ALREADY_SATISFIED","flow_not_found"} (SREM flow_index).
--   Errors: none.
--   Writes: the members_<state> counters that differ, public_flow_state (re-derived); SREM
--     flow_index once the flow is completed, failed or cancelled with every member ended (a
--     replay or a new member indexes it again).
local function project_flow(keys, argv)
  local fid, tag = argv[1], Util.tag_of(keys[1])
  if redis.call('EXISTS', keys[1]) == 0 then
    redis.call('SREM', keys[3], fid)
    return Reply.already('flow_not_found')
  end
  local counts = {}
  for _, s in ipairs(FlowState.MEMBER_STATES) do
    counts[s] = 0
  end
  local members = redis.call('SMEMBERS', keys[2])
  for _, m in ipairs(members) do
    local s = redis.call('HGET', Keys.exec(tag, m, 'core'), 'public_state')
    if s and counts[s] then
      counts[s] = counts[s] + 1
    end
  end
  local fields = {'node_count'}
  for _, s in ipairs(FlowState.MEMBER_STATES) do
    fields[#fields + 1] = 'members_' .. s
  end
  local stored, fix = redis.call('HMGET', keys[1], unpack(fields)), {}
  if tonumber(stored[1] or '') ~= #members then
    fix[#fix + 1], fix[#fix + 2] = 'node_count', Util.num(#members)
  end
  for i, s in ipairs(FlowState.MEMBER_STATES) do
    if tonumber(stored[i + 1] or '') ~= counts[s] then
      fix[#fix + 1], fix[#fix + 2] = 'members_' .. s, Util.num(counts[s])
    end
  end
  local now = Util.now_ms()
  if #fix > 0 then
    redis.call('HSET', keys[1], unpack(fix))
    redis.log(redis.LOG_WARNING, 'flowfabric: flow projector repaired ' .. (#fix / 2)
      .. ' counter(s) of flow ' .. fid)
  end
  local state = FlowState.refresh(keys[1], now)
  local ended = 0
  for _, s in ipairs({'completed', 'failed', 'cancelled', 'expired', 'skipped'}) do
    ended = ended + counts[s]
  end
  if TERMINAL_FLOW[state] and ended == #members then
    redis.call('SREM', keys[3], fid)
  end
  return Reply.ok(state, (#fix > 0 and '1') or '0')
end

redis.register_function('ff_project_flow', project_flow)

-- The members a flow replay re-runs: failed, expired, cancelled or skipped.
local RERUN = {failed = true, expired = true, cancelled = true, skipped = true}

-- Reopens the inbound edges of member `m` whose upstream is re-run, recounts its join and,
-- for a re-run member, passes the results of its satisfied data-passing edges again. Returns
-- (edges reopened, unsatisfied edges now).
local function reopen_inbound(tag, fid, m, rerun, again, now)
  local reopened, s, u, n = 0, 0, 0, 0
  local unresolved = Keys.exec(tag, m, 'deps:unresolved')
  for _, edge in ipairs(redis.call('SMEMBERS', flow_key(tag, fid, 'in:' .. m))) do
    local dkey = Keys.exec(tag, m, 'dep:' .. edge)
    local dep = redis.call('HMGET', dkey, 'state', 'upstream_execution_id', 'data_passing_ref')
    if dep[1] then
      n = n + 1
      if rerun[dep[2]] then
        if dep[1] ~= 'unsatisfied' then
          redis.call('HSET', dkey, 'state', 'unsatisfied', 'last_resolved_at', '',
            'upstream_outcome', '')
          reopened = reopened + 1
        end
        redis.call('SADD', unresolved, edge)
        u = u + 1
      elseif dep[1] == 'satisfied' then
        s = s + 1
        if again and Util.is_set(dep[3]) then
          redis.call('COPY', Keys.exec(tag, dep[2], 'result'), Keys.exec(tag, m, 'payload'),
            'REPLACE')
        end
      elseif dep[1] == 'unsatisfied' then
        u = u + 1
      end
    end
  end
  redis.call('HSET', Keys.exec(tag, m, 'deps:meta'), 'satisfied_count', Util.num(s),
    'unsatisfied_required_count', Util.num(u), 'impossible_required_count', '0',
    'last_dependency_update_at', Util.num(now))
  return reopened, u
end

-- ff_replay_flow (docs/flows.md#replaying-a-flow)
--   KEYS (5): 1 flow core, 2 members, 3 flow_index, 4 pending_cancels, 5 cancel_backlog.
--   ARGV (2): 1 flow_id, 2 reason ("" = none; recorded on each member's replay_initiated).
--   Now: TIME.
--   Replies: {1,"OK",public_flow_state,reopened_edges,execution_id_1,...} (the re-run members)
--     | {1,"ALREADY_SATISFIED","nothing_to_replay",public_flow_state}: nothing changed.
--   Errors (in order): flow_not_found, max_replays_exhausted (detail = the member; nothing
--     replayed).
--   Writes: each re-run member as ff_replay_execution (eligible, or waiting_children until its
--     re-run upstreams decide it again); every inbound edge from a re-run member, of a re-run
--     member or of a live one, back to unsatisfied, its join recounted; data-passing copies from
--     completed upstreams again; flow core cancel and fail_fast fields cleared, state
--     re-derived; DEL pending_cancels, cancel_attempts, failures; ZREM cancel_backlog; SADD
--     flow_index; SPUBLISH flow_changed on ff:exec_events:{p}.
local function replay_flow(keys, argv)
  local fid, tag = argv[1], Util.tag_of(keys[1])
  local f = load_flow(keys[1])
  if not f then
    return Reply.err('flow_not_found')
  end
  local members = redis.call('SMEMBERS', keys[2])
  table.sort(members)
  local rerun, list, live = {}, {}, {}
  for _, m in ipairs(members) do
    local x = {tag = tag, eid = m, core_key = Keys.exec(tag, m, 'core')}
    x.core = Util.hgetall(x.core_key)
    if x.core.lifecycle_phase == 'terminal' and RERUN[x.core.terminal_outcome or ''] then
      if Replay.refused(x) then
        return Reply.err('max_replays_exhausted', m)
      end
      rerun[m] = true
      list[#list + 1] = x
    elseif next(x.core) ~= nil and x.core.lifecycle_phase ~= 'terminal' then
      live[#live + 1] = m
    end
  end
  if #list == 0 then
    return Reply.already('nothing_to_replay', f.public_flow_state or 'open')
  end
  local now = Util.now_ms()
  redis.call('HDEL', keys[1], 'cancelled_at', 'cancel_reason', 'cancellation_policy',
    'halted_at', 'halted_by', 'halted_reason')
  if f.public_flow_state == 'cancelled' then
    redis.call('HSET', keys[1], 'public_flow_state', 'open')
  end
  redis.call('DEL', keys[4], flow_key(tag, fid, 'cancel_attempts'), flow_key(tag, fid, 'failures'))
  redis.call('ZREM', keys[5], fid)
  redis.call('SADD', keys[3], fid)
  local reply, reopened = {}, 0
  for _, m in ipairs(live) do
    reopened = reopened + reopen_inbound(tag, fid, m, rerun, false, now)
  end
  for _, x in ipairs(list) do
    local r, u = reopen_inbound(tag, fid, x.eid, rerun, true, now)
    reopened = reopened + r
    local d = Deps.counts(tag, x.eid)
    local waits = d.n > 0 and Deps.verdict(d) ~= 'release'
    Replay.reset(x, (waits and math.max(u, 1)) or 0, 'flow_replay', now, argv[2])
    reply[#reply + 1] = x.eid
  end
  redis.call('HSET', keys[1], 'last_mutation_at', Util.num(now))
  local state = FlowState.refresh(keys[1], now)
  flow_changed(tag, fid, now)
  local out = Reply.ok(state, Util.num(reopened))
  for _, m in ipairs(reply) do
    out[#out + 1] = m
  end
  return out
end

redis.register_function('ff_replay_flow', replay_flow)
