-- flow.lua: flows, dependency edges and their resolution (docs/flows.md).
--
-- Every flow key and every member key share the flow's partition tag {fp:N}, so one call may
-- touch the flow and all its members (docs/flows.md#keys). Keys other than KEYS[1..n] are built
-- from the tag of KEYS[1] (docs/architecture.md#keys-built-inside-lua).
--
-- uses: reply, util, argv, keys, flowstate, state, deps, create

local TERMINAL_FLOW = {cancelled = true, completed = true, failed = true}
local JOINS = {all = true, any = true, quorum = true}
local FAILURE_POLICIES = {skip_dependents = true}
-- Edge kinds (docs/flows.md#joins-and-edge-kinds); success_only is the reference's name.
local EDGE_KINDS = {[''] = 'success', success = 'success', success_only = 'success',
  completion = 'completion'}
local SATISFACTION = {success = 'upstream_success', completion = 'upstream_terminal'}
local CYCLE_WALK_MAX = 1000
local MAX_MEMBERS = 1000
local MAX_EDGES = 5000

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

-- A join spec: (kind, k) or nil plus invalid_dependency. `indegree` (when known) bounds k.
local function join_of(kind, quorum, indegree, who)
  kind = (Util.is_set(kind) and kind) or 'all'
  if not JOINS[kind] then
    return nil, nil, Reply.err('invalid_dependency', who .. ': unknown join ' .. tostring(kind)
      .. ' (all, any or quorum)')
  end
  local k = ''
  if kind == 'quorum' then
    local n = tonumber(quorum)
    if not n or n ~= math.floor(n) or n < 1 then
      return nil, nil, Reply.err('invalid_dependency', who .. ': a quorum join needs k >= 1')
    end
    if indegree and n > indegree then
      return nil, nil, Reply.err('invalid_dependency', who .. ': quorum k=' .. n
        .. ' exceeds its ' .. indegree .. ' inbound edge(s)')
    end
    k = Util.num(n)
  elseif Util.is_set(quorum) and tostring(quorum) ~= '0' then
    return nil, nil, Reply.err('invalid_dependency', who .. ': k is only for a quorum join')
  end
  if indegree == 0 and kind ~= 'all' then
    return nil, nil, Reply.err('invalid_dependency', who .. ': a ' .. kind
      .. ' join needs inbound edges')
  end
  return kind, k, nil
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
    return nil, Reply.err('invalid_input', 'failure_policy must be skip_dependents, got: ' .. p)
  end
  return p, nil
end

-- ff_create_flow
--   KEYS (2): 1 flow core, 2 flow_index.
--   ARGV (4): 1 flow_id, 2 flow_kind (non-empty), 3 namespace (non-empty), 4 failure_policy
--     ("" = skip_dependents, the only policy today).
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
--     detail = state), execution_not_found, execution_already_in_flow (detail = the other flow).
--   Writes: SADD members, flow_index; core flow_id; flow node_count+1, graph_revision+1,
--     last_mutation_at, members_<public_state>+1 and public_flow_state.
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
  local c = redis.call('HMGET', keys[4], 'flow_id', 'public_state')
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
  local now = Util.now_ms()
  redis.call('SADD', keys[2], eid)
  redis.call('HSET', keys[4], 'flow_id', fid)
  local n = redis.call('HINCRBY', keys[1], 'node_count', 1)
  redis.call('HINCRBY', keys[1], 'graph_revision', 1)
  redis.call('HSET', keys[1], 'last_mutation_at', Util.num(now))
  FlowState.moved(tag, fid, eid, nil, c[2], nil, now)
  return Reply.ok(eid, Util.num(n))
end

redis.register_function('ff_add_execution_to_flow', add_execution_to_flow)

-- Breadth-first walk from `from` over existing out-edges; true when it reaches `target`, or
-- when it visits more than CYCLE_WALK_MAX nodes (too large to verify: refused as a cycle).
local function reaches(tag, fid, from, target)
  local seen, queue, head, visited = {[from] = true}, {from}, 1, 0
  while head <= #queue do
    local node = queue[head]
    head = head + 1
    visited = visited + 1
    if visited > CYCLE_WALK_MAX then
      return true
    end
    for _, edge in ipairs(redis.call('SMEMBERS', flow_key(tag, fid, 'out:' .. node))) do
      local down = redis.call('HGET', flow_key(tag, fid, 'edge:' .. edge), 'downstream_execution_id')
      if down == target then
        return true
      elseif down and not seen[down] then
        seen[down] = true
        queue[#queue + 1] = down
      end
    end
  end
  return false
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
--     passes 1000 nodes), dependency_already_exists.
--   Writes: flow edge hash (immutable; edge_state pending), SADD out:<U>, in:<D>;
--     graph_revision+1, edge_count+1, last_mutation_at.
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
  if reaches(tag, fid, down, up) then
    return Reply.err('cycle_detected', up .. ' is reachable from ' .. down)
  end
  if redis.call('EXISTS', flow_key(tag, fid, 'edge:' .. edge)) == 1 then
    return Reply.err('dependency_already_exists', edge)
  end
  local now = Util.now_ms()
  write_edge(tag, fid, {id = edge, up = up, down = down, kind = kind, ref = argv[6]}, now)
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
--   ARGV (5): 1 execution_id (the child), 2 flow_id, 3 edge_id (staged on this flow with this
--     downstream), 4 join_kind ("" = keep the child's join, all by default; all | any |
--     quorum), 5 join_quorum (k of a quorum join; "" otherwise).
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
  local stored = redis.call('HMGET', mkey, 'join_kind', 'join_quorum')
  local join, k, jerr = join_of(argv[4], argv[5], nil, x.eid)
  if not join then
    return jerr
  end
  if Util.is_set(stored[1]) and Util.is_set(argv[4])
      and (stored[1] ~= join or (stored[2] or '') ~= k) then
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
    for _, v in ipairs({'join_kind', join, 'join_quorum', k}) do
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
    redis.call('ZREM', Keys.lane(x.tag, c.lane_id, from), x.eid)
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
--   KEYS (2): 1 flow core, 2 members.
--   ARGV (3): 1 flow_id, 2 reason, 3 cancellation_policy (free text; cancel_all asks the server
--     to cancel every member, docs/flows.md#cancelling-a-flow).
--   Now: TIME.
--   Replies: {1,"OK",cancellation_policy,member_1,member_2,...}
--   Errors (in order): flow_not_found, flow_already_terminal (details: state, stored
--     cancellation_policy).
--   Writes: flow core public_flow_state=cancelled, cancelled_at, cancel_reason,
--     cancellation_policy, last_mutation_at. Members are not touched here.
local function cancel_flow(keys, argv)
  local f = load_flow(keys[1])
  if not f then
    return Reply.err('flow_not_found')
  elseif TERMINAL_FLOW[f.public_flow_state] then
    return Reply.err('flow_already_terminal', f.public_flow_state, f.cancellation_policy or '')
  end
  local now = Util.num(Util.now_ms())
  redis.call('HSET', keys[1], 'public_flow_state', 'cancelled', 'cancelled_at', now,
    'cancel_reason', argv[2], 'cancellation_policy', argv[3], 'last_mutation_at', now,
    'state_changed_at', now)
  local reply = Reply.ok(argv[3])
  for _, m in ipairs(redis.call('SMEMBERS', keys[2])) do
    reply[#reply + 1] = m
  end
  return reply
end

redis.register_function('ff_cancel_flow', cancel_flow)

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

-- Kahn's algorithm over the submitted graph: the key of a member on a cycle, or nil.
local function cycle_member(members, edges)
  local indeg, outs = {}, {}
  for _, m in ipairs(members) do
    indeg[m.key], outs[m.key] = m.indegree, {}
  end
  for _, e in ipairs(edges) do
    table.insert(outs[e.up_key], e.down_key)
  end
  local queue, head = {}, 1
  for _, m in ipairs(members) do
    if indeg[m.key] == 0 then
      queue[#queue + 1] = m.key
    end
  end
  while head <= #queue do
    for _, d in ipairs(outs[queue[head]]) do
      indeg[d] = indeg[d] - 1
      if indeg[d] == 0 then
        queue[#queue + 1] = d
      end
    end
    head = head + 1
  end
  if #queue == #members then
    return nil
  end
  for _, m in ipairs(members) do
    if indeg[m.key] > 0 then
      return m.key
    end
  end
end

-- ff_submit_flow
--   KEYS (3): 1 flow core, 2 members, 3 flow_index.
--   ARGV (7+n): 1 flow_id, 2 flow_kind (non-empty), 3 namespace (non-empty), 4 partition_id,
--     5 members_json: [{key, id (execution id on the flow's tag), lane, kind, priority,
--     creator, policy (policy JSON text, "" = none), encoding, tags {k: v}, join (all | any |
--     quorum), quorum (k)}] (1..1000), 6 edges_json: [{id, up, down (member keys), kind
--     (success | completion), ref (data_passing_ref)}] (0..5000), 7 failure_policy
--     ("" = skip_dependents), 8.. one input payload per member, in member order.
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
--     self_referencing_edge (detail = key), cycle_detected (detail = a member key on it).
--   Writes: flow core (revision = members + edges, counts, member counters, state), SADD
--     flow_index, members; ff:flow:{p}:<fid>:refs (key -> execution id); each member as
--     ff_create_execution writes it with flow_id set (no idempotency key), members with
--     inbound edges blocked_by_dependencies in blocked:dependencies, the others eligible; per
--     edge the flow edge hash, out/in sets and the child's dep hash, deps:unresolved,
--     deps:all_edges; per child deps:meta (total and unsatisfied counts, join).
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
    local join, k, jerr = join_of(m.join, m.quorum, m.indegree, m.key)
    if not join then
      return jerr
    end
    m.join_kind, m.join_k = join, k
  end
  local on_cycle = cycle_member(members, edges)
  if on_cycle then
    return Reply.err('cycle_detected', on_cycle)
  end

  local now = Util.now_ms()
  local rev = #members + #edges
  local f = new_flow_fields(fid, argv[2], argv[3], policy, now)
  redis.call('HSET', keys[1], unpack(f))
  redis.call('HSET', keys[1], 'graph_revision', Util.num(rev), 'node_count', Util.num(#members),
    'edge_count', Util.num(#edges))
  redis.call('SADD', keys[3], fid)
  local reply, refs = Reply.ok(fid, Util.num(rev)), {}
  for _, m in ipairs(members) do
    local public = Create.write(tag, {eid = m.id, namespace = argv[3], lane = m.lane,
      kind = m.kind, priority = m.priority, creator = m.creator or '', policy = m.policy_table,
      policy_json = m.policy or '', caps_csv = m.caps, payload = m.payload,
      encoding = m.encoding or '', tags = m.tag_table, delay_until = false, deadline = false,
      partition = a.partition_id, quota_policy_id = '', flow_id = fid,
      blocked = m.indegree > 0}, now)
    redis.call('SADD', keys[2], m.id)
    redis.call('HINCRBY', keys[1], 'members_' .. public, 1)
    refs[#refs + 1], refs[#refs + 2] = m.key, m.id
    reply[#reply + 1], reply[#reply + 2], reply[#reply + 3] = m.key, m.id, public
    if m.indegree > 0 then
      redis.call('HSET', Keys.exec(tag, m.id, 'deps:meta'), 'flow_id', fid,
        'total_count', Util.num(m.indegree), 'unsatisfied_required_count', Util.num(m.indegree),
        'satisfied_count', '0', 'impossible_required_count', '0', 'join_kind', m.join_kind,
        'join_quorum', m.join_k, 'last_flow_graph_revision', Util.num(rev),
        'last_dependency_update_at', Util.num(now))
    end
  end
  redis.call('HSET', flow_key(tag, fid, 'refs'), unpack(refs))
  for _, ed in ipairs(edges) do
    write_edge(tag, fid, ed, now)
    write_dep(tag, fid, ed, now)
  end
  FlowState.refresh(keys[1], now)
  return reply
end

redis.register_function('ff_submit_flow', submit_flow)
