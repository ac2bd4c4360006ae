-- maintenance.lua: index repair for the index reconciler (docs/architecture.md#scanners).
--
-- uses: reply, util, keys, state, suspend

local RUNNABLE_SET = {
  eligible_now = 'eligible',
  not_eligible_until_time = 'delayed',
  blocked_by_dependencies = 'blocked:dependencies',
  blocked_by_budget = 'blocked:budget',
  blocked_by_quota = 'blocked:quota',
  blocked_by_route = 'blocked:route',
  blocked_by_operator = 'blocked:operator',
  blocked_by_lane_state = 'blocked:operator',
}

-- Lane-suspended score of a suspended execution (docs/suspension.md#suspend): its open suspension's
-- timeout_at,
-- or 9999999999999 without one. The suspension key is built on the tag of KEYS[1].
local function suspended_score(x)
  local t = redis.call('HGET', Keys.exec(x.tag, x.eid, 'suspension:current'), 'timeout_at')
  return tonumber(t or '') or tonumber(Suspend.NO_TIMEOUT_SCORE)
end

-- The lane set and score the state vector implies (docs/architecture.md#the-state-vector), or nil
-- when unknown.
local function expected_set(x, now)
  local c = x.core
  local phase = c.lifecycle_phase
  if phase == 'runnable' then
    local set = RUNNABLE_SET[c.eligibility_state]
    if set == 'eligible' then
      return set, State.eligible_score(tonumber(c.priority) or 0, tonumber(c.created_at) or now)
    elseif set == 'delayed' then
      return set, tonumber(c.delay_until) or now
    end
    return set, tonumber(c.last_transition_at) or now
  elseif phase == 'active' then
    return 'active', tonumber(c.lease_expires_at) or now
  elseif phase == 'suspended' then
    return 'suspended', suspended_score(x)
  elseif phase == 'terminal' then
    return 'terminal', tonumber(c.completed_at) or now
  end
  return nil
end

-- ff_reconcile_indexes
--   KEYS (1): 1 core. Lane sets are built from the tag of KEYS[1] and core.lane_id
--   (docs/architecture.md#partitions-and-hash-tags
--     rule 3); a suspended execution's score is read from its suspension:current (same tag).
--   ARGV (1): 1 execution_id.
--   Now: TIME.
--   Replies: {1,"OK","ok"} (membership already matches the state vector) |
--     {1,"OK","repaired",<sets added>,<sets removed>} | {1,"OK","not_found"} | {1,"OK","unknown_state"}
--   Errors: none.
--   Writes (repaired only): ZADD the id to the lane set its state implies
--   (docs/architecture.md#the-state-vector) and ZREM
--     it from every other lane scheduling set, so it is in exactly one. exec_core is not written.
local function reconcile_indexes(keys, argv)
  local x = State.load_exec(keys, argv)
  if not x then
    return Reply.ok('not_found')
  end
  local c = x.core
  local want, score = expected_set(x, Util.now_ms())
  if not want then
    return Reply.ok('unknown_state')
  end
  local added, removed = {}, {}
  for _, set in ipairs(Keys.LANE_SETS) do
    local key = Keys.lane(x.tag, c.lane_id, set)
    local present = redis.call('ZSCORE', key, argv[1])
    if set == want and not present then
      redis.call('ZADD', key, Util.num(score), argv[1])
      added[#added + 1] = set
    elseif set ~= want and present then
      redis.call('ZREM', key, argv[1])
      removed[#removed + 1] = set
    end
  end
  if #added == 0 and #removed == 0 then
    return Reply.ok('ok')
  end
  return Reply.ok('repaired', table.concat(added, ','), table.concat(removed, ','))
end

redis.register_function('ff_reconcile_indexes', reconcile_indexes)
