-- maintenance.lua: index repair for the index reconciler (docs/architecture.md#scanners) and the
-- guarded repair of records older versions left half-written or past the bounds
-- (docs/architecture.md#repair-sweep).
--
-- uses: reply, util, bounds, argv, keys, state, eligible, suspend

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
--     it from every other lane scheduling set, so it is in exactly one; then the namespace
--     sub-index and namespace set of the eligible set brought in step with it (named
--     `eligible:ns` among the sets added or removed; docs/lifecycle.md#tenant-fairness).
--     exec_core is not written.
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
  -- The eligible set's namespace side follows it (docs/lifecycle.md#tenant-fairness).
  if Eligible.reconcile(x.tag, c.lane_id, argv[1], c.namespace) then
    local into = (want == 'eligible') and added or removed
    into[#into + 1] = 'eligible:ns'
  end
  if #added == 0 and #removed == 0 then
    return Reply.ok('ok')
  end
  return Reply.ok('repaired', table.concat(added, ','), table.concat(removed, ','))
end

redis.register_function('ff_reconcile_indexes', reconcile_indexes)

-- The guarded repairs of ff_repair_execution, each a no-op on a record it does not apply to.
-- `fixes` collects what was repaired, for the reply.

-- A score or stored time past `now + bound`: `now + bound`, else nil (nothing to clamp).
local function clamped(raw, now, bound)
  local v = tonumber(raw or '')
  if v and v > now + bound then
    return Util.num(now + bound)
  end
  return nil
end

-- An index entry of the execution scored past `now + bound`: re-scored at the bound.
local function clamp_index(key, member, now, bound, name, fixes)
  local at = clamped(redis.call('ZSCORE', key, member), now, bound)
  if at then
    redis.call('ZADD', key, 'XX', at, member)
    fixes[#fixes + 1] = name
  end
end

-- A hash field past `now + bound`: clamped; returns the new value or nil.
local function clamp_field(key, field, now, bound, name, fixes)
  local at = clamped(redis.call('HGET', key, field), now, bound)
  if at then
    redis.call('HSET', key, field, at)
    fixes[#fixes + 1] = name
  end
  return at
end

local function in_any_lane_set(x)
  for _, set in ipairs(Keys.LANE_SETS) do
    if redis.call('ZSCORE', Keys.lane(x.tag, x.core.lane_id or '', set), x.eid) then
      return true
    end
  end
  return false
end

-- The lease: an expiry past LEASE_TTL_MS from now (a TTL the bounds now refuse) comes back to
-- now + LEASE_TTL_MS; the holder keeps it and renews as usual.
local function repair_lease(x, now, fixes)
  local b = Bounds.LEASE_TTL_MS
  clamp_field(x.core_key, 'lease_expires_at', now, b, 'lease_expires_at', fixes)
  clamp_field(x.core_key, 'lease_renewal_deadline', now, b, 'lease_renewal_deadline', fixes)
  clamp_index(Keys.partition(x.tag, 'lease_expiry'), x.eid, now, b, 'lease_expiry', fixes)
  clamp_index(Keys.lane(x.tag, x.core.lane_id or '', 'active'), x.eid, now, b, 'active', fixes)
end

-- Every other stored time: at most HORIZON_MS from now.
local function repair_times(x, now, fixes)
  local h, lane = Bounds.HORIZON_MS, x.core.lane_id or ''
  clamp_field(x.core_key, 'execution_deadline_at', now, h, 'execution_deadline_at', fixes)
  clamp_index(Keys.partition(x.tag, 'execution_deadline'), x.eid, now, h, 'execution_deadline',
    fixes)
  clamp_index(Keys.partition(x.tag, 'attempt_timeout'), x.eid, now, h, 'attempt_timeout', fixes)
  clamp_field(x.core_key, 'delay_until', now, h, 'delay_until', fixes)
  clamp_index(Keys.lane(x.tag, lane, 'delayed'), x.eid, now, h, 'delayed', fixes)
  local susp = Keys.exec(x.tag, x.eid, 'suspension:current')
  if clamp_field(susp, 'timeout_at', now, h, 'suspension.timeout_at', fixes) then
    -- the no-timeout score (Suspend.NO_TIMEOUT_SCORE) is past the horizon by design: only an
    -- execution whose timeout was clamped is re-scored
    clamp_index(Keys.lane(x.tag, lane, 'suspended'), x.eid, now, h, 'suspended', fixes)
  end
  clamp_index(Keys.partition(x.tag, 'suspension_timeout'), x.eid, now, h, 'suspension_timeout',
    fixes)
  local pending = Keys.partition(x.tag, 'pending_waitpoint_expiry')
  for _, wpid in ipairs(redis.call('SMEMBERS', Keys.exec(x.tag, x.eid, 'waitpoints'))) do
    local wp = Keys.waitpoint(x.tag, wpid)
    clamp_field(wp, 'expires_at', now, h, 'waitpoint.expires_at', fixes)
    clamp_index(pending, wpid, now, h, 'pending_waitpoint_expiry', fixes)
  end
end

-- ff_repair_execution (the admin-triggered repair sweep, docs/architecture.md#repair-sweep)
--   KEYS (1): 1 core. Every other key is built on its tag
--     (docs/architecture.md#keys-built-inside-lua): all_executions, the lane sets of
--     core.lane_id, the partition indexes, lease current, suspension current and waitpoints,
--     each waitpoint hash.
--   ARGV (2): 1 execution_id, 2 min_age_ms (an orphan must be at least this old).
--   Now: TIME.
--   Replies: {1,"OK","ok"} (nothing to repair) | {1,"OK","not_found"}
--     | {1,"OK","orphan_removed"}: a core no index reaches (not in all_executions, in no lane
--       set, never claimed, created at least min_age_ms ago), left by a create that failed
--       half-way in an older version; its core, payload, policy and tags are deleted. A create
--       writes all_executions in the same call as the core, so no live execution looks like
--       this.
--     | {1,"OK","young_orphan"}: the same, but younger than min_age_ms; left alone.
--     | {1,"OK","clamped",<fields>}: stored times past the bounds brought back to them (a lease
--       expiry to now + LEASE_TTL_MS; deadlines, delays, timeouts and waitpoint expiries to
--       now + HORIZON_MS), in the record and in its index scores; <fields> names them (CSV).
--       `eligible:ns` among them: the eligible set's namespace sub-index and namespace set
--       brought in step with it (an execution made eligible by an older version;
--       docs/lifecycle.md#tenant-fairness).
--   Errors: invalid_input (min_age_ms).
--   Writes: as the replies say, nothing else. Idempotent: a second call answers "ok".
local REPAIR_ARGV = {{2, 'min_age_ms', 'int', min = 0}}

local function repair_execution(keys, argv)
  local a, e = Argv.parse(argv, REPAIR_ARGV)
  if not a then
    return e
  end
  local x = State.load_exec(keys, argv)
  if not x then
    return Reply.ok('not_found')
  end
  local now = Util.now_ms()
  local c = x.core
  local indexed = redis.call('SISMEMBER', Keys.partition(x.tag, 'all_executions'), x.eid) == 1
  if not indexed and not in_any_lane_set(x) and (c.total_attempt_count or '0') == '0'
      and (c.lifecycle_phase or 'runnable') == 'runnable' then
    if (tonumber(c.created_at or '') or 0) > now - a.min_age_ms then
      return Reply.ok('young_orphan')
    end
    redis.call('DEL', keys[1], Keys.exec(x.tag, x.eid, 'payload'),
      Keys.exec(x.tag, x.eid, 'policy'), Keys.exec(x.tag, x.eid, 'tags'))
    return Reply.ok('orphan_removed')
  end
  local fixes = {}
  if c.lifecycle_phase == 'active' then
    repair_lease(x, now, fixes)
  end
  repair_times(x, now, fixes)
  if Eligible.reconcile(x.tag, c.lane_id or '', x.eid, c.namespace) then
    fixes[#fixes + 1] = 'eligible:ns'
  end
  if #fixes == 0 then
    return Reply.ok('ok')
  end
  return Reply.ok('clamped', table.concat(fixes, ','))
end

redis.register_function('ff_repair_execution', repair_execution)
