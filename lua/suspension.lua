-- suspension.lua: pending waitpoints, suspend, resume, waitpoint closure, suspension timeouts and
-- the suspension/waitpoint reads (docs/suspension.md).
--
-- Every key is on the tag of KEYS[1]. Waitpoint condition and signal stream keys, lane sets,
-- attempt and stream-meta keys are built at run time from that tag
-- (docs/architecture.md#keys-built-inside-lua). Events
-- go to ff:signal_events:{p} (docs/suspension.md#watches) after the writes; state changes also
-- publish
-- state_changed on ff:exec_events:{p} through write_vector.
--
-- uses: reply, util, bounds, argv, keys, state, stream, lease, attempt, terminal, policy, hmac, condition, suspend

local TIMEOUT_BEHAVIORS = {
  fail = true, cancel = true, expire = true, auto_resume = true,
  auto_resume_with_timeout_signal = true, escalate = true,
}

-- reason_code -> blocking_reason (docs/suspension.md#suspend); anything else is waiting_for_signal.
local BLOCKING_OF_REASON = {
  waiting_for_approval = 'waiting_for_approval',
  waiting_for_callback = 'waiting_for_callback',
  waiting_for_tool_result = 'waiting_for_tool_result',
  waiting_for_operator_review = 'paused_by_operator',
  manual_pause = 'paused_by_operator',
  paused_by_policy = 'paused_by_policy',
  paused_by_budget = 'waiting_for_budget',
}

local OPEN_STATES = {pending = true, active = true}

-- Removes a closed/expired waitpoint record at `wp` with its condition and signal stream before
-- the id is re-used (a re-created waitpoint gets a new created_at, hence a new token).
local function reset_waitpoint(wp)
  redis.call('DEL', wp, wp .. ':condition', wp .. ':signals')
end

-- ff_create_pending_waitpoint
--   KEYS (5): 1 core, 2 waitpoint (ff:wp:{p}:<ARGV[6]>), 3 pending_waitpoint_expiry,
--     4 HMAC keystore, 5 waitpoints set.
--   ARGV (8): 1 execution_id, 2 lease_id, 3 lease_epoch, 4 attempt_id, 5 attempt_index,
--     6 waitpoint_id, 7 waitpoint_key, 8 expires_in_ms (> 0).
--   Now: TIME.
--   Replies: {1,"OK",waitpoint_id,waitpoint_key,waitpoint_token,expires_at}
--   Errors (in order): invalid_input (numeric ARGV, empty ids/key), execution_not_found,
--     partial_fence_triple, fence_required, execution_not_active (enriched), lease_revoked,
--     lease_expired (not marked), stale_lease (fence or attempt_index differ),
--     waitpoint_already_exists (a pending/active record at that id), invalid_keys_missing_hmac,
--     hmac_secret_not_initialized, invalid_secret. Nothing is written on any error.
--   Writes: ZADD pending_waitpoint_expiry (member waitpoint id, score now + expires_in_ms);
--     SADD waitpoints set; waitpoint hash (state pending, created_at now, token minted over it;
--     a closed/expired record at that id is replaced with its condition and stream);
--     waitpoint_opened (state pending). Core and lease untouched.
local PENDING_ARGV = {
  {8, 'expires_in_ms', 'int', min = 1, max = Bounds.HORIZON_MS},
  {5, 'attempt_index', 'int'},
  {3, 'lease_epoch', 'int?'},
  {6, 'waitpoint_id', 'str'},
  {7, 'waitpoint_key', 'str'},
}

local function create_pending_waitpoint(keys, argv)
  local a, e = Argv.parse(argv, PENDING_ARGV)
  if not a then
    return e
  end
  local ttl, idx = a.expires_in_ms, a.attempt_index
  local x = State.load_exec(keys, argv)
  if not x then
    return Reply.err('execution_not_found')
  end
  Util.expect_key(keys[2], Keys.waitpoint(x.tag, argv[6]), 'waitpoint')
  local fence, ferr = Lease.resolve_fence(x.core, argv[2], argv[3], argv[4], 'lease_holder', false)
  if not fence then
    return ferr
  end
  local now = Util.now_ms()
  local lerr = Lease.check(x, fence, now, false)
  if lerr then
    return lerr
  end
  if tonumber(x.core.current_attempt_index or '') ~= idx then
    return Reply.err('stale_lease')
  end
  local old = redis.call('HGET', keys[2], 'state')
  if old and OPEN_STATES[old] then
    return Reply.err('waitpoint_already_exists')
  end
  local wpid, wpkey = argv[6], argv[7]
  local token, merr = Hmac.mint(keys[4], wpid, wpkey, Util.num(now))
  if not token then
    return merr
  end

  local expires = now + ttl
  redis.call('ZADD', keys[3], Util.num(expires), wpid)
  redis.call('SADD', keys[5], wpid)
  if old then
    reset_waitpoint(keys[2])
  end
  redis.call('HSET', keys[2], 'waitpoint_id', wpid, 'execution_id', x.eid,
    'attempt_index', Util.num(idx), 'suspension_id', '', 'waitpoint_key', wpkey,
    'waitpoint_token', token, 'state', 'pending', 'created_at', Util.num(now), 'activated_at', '',
    'satisfied_at', '', 'closed_at', '', 'expires_at', Util.num(expires), 'close_reason', '',
    'signal_count', '0', 'matched_signal_count', '0', 'last_signal_at', '')
  Suspend.signal_event(x.tag, {type = 'waitpoint_opened', execution_id = x.eid, waitpoint_id = wpid,
    state = 'pending', at = now})
  return Reply.ok(wpid, wpkey, token, Util.num(expires))
end

redis.register_function('ff_create_pending_waitpoint', create_pending_waitpoint)

-- Shape checks of the suspend ARGV (nothing read yet). Returns a table or nil plus the reply.
local SUSPEND_NUMBERS = {
  {5, 'attempt_index', 'int'},
  {3, 'lease_epoch', 'int?'},
  {14, 'timeout_at', 'int?', min = 0, max = Bounds.TIMESTAMP_MS},
  {17, 'timeout_in_ms', 'int?', min = 0, max = Bounds.HORIZON_MS},
}
local SUSPEND_IDS = {{6, 'suspension_id', 'str'}, {7, 'waitpoint_id', 'str'}}

local function suspend_args(argv)
  local a, e = Argv.parse(argv, SUSPEND_NUMBERS)
  if not a then
    return nil, e
  end
  local idx, timeout = a.attempt_index, a.timeout_at
  if timeout and a.timeout_in_ms then
    return nil, Reply.err('invalid_input', 'give timeout_at or timeout_in_ms, not both')
  end
  local behavior = (argv[16] ~= '' and argv[16]) or 'fail'
  if not TIMEOUT_BEHAVIORS[behavior] then
    return nil, Reply.err('invalid_input', 'unknown timeout_behavior: ' .. behavior)
  end
  local flag = argv[15]
  if flag ~= '1' and flag ~= '0' and flag ~= '' then
    return nil, Reply.err('invalid_input', 'use_pending_waitpoint must be "1" or "0"')
  end
  local _, serr = Argv.parse(argv, SUSPEND_IDS)
  if serr then
    return nil, serr
  end
  if flag ~= '1' and argv[8] == '' then
    return nil, Reply.err('invalid_input', 'waitpoint_key must not be empty')
  end
  local cond, cerr = Condition.parse(argv[11])
  if not cond then
    return nil, cerr
  end
  local policy = argv[12] ~= '' and Util.decode_json(argv[12])
  if policy ~= false and (type(policy) ~= 'table' or #policy > 0) then
    return nil, Reply.err('invalid_input', 'resume_policy_json must be a JSON object')
  end
  local perr = policy and Policy.check(policy, Policy.RESUME_SCHEMA, 'resume_policy')
  if perr then
    return nil, perr
  end
  return {idx = idx, timeout = timeout, timeout_in_ms = a.timeout_in_ms, behavior = behavior,
    pending = flag == '1', cond = cond}, nil
end

-- The pending-path checks of docs/suspension.md#suspend on the stored waitpoint `wp`.
local function check_pending_waitpoint(x, wp, idx, now)
  if next(wp) == nil then
    return Reply.err('waitpoint_not_found')
  elseif wp.state ~= 'pending' then
    return Reply.err('waitpoint_not_pending')
  elseif wp.execution_id ~= x.eid or tonumber(wp.attempt_index or '') ~= idx then
    return Reply.err('invalid_waitpoint_for_execution')
  end
  local exp = tonumber(wp.expires_at or '')
  if exp and exp <= now then
    return Reply.err('pending_waitpoint_expired')
  elseif not Util.is_set(wp.waitpoint_token) then
    return Reply.err('waitpoint_not_token_bound')
  end
  return nil
end

-- Replays the waitpoint's buffered signals in stream order through
-- docs/suspension.md#resume-conditions on the fresh
-- condition `st` (in memory). Returns satisfied, the per-signal effects {{id, effect}, ...} and
-- the buffered-signal summary.
local function replay_buffered(wp, st)
  local satisfied, effects, names, seen, matched = false, {}, {}, {}, 0
  local entries = redis.call('XRANGE', wp .. ':signals', '-', '+')
  for _, e in ipairs(entries) do
    local f = {}
    for i = 1, #e[2], 2 do
      f[e[2][i]] = e[2][i + 1]
    end
    local name, effect = f.signal_name or '', 'no_op'
    if not satisfied and Condition.match(st, name, f.signal_id or '') then
      matched = matched + 1
      satisfied = Condition.satisfied(st)
      effect = satisfied and 'resume_condition_satisfied' or 'appended_to_waitpoint'
    end
    effects[#effects + 1] = {f.signal_id or '', effect}
    if not seen[name] then
      seen[name] = true
      names[#names + 1] = name
    end
  end
  local summary = '{"total_count":' .. #entries .. ',"matched_count":' .. matched
    .. ',"signal_names":' .. Util.json_array(names) .. '}'
  return satisfied, effects, summary, matched
end

-- Stamps the replayed signals' observed_effect (and matched_waitpoint_id when matched).
local function write_replay_effects(tag, wpid, effects)
  for _, e in ipairs(effects) do
    local key = 'ff:signal:' .. tag .. ':' .. e[1]
    if e[1] ~= '' and redis.call('EXISTS', key) == 1 then
      redis.call('HSET', key, 'observed_effect', e[2],
        'matched_waitpoint_id', (e[2] ~= 'no_op' and wpid) or '')
    end
  end
end

-- The AlreadySatisfied outcome of activating a pending waitpoint whose buffered signals already
-- satisfy the condition (docs/suspension.md#suspend: condition closed, SADD, effects written).
-- Lease, core and attempt are untouched; no suspension record.
local function already_satisfied(x, keys, argv, wp, st, effects, matched, now)
  local wpid = argv[7]
  redis.call('ZREM', keys[10], wpid)
  redis.call('SADD', keys[11], wpid)
  Condition.write(keys[3] .. ':condition', st, now, 'satisfied')
  redis.call('HSET', keys[3], 'suspension_id', argv[6], 'activated_at', Util.num(now),
    'matched_signal_count', Util.num(matched), 'expires_at', '')
  Suspend.close_waitpoint(x, wpid, 'resumed', 'satisfied', now, true)
  write_replay_effects(x.tag, wpid, effects)
  local reply = {1, 'ALREADY_SATISFIED', argv[6], wpid, wp.waitpoint_key, wp.waitpoint_token}
  for _, m in ipairs(st.matchers) do
    if m.satisfied then
      reply[#reply + 1] = m.signal_id
    end
  end
  return reply
end

-- ff_suspend_execution
--   KEYS (12): 1 core, 2 suspension current, 3 waitpoint (ff:wp:{p}:<ARGV[7]>), 4 HMAC keystore,
--     5 lease current, 6 lease history, 7 lease_expiry, 8 attempt_timeout,
--     9 suspension_timeout, 10 pending_waitpoint_expiry, 11 waitpoints set, 12 exec signals
--     (unused). Built: waitpoint condition and stream, lane active/suspended (core.lane_id),
--     holder's lease set, attempt hash (core.current_attempt_index).
--   ARGV (17): 1 execution_id, 2 lease_id, 3 lease_epoch, 4 attempt_id, 5 attempt_index,
--     6 suspension_id, 7 waitpoint_id, 8 waitpoint_key (fresh path; ignored with a pending
--     waitpoint), 9 reason_code, 10 requested_by, 11 resume_condition_json ("" = defaults),
--     12 resume_policy_json ("" or a JSON object; stored), 13 continuation_metadata_pointer,
--     14 timeout_at ("" = none), 15 use_pending_waitpoint ("1" / "0"), 16 timeout_behavior
--     ("" = fail; fail|cancel|expire|auto_resume|auto_resume_with_timeout_signal|escalate),
--     17 timeout_in_ms ("" = none; else timeout_at = now + timeout_in_ms; not with timeout_at).
--   Now: TIME.
--   Replies: {1,"OK",suspension_id,waitpoint_id,waitpoint_key,waitpoint_token}
--     | {1,"ALREADY_SATISFIED",suspension_id,waitpoint_id,waitpoint_key,waitpoint_token,
--        matched_signal_id...} (the satisfying signals, in matcher order)
--       (pending waitpoint whose buffered signals satisfy the condition: the waitpoint closes
--       `resumed`, the condition closes `satisfied`, the caller keeps its lease).
--   Errors (in order, nothing written unless noted): invalid_input (numeric ARGV and their
--     bounds, timeout_at with timeout_in_ms, ids, use_pending_waitpoint, unknown
--     timeout_behavior, resume_policy_json not an object), invalid_policy_json (a resume policy
--     field off the schema of include/policy.lua), invalid_resume_condition,
--     execution_not_found, partial_fence_triple, fence_required, execution_not_active
--     (enriched), invalid_input (timeout_at more than Bounds.HORIZON_MS after now),
--     lease_revoked, lease_expired (the lease is first marked
--     expired; that write is kept), stale_lease, invalid_lease_for_suspend (attempt_index),
--     already_suspended (open suspension record). Pending path: waitpoint_not_found,
--     waitpoint_not_pending, invalid_waitpoint_for_execution, pending_waitpoint_expired,
--     waitpoint_not_token_bound. Fresh path: waitpoint_already_exists (a pending/active record
--     at that id), invalid_keys_missing_hmac, hmac_secret_not_initialized, invalid_secret.
--   Writes (suspended): core suspend vector (blocking_reason from reason_code, "suspended:
--     waitpoint <wp> awaiting <reason_code>", attempt_interrupted), lease mirror cleared,
--     current_suspension_id, current_waitpoint_id; lease release (ZREM
--     lease_expiry, lane active, attempt_timeout, SREM holder's lease set, history `released`
--     reason suspend); ZADD lane suspended at timeout_at or 9999999999999; ZADD
--     suspension_timeout when timeout_at; ZREM pending_waitpoint_expiry; SADD waitpoints set
--     (also the archived waitpoint of a closed previous suspension record); attempt
--     suspended, suspended_at, suspension_id; waitpoint active (fresh: minted at created_at =
--     now; pending: id, key, token and created_at kept, buffered signals replayed and their
--     observed_effect written); condition hash; suspension record replaced;
--     waitpoint_opened (state active).
local function suspend_execution(keys, argv)
  local a, aerr = suspend_args(argv)
  if not a then
    return aerr
  end
  local x = State.load_exec(keys, argv)
  if not x then
    return Reply.err('execution_not_found')
  end
  Util.expect_key(keys[3], Keys.waitpoint(x.tag, argv[7]), 'waitpoint')
  local fence, ferr = Lease.resolve_fence(x.core, argv[2], argv[3], argv[4], 'lease_holder', false)
  if not fence then
    return ferr
  end
  x.history = keys[6]
  local now = Util.now_ms()
  local herr = Bounds.past_horizon('timeout_at', a.timeout, now)
  if herr then
    return herr
  end
  local lerr = Lease.check(x, fence, now, true)
  if lerr then
    return lerr
  end
  if a.timeout_in_ms then
    a.timeout = now + a.timeout_in_ms
  end
  local c = x.core
  if tonumber(c.current_attempt_index or '') ~= a.idx then
    return Reply.err('invalid_lease_for_suspend')
  end
  local prev = Util.hgetall(keys[2])
  if Util.is_set(prev.suspension_id) and not Util.is_set(prev.closed_at) then
    return Reply.err('already_suspended')
  end
  local wpid = argv[7]
  local wp = Util.hgetall(keys[3])
  local wpkey, token
  if a.pending then
    local perr = check_pending_waitpoint(x, wp, a.idx, now)
    if perr then
      return perr
    end
    wpkey, token = wp.waitpoint_key or '', wp.waitpoint_token
  else
    if OPEN_STATES[wp.state or ''] then
      return Reply.err('waitpoint_already_exists')
    end
    wpkey = argv[8]
    local merr
    token, merr = Hmac.mint(keys[4], wpid, wpkey, Util.num(now))
    if not token then
      return merr
    end
  end

  -- Validated: from here on every branch commits.
  local st = Condition.new_state(a.cond)
  local summary, effects, matched = '{"total_count":0,"matched_count":0,"signal_names":[]}', {}, 0
  if a.pending then
    local satisfied
    satisfied, effects, summary, matched = replay_buffered(keys[3], st)
    if satisfied then
      if Util.is_set(prev.waitpoint_id) then
        redis.call('SADD', keys[11], prev.waitpoint_id)
      end
      redis.call('DEL', keys[2])
      return already_satisfied(x, keys, argv, wp, st, effects, matched, now)
    end
  end

  local sid = argv[6]
  State.write_vector(keys[1], x.eid, {'suspended', 'unowned', 'not_applicable',
    BLOCKING_OF_REASON[argv[9]] or 'waiting_for_signal',
    'suspended: waitpoint ' .. wpid .. ' awaiting ' .. argv[9], 'none', 'attempt_interrupted'},
    now, Lease.cleared({current_suspension_id = sid, current_waitpoint_id = wpid}))
  x.lease, x.lease_expiry, x.attempt_timeout = keys[5], keys[7], keys[8]
  Lease.release(x, 'suspend', now)
  local timeout = a.timeout and Util.num(a.timeout) or ''
  redis.call('ZADD', Keys.lane(x.tag, c.lane_id, 'suspended'),
    a.timeout and timeout or Suspend.NO_TIMEOUT_SCORE, x.eid)
  if a.timeout then
    redis.call('ZADD', keys[9], timeout, x.eid)
  end
  redis.call('ZREM', keys[10], wpid)
  redis.call('SADD', keys[11], wpid)
  if Util.is_set(prev.waitpoint_id) then
    redis.call('SADD', keys[11], prev.waitpoint_id)
  end

  local akey = Keys.attempt(x.tag, x.eid, a.idx)
  if redis.call('EXISTS', akey) == 1 then
    redis.call('HSET', akey, 'attempt_state', 'suspended', 'suspended_at', Util.num(now),
      'suspension_id', sid)
  end
  if a.pending then
    redis.call('HSET', keys[3], 'suspension_id', sid, 'state', 'active',
      'activated_at', Util.num(now), 'expires_at', timeout, 'matched_signal_count', Util.num(matched))
    write_replay_effects(x.tag, wpid, effects)
  else
    if next(wp) ~= nil then
      reset_waitpoint(keys[3])
    end
    redis.call('HSET', keys[3], 'waitpoint_id', wpid, 'execution_id', x.eid,
      'attempt_index', Util.num(a.idx), 'suspension_id', sid, 'waitpoint_key', wpkey,
      'waitpoint_token', token, 'state', 'active', 'created_at', Util.num(now),
      'activated_at', Util.num(now), 'satisfied_at', '', 'closed_at', '', 'expires_at', timeout,
      'close_reason', '', 'signal_count', '0', 'matched_signal_count', '0',
      'last_signal_at', '')
  end
  Condition.write(keys[3] .. ':condition', st, now, nil)
  redis.call('DEL', keys[2])
  redis.call('HSET', keys[2], 'suspension_id', sid, 'execution_id', x.eid,
    'attempt_index', Util.num(a.idx), 'waitpoint_id', wpid, 'waitpoint_key', wpkey,
    'reason_code', argv[9], 'requested_by', argv[10], 'created_at', Util.num(now),
    'timeout_at', timeout, 'timeout_behavior', a.behavior, 'resume_condition_json', argv[11],
    'resume_policy_json', argv[12], 'continuation_metadata_pointer', argv[13],
    'buffered_signal_summary_json', summary, 'last_signal_at', wp.last_signal_at or '',
    'satisfied_at', '', 'closed_at', '', 'close_reason', '')
  Suspend.signal_event(x.tag, {type = 'waitpoint_opened', execution_id = x.eid, waitpoint_id = wpid,
    state = 'active', at = now})
  return Reply.ok(sid, wpid, wpkey, token)
end

redis.register_function('ff_suspend_execution', suspend_execution)

-- close_reason of the waitpoint and suspension per resume trigger (docs/suspension.md#resume
-- Recommended).
local TRIGGER_REASON = {
  signal = 'resumed', operator = 'operator_resume', auto_resume = 'timed_out_auto_resume',
}

-- The open suspension record of a suspended execution, or nil.
local function open_suspension(x, key)
  if x.core.lifecycle_phase ~= 'suspended' then
    return nil
  end
  local s = Util.hgetall(key)
  if not Util.is_set(s.suspension_id) or Util.is_set(s.closed_at) then
    return nil
  end
  return s
end

-- The stored resume condition says operators may not override it.
local function override_forbidden(s)
  local t = Util.decode_json(s.resume_condition_json or '')
  return type(t) == 'table' and t.allow_operator_override == false
end

-- Closes the suspension record and its waitpoint (+ condition) with `reason` after a resume.
local function close_resumed(x, key, s, reason, now)
  redis.call('HSET', key, 'satisfied_at', Util.num(now), 'closed_at', Util.num(now),
    'close_reason', reason)
  local wpid = s.waitpoint_id
  if Util.is_set(wpid) and redis.call('EXISTS', Keys.waitpoint(x.tag, wpid)) == 1 then
    Suspend.close_waitpoint(x, wpid, reason, reason, now, true)
  end
end

-- ff_resume_execution
--   KEYS (3): 1 core, 2 suspension current, 3 suspension_timeout. Built: waitpoint and condition
--     (suspension.waitpoint_id), lane suspended/eligible/delayed (core.lane_id).
--   ARGV (3): 1 execution_id, 2 trigger_type ("" = signal; signal|operator|auto_resume),
--     3 resume_delay_ms ("" = 0; 0 falls back to the stored resume_policy_json's
--     resume_delay_ms).
--   Now: TIME.
--   Replies: {1,"OK",public_state}   (waiting | delayed)
--   Errors: invalid_input (trigger_type, resume_delay_ms), execution_not_found,
--     execution_not_suspended (not suspended, or no open suspension record),
--     resume_condition_not_met (operator trigger and allow_operator_override=false).
--   Writes: core resume vector (eligible_now / waiting_for_worker, or not_eligible_until_time /
--     waiting_for_resume_delay "resume delay <n>ms" with delay_until), current suspension and
--     waitpoint ids cleared; ZREM lane suspended, suspension_timeout; ZADD lane eligible at
--     -(priority x 10^12) + created_at or lane delayed at now + delay; suspension and waitpoint
--     satisfied_at, closed_at, close_reason (resumed | operator_resume | timed_out_auto_resume),
--     condition closed=1 with the same reason; execution_resumed, waitpoint_closed.
local RESUME_ARGV = {{3, 'resume_delay_ms', 'int?', min = 0, max = Bounds.HORIZON_MS}}

local function resume_execution(keys, argv)
  local trigger = (argv[2] ~= '' and argv[2]) or 'signal'
  local reason = TRIGGER_REASON[trigger]
  if not reason then
    return Reply.err('invalid_input', 'unknown trigger_type: ' .. trigger)
  end
  local a, e1 = Argv.parse(argv, RESUME_ARGV)
  if not a then
    return e1
  end
  local delay = a.resume_delay_ms
  local x = State.load_exec(keys, argv)
  if not x then
    return Reply.err('execution_not_found')
  end
  local s = open_suspension(x, keys[2])
  if not s then
    return Reply.err('execution_not_suspended')
  end
  if trigger == 'operator' and override_forbidden(s) then
    return Reply.err('resume_condition_not_met')
  end
  local now = Util.now_ms()
  delay = delay or 0
  if delay == 0 then
    delay = Policy.resume_delay(s.resume_policy_json)
  end
  local public = Suspend.resume_core(x, keys[3], delay, 'resume delay ' .. delay .. 'ms', now)
  Suspend.signal_event(x.tag, {type = 'execution_resumed', execution_id = x.eid,
    waitpoint_id = s.waitpoint_id or '', public_state = public, trigger = trigger, at = now})
  close_resumed(x, keys[2], s, reason, now)
  return Reply.ok(public)
end

redis.register_function('ff_resume_execution', resume_execution)

-- ff_close_waitpoint
--   KEYS (3): 1 core (only names the execution; may be missing), 2 waitpoint
--     (ff:wp:{p}:<ARGV[2]>), 3 pending_waitpoint_expiry.
--   ARGV (3): 1 execution_id, 2 waitpoint_id, 3 reason ("" = proactive_close; the expiry
--     scanner passes never_committed).
--   Now: TIME.
--   Replies: {1,"OK","closed"} | {1,"OK","already_closed"} (closed/expired: nothing written)
--   Errors: invalid_input (empty waitpoint_id), waitpoint_not_found (missing: the pending-index
--     entry is removed; or another execution's waitpoint), waitpoint_not_open (a state other
--     than pending/active/closed/expired).
--   Writes: ZREM pending_waitpoint_expiry; waitpoint state closed (expired for never_committed),
--     closed_at, close_reason; an active waitpoint's condition closed=1 (same reason);
--     waitpoint_closed.
local CLOSE_WAITPOINT_ARGV = {{2, 'waitpoint_id', 'str'}}

local function close_waitpoint(keys, argv)
  local _, serr = Argv.parse(argv, CLOSE_WAITPOINT_ARGV)
  if serr then
    return serr
  end
  State.load_exec(keys, argv) -- raises on a KEYS[1]/ARGV[1] mismatch; the core itself is not needed
  local x = {tag = Util.tag_of(keys[1]), eid = argv[1]}
  local wpid = argv[2]
  Util.expect_key(keys[2], Keys.waitpoint(x.tag, wpid), 'waitpoint')
  local reason = (argv[3] ~= '' and argv[3]) or 'proactive_close'
  local m = redis.call('HMGET', keys[2], 'execution_id', 'state')
  if not m[1] and not m[2] then
    redis.call('ZREM', keys[3], wpid)
    return Reply.err('waitpoint_not_found')
  elseif m[1] ~= x.eid then
    return Reply.err('waitpoint_not_found')
  elseif m[2] == 'closed' or m[2] == 'expired' then
    return Reply.ok('already_closed')
  elseif not OPEN_STATES[m[2] or ''] then
    return Reply.err('waitpoint_not_open')
  end
  local now = Util.now_ms()
  redis.call('ZREM', keys[3], wpid)
  Suspend.close_waitpoint(x, wpid, reason, reason, now, false,
    (reason == 'never_committed' and 'expired') or 'closed')
  return Reply.ok('closed')
end

redis.register_function('ff_close_waitpoint', close_waitpoint)

-- Terminal timeout behaviours: outcome and the attempt's end state.
local TERMINAL_BEHAVIOR = {
  fail = {'failed', 'ended_failure'},
  cancel = {'cancelled', 'ended_cancelled'},
  expire = {'expired', 'ended_failure'},
}

local function timeout_terminal(x, keys, s, behavior, now)
  local t = TERMINAL_BEHAVIOR[behavior]
  local reason = 'suspension_timeout:' .. behavior
  local extra = {failure_reason = reason, current_suspension_id = '', current_waitpoint_id = ''}
  if behavior == 'cancel' then
    extra.cancellation_reason = 'suspension_timeout'
  end
  x.attempt_timeout, x.deadline = keys[4], keys[5]
  local public = Terminal.transition(x, t[1], now, extra, true)
  redis.call('ZREM', keys[3], x.eid)
  redis.call('ZREM', Keys.lane(x.tag, x.core.lane_id, 'suspended'), x.eid)
  local idx = (Util.is_set(s.attempt_index) and s.attempt_index) or x.core.current_attempt_index
  if Attempt.finish(x, idx, t[2], {'failure_reason', reason, 'suspended_at', '',
      'suspension_id', ''}, now) then
    Stream.close(x, idx, 'suspension_timeout', now, true)
  end
  Terminal.close_suspension(x, keys[2], 'timed_out_' .. behavior, 'timed_out_' .. behavior, now)
  return public
end

local function timeout_escalate(x, keys, s, now)
  local public = State.write_vector(x.core_key, x.eid, {'suspended', 'unowned', 'not_applicable',
    'paused_by_operator', 'suspension escalated: timeout at ' .. s.timeout_at, 'none',
    x.core.attempt_state or 'attempt_interrupted'}, now)
  redis.call('ZREM', keys[3], x.eid)
  redis.call('HSET', keys[2], 'reason_code', 'waiting_for_operator_review', 'timeout_at', '',
    'timeout_behavior', '')
  return public
end

local function timeout_auto_resume(x, keys, s, now)
  local public = Suspend.resume_core(x, keys[3], 0, '', now)
  Suspend.signal_event(x.tag, {type = 'execution_resumed', execution_id = x.eid,
    waitpoint_id = s.waitpoint_id or '', public_state = public, trigger = 'auto_resume',
    at = now})
  close_resumed(x, keys[2], s, 'timed_out_auto_resume', now)
  return public
end

-- ff_expire_suspension (suspension-timeout scanner; safe to call early or repeatedly)
--   KEYS (5): 1 core, 2 suspension current, 3 suspension_timeout, 4 attempt_timeout,
--     5 execution_deadline. Built: waitpoint and condition (core.current_waitpoint_id), lane
--     suspended/terminal/eligible (core.lane_id), attempt hash and stream meta
--     (suspension.attempt_index).
--   ARGV (1): 1 execution_id.
--   Now: TIME.
--   Replies: {1,"OK",behavior,public_state}   behavior: fail|cancel|expire|auto_resume|escalate
--       (auto_resume_with_timeout_signal reports auto_resume; an unknown stored value fails)
--     | {1,"ALREADY_SATISFIED",reason}: not_found_cleaned | not_suspended_cleaned |
--       no_active_suspension_cleaned (all ZREM suspension_timeout) | not_yet_due (timeout_at in
--       the future; an empty/0 timeout_at also ZREMs the entry).
--   Errors: none.
--   Writes: fail/cancel/expire: core terminal vector (failed/cancelled/expired),
--     completed_at, failure_reason "suspension_timeout:<b>" (+ cancellation_reason
--     suspension_timeout), current ids cleared; ZREM suspension_timeout, lane suspended,
--     attempt_timeout, execution_deadline; ZADD lane terminal; ff:dag:completions (flow
--     member); attempt ended_failure/ended_cancelled, suspended_at/suspension_id cleared,
--     stream meta closed suspension_timeout; suspension, waitpoint and condition closed
--     timed_out_<b>. auto_resume: resume vector (no delay), lane eligible, suspension and
--     waitpoint closed timed_out_auto_resume, attempt untouched. escalate: core stays
--     suspended, paused_by_operator "suspension escalated: timeout at <ts>"; ZREM
--     suspension_timeout only; suspension reason_code waiting_for_operator_review,
--     timeout_at="", timeout_behavior="". Events: suspension_timed_out, plus
--     execution_resumed / waitpoint_closed as the branch closes or resumes.
local function expire_suspension(keys, argv)
  local x = State.load_exec(keys, argv)
  if not x then
    redis.call('ZREM', keys[3], argv[1])
    return Reply.already('not_found_cleaned')
  end
  if x.core.lifecycle_phase ~= 'suspended' then
    redis.call('ZREM', keys[3], x.eid)
    return Reply.already('not_suspended_cleaned')
  end
  local s = open_suspension(x, keys[2])
  if not s then
    redis.call('ZREM', keys[3], x.eid)
    return Reply.already('no_active_suspension_cleaned')
  end
  local due = tonumber(s.timeout_at or '')
  if not due or due == 0 then
    redis.call('ZREM', keys[3], x.eid)
    return Reply.already('not_yet_due')
  end
  local now = Util.now_ms()
  if due > now then
    return Reply.already('not_yet_due')
  end
  local behavior = s.timeout_behavior or ''
  local public
  if behavior == 'auto_resume' or behavior == 'auto_resume_with_timeout_signal' then
    behavior = 'auto_resume'
    public = timeout_auto_resume(x, keys, s, now)
  elseif behavior == 'escalate' then
    public = timeout_escalate(x, keys, s, now)
  else
    if not TERMINAL_BEHAVIOR[behavior] then
      behavior = 'fail'
    end
    public = timeout_terminal(x, keys, s, behavior, now)
  end
  Suspend.signal_event(x.tag, {type = 'suspension_timed_out', execution_id = x.eid,
    waitpoint_id = s.waitpoint_id or '', behavior = behavior, public_state = public, at = now})
  return Reply.ok(behavior, public)
end

redis.register_function('ff_expire_suspension', expire_suspension)

-- ff_read_resume_signals (read-only, no-writes)
--   KEYS (2): 1 core, 2 suspension current. Built: waitpoint condition, signal hashes and
--     payloads.
--   ARGV (2): 1 execution_id, 2 attempt_index.
--   Replies: {1,"OK",n, fields_1, payload_1, ..., fields_n, payload_n}: fields = the signal
--     hash as a flat field/value array, payload = its bytes or "". The signals of the
--     satisfied matchers (matcher order) of the suspension's waitpoint, only when the
--     record's attempt_index equals ARGV[2] and its close_reason is `resumed`; else n = 0.
--   Errors: invalid_input (attempt_index), execution_not_found.
--   Writes: none.
local READ_SIGNALS_ARGV = {{2, 'attempt_index', 'int'}}

local function read_resume_signals(keys, argv)
  local a, e1 = Argv.parse(argv, READ_SIGNALS_ARGV)
  if not a then
    return e1
  end
  local idx = a.attempt_index
  local x = State.load_exec(keys, argv)
  if not x then
    return Reply.err('execution_not_found')
  end
  local s = Util.hgetall(keys[2])
  local out = {1, 'OK', '0'}
  if tonumber(s.attempt_index or '') ~= idx or s.close_reason ~= 'resumed'
      or not Util.is_set(s.waitpoint_id) then
    return out
  end
  local st = Condition.load(Keys.waitpoint(x.tag, s.waitpoint_id) .. ':condition')
  local n = 0
  for _, m in ipairs((st and st.matchers) or {}) do
    if m.satisfied and m.signal_id ~= '' then
      local key = 'ff:signal:' .. x.tag .. ':' .. m.signal_id
      local fields = redis.call('HGETALL', key)
      if #fields > 0 then
        out[#out + 1] = fields
        out[#out + 1] = redis.call('GET', key .. ':payload') or ''
        n = n + 1
      end
    end
  end
  out[3] = Util.num(n)
  return out
end

redis.register_function{
  function_name = 'ff_read_resume_signals',
  callback = read_resume_signals,
  flags = {'no-writes'},
}

-- ff_list_waitpoints (read-only, no-writes)
--   KEYS (2): 1 core, 2 waitpoints set. Built: waitpoint hashes and conditions.
--   ARGV (1): 1 execution_id.
--   Replies: {1,"OK",n, entry_1, ..., entry_n}, entry = {waitpoint_id, waitpoint_key, state,
--     waitpoint_token, created_at, activated_at, expires_at, names_json} (names_json: JSON array
--     of the non-empty matcher names). Only pending/active waitpoints with a token, ordered by
--     waitpoint id. The reply carries tokens: never log it.
--   Errors: execution_not_found.
--   Writes: none.
local function list_waitpoints(keys, argv)
  local x = State.load_exec(keys, argv)
  if not x then
    return Reply.err('execution_not_found')
  end
  local ids = redis.call('SMEMBERS', keys[2])
  table.sort(ids)
  local out = {1, 'OK', '0'}
  for _, id in ipairs(ids) do
    local key = Keys.waitpoint(x.tag, id)
    local wp = Util.hgetall(key)
    if OPEN_STATES[wp.state or ''] and Util.is_set(wp.waitpoint_token) then
      local names = {}
      for _, m in ipairs((Condition.load(key .. ':condition') or {}).matchers or {}) do
        if m.name ~= '' then
          names[#names + 1] = m.name
        end
      end
      out[#out + 1] = {id, wp.waitpoint_key or '', wp.state, wp.waitpoint_token,
        wp.created_at or '', wp.activated_at or '', wp.expires_at or '', Util.json_array(names)}
    end
  end
  out[3] = Util.num(#out - 3)
  return out
end

redis.register_function{
  function_name = 'ff_list_waitpoints',
  callback = list_waitpoints,
  flags = {'no-writes'},
}
