-- admission.lua: admission blocks and unblocks of runnable executions
-- (docs/lifecycle.md#admission-blocks).
--
-- uses: reply, util, keys, state, eligible

-- Reason -> {eligibility_state, blocked index suffix} (docs/lifecycle.md#admission-blocks).
local BLOCK_REASONS = {
  waiting_for_budget = {'blocked_by_budget', 'blocked:budget'},
  waiting_for_quota = {'blocked_by_quota', 'blocked:quota'},
  waiting_for_capable_worker = {'blocked_by_route', 'blocked:route'},
  paused_by_operator = {'blocked_by_operator', 'blocked:operator'},
  paused_by_policy = {'blocked_by_lane_state', 'blocked:operator'},
}

local BLOCKED_ELIGIBILITY = {
  blocked_by_budget = 'blocked:budget',
  blocked_by_quota = 'blocked:quota',
  blocked_by_route = 'blocked:route',
  blocked_by_operator = 'blocked:operator',
  blocked_by_lane_state = 'blocked:operator',
}

-- ff_block_execution_for_admission
--   KEYS (3): 1 core, 2 lane eligible (*), 3 target blocked index (*). (*) built from the tag of
--     KEYS[1] and core.lane_id (docs/architecture.md#keys-built-inside-lua).
--   ARGV (3): 1 execution_id, 2 blocking_reason, 3 blocking_detail.
--   Now: TIME.
--   Replies: {1,"OK","blocked"} (re-blocking with the same reason refreshes detail and score).
--   Errors (in order): execution_not_found, execution_not_active (terminal; enriched),
--     execution_not_eligible (other non-runnable phase), invalid_blocking_reason,
--     execution_not_eligible (not eligible_now and not already the target eligibility).
--   Writes: core vector (runnable, unowned, mapped eligibility, reason, detail, none, attempt
--     state kept); ZREM lane eligible; ZADD target index at now; SPUBLISH state_changed.
local function block_execution(keys, argv)
  local x = State.load_exec(keys, argv)
  if not x then
    return Reply.err('execution_not_found')
  end
  local c = x.core
  if c.lifecycle_phase == 'terminal' then
    return Reply.not_active(c)
  end
  if c.lifecycle_phase ~= 'runnable' then
    return Reply.err('execution_not_eligible', 'phase ' .. tostring(c.lifecycle_phase))
  end
  local target = BLOCK_REASONS[argv[2]]
  if not target then
    return Reply.err('invalid_blocking_reason', argv[2])
  end
  if c.eligibility_state ~= 'eligible_now' and c.eligibility_state ~= target[1] then
    return Reply.err('execution_not_eligible', c.eligibility_state)
  end
  local now = Util.now_ms()
  State.write_vector(keys[1], argv[1], {'runnable', 'unowned', target[1], argv[2], argv[3] or '',
    'none', Util.is_set(c.attempt_state) and c.attempt_state or 'pending_first_attempt'}, now)
  Eligible.remove(x.tag, c.lane_id, argv[1], c.namespace)
  redis.call('ZADD', Keys.lane(x.tag, c.lane_id, target[2]), Util.num(now), argv[1])
  return Reply.ok('blocked')
end

redis.register_function('ff_block_execution_for_admission', block_execution)

-- ff_unblock_execution
--   KEYS (3): 1 core, 2 source blocked index (*), 3 lane eligible (*). (*) built from the tag of
--     KEYS[1] and core.lane_id / core.eligibility_state
--     (docs/architecture.md#keys-built-inside-lua).
--   ARGV (2): 1 execution_id, 2 expected_blocking_reason ("" = no check).
--   Now: TIME.
--   Replies: {1,"OK","unblocked"}
--   Errors (in order): execution_not_found, execution_not_eligible (not runnable; not blocked by
--     budget/quota/route/operator/lane state; expected reason differs: a stale unblock).
--   Writes: core vector (runnable, unowned, eligible_now, waiting_for_worker, "", none, attempt
--     state kept); ZREM source index; ZADD lane eligible at -(priority x 10^12) + created_at;
--     SPUBLISH state_changed.
local function unblock_execution(keys, argv)
  local x = State.load_exec(keys, argv)
  if not x then
    return Reply.err('execution_not_found')
  end
  local c = x.core
  if c.lifecycle_phase ~= 'runnable' then
    return Reply.err('execution_not_eligible', 'phase ' .. tostring(c.lifecycle_phase))
  end
  local source = BLOCKED_ELIGIBILITY[c.eligibility_state]
  if not source then
    return Reply.err('execution_not_eligible', c.eligibility_state)
  end
  if Util.is_set(argv[2]) and argv[2] ~= c.blocking_reason then
    return Reply.err('execution_not_eligible', 'blocking_reason is ' .. tostring(c.blocking_reason))
  end
  local now = Util.now_ms()
  State.write_vector(keys[1], argv[1], {'runnable', 'unowned', 'eligible_now', 'waiting_for_worker', '',
    'none', c.attempt_state}, now)
  redis.call('ZREM', Keys.lane(x.tag, c.lane_id, source), argv[1])
  local score = State.eligible_score(tonumber(c.priority) or 0, tonumber(c.created_at) or now)
  Eligible.add(x.tag, c.lane_id, argv[1], score, c.namespace)
  return Reply.ok('unblocked')
end

redis.register_function('ff_unblock_execution', unblock_execution)
