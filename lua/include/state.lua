-- uses: util, keys, flowstate

local State = {}

-- Tag keys are reserved for callers: ^[a-z][a-z0-9_]*\.[^.]
function State.valid_tag_key(k)
  return type(k) == 'string' and string.match(k, '^[a-z][a-z0-9_]*%.[^.]') ~= nil
end

-- Public state derivation (docs/architecture.md#public-state): the only mapping.
State.RUNNABLE_PUBLIC = {
  eligible_now = 'waiting',
  not_eligible_until_time = 'delayed',
  blocked_by_dependencies = 'waiting_children',
  blocked_by_budget = 'rate_limited',
  blocked_by_quota = 'rate_limited',
  blocked_by_route = 'waiting',
  blocked_by_lane_state = 'waiting',
  blocked_by_operator = 'waiting',
}
State.TERMINAL_PUBLIC = {
  success = 'completed',
  failed = 'failed',
  cancelled = 'cancelled',
  expired = 'expired',
  skipped = 'skipped',
}

function State.public_state_of(phase, eligibility, outcome)
  if phase == 'terminal' then
    return State.TERMINAL_PUBLIC[outcome] or 'failed'
  elseif phase == 'suspended' then
    return 'suspended'
  elseif phase == 'active' then
    return 'active'
  elseif phase == 'runnable' then
    return State.RUNNABLE_PUBLIC[eligibility] or 'waiting'
  end
  return 'waiting'
end

-- Writes all six state-vector dimensions, public_state, last_transition_at and last_mutation_at
-- (plus any `extra` fields) in one HSET, then publishes the watch event. Returns public_state.
-- A flow member's move between public states also moves its flow's counters
-- (docs/flows.md#flow-state). v = {phase, ownership, eligibility, blocking, detail, outcome,
-- attempt}. `snap`: the core as this call read it (State.load_exec), when nothing in this call
-- wrote the core's state since; its public_state, flow_id, eligibility_state and lane_id stand
-- in for a fresh read. false: the core does not exist yet (create). nil: read them here.
function State.write_vector(core_key, eid, v, now, extra, snap)
  local public = State.public_state_of(v[1], v[3], v[6])
  local prev
  if snap then
    prev = {snap.public_state or false, snap.flow_id or false, snap.eligibility_state or false,
      snap.lane_id or false}
  elseif snap == false then
    prev = {false, false, false, false}
  else
    prev = redis.call('HMGET', core_key, 'public_state', 'flow_id', 'eligibility_state',
      'lane_id')
  end
  local args = {
    'lifecycle_phase', v[1], 'ownership_state', v[2], 'eligibility_state', v[3],
    'blocking_reason', v[4], 'blocking_detail', v[5], 'terminal_outcome', v[6],
    'attempt_state', v[7], 'public_state', public,
    'last_transition_at', Util.num(now), 'last_mutation_at', Util.num(now),
  }
  if extra then
    for k, val in pairs(extra) do
      args[#args + 1] = k
      args[#args + 1] = tostring(val)
    end
  end
  redis.call('HSET', core_key, unpack(args))
  if Util.is_set(prev[2]) and prev[1] ~= public then
    local reason = extra and (extra.failure_reason or extra.cancellation_reason)
    FlowState.moved(Util.tag_of(core_key), prev[2], eid, Util.is_set(prev[1]) and prev[1] or nil,
      public, reason, now)
  end
  redis.call('SPUBLISH', 'ff:exec_events:' .. Util.tag_of(core_key), cjson.encode({
    type = 'state_changed', execution_id = eid, public_state = public, at = now,
  }))
  -- A flow member lives on its flow's partition, which no waiting claim listens to: say where
  -- claimable work appeared (docs/lifecycle.md#work-off-the-lane-partition).
  if v[3] == 'eligible_now' and prev[3] ~= 'eligible_now' and Util.is_set(prev[2]) then
    State.ready(Util.tag_of(core_key), prev[4])
  end
  return public
end

-- Publishes on ff:ready:{p} that lane `lane` has claimable work on this partition.
function State.ready(tag, lane)
  if Util.is_set(lane) then
    redis.call('SPUBLISH', 'ff:ready:' .. tag, cjson.encode({type = 'ready', lane = lane}))
  end
end

-- Eligible-set score: highest priority first, then oldest (docs/architecture.md#key-schema).
function State.eligible_score(priority, created_at)
  return -(priority * 1000000000000) + created_at
end

function State.clamp_priority(p)
  if p < 0 then
    return 0
  elseif p > 9000 then
    return 9000
  end
  return p
end

-- Execution context of one call: {tag, eid, core_key, core = HGETALL snapshot taken before any
-- write}; nil when the core does not exist. Functions add the passed keys they use (history,
-- lease, lease_expiry, ...). ARGV[1] names the index members, so it must be the id of KEYS[1]:
-- a mismatch is a malformed call and raises (nothing is written).
function State.load_exec(keys, argv)
  local tag = Util.tag_of(keys[1] or '')
  if not tag or keys[1] ~= Keys.exec(tag, argv[1] or '', 'core') then
    error({err = 'ERR flowfabric: ARGV[1] (execution_id) is not the execution of KEYS[1]'})
  end
  local core = Util.hgetall(keys[1])
  if next(core) == nil then
    return nil
  end
  return {tag = tag, eid = argv[1], core_key = keys[1], core = core}
end
