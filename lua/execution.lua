-- execution.lua: creating executions and caller-owned metadata (docs/lifecycle.md#create,
-- docs/lifecycle.md#tags).
--
-- uses: reply, util, bounds, argv, keys, state, stream, lease, attempt, terminal, cancel, policy, create, replay

-- ff_create_execution
--   KEYS (10): 1 core, 2 payload, 3 policy, 4 tags, 5 lane eligible, 6 lane delayed,
--     7 idempotency key (ff:idem:{p}:<ns>:<key>) or the ff:noop:{p} placeholder,
--     8 execution_deadline index, 9 all_executions, 10 lanes registry (ff:idx:{p}:lanes).
--   ARGV (18): 1 execution_id, 2 namespace, 3 lane_id, 4 execution_kind, 5 priority,
--     6 creator_identity, 7 policy_json ("" or "{}" = none), 8 input_payload (raw bytes),
--     9 delay_until ("" = none), 10 dedup_ttl_ms ("" = policy.dedup_window_ms or 24 h),
--     11 tags_json, 12 execution_deadline_at ("" = policy.timeout_policy.execution_deadline_ms
--     after now, or none), 13 partition_id, 14 payload_encoding ("" = json), 15 quota_policy_id,
--     16 blocked_by_dependencies ("1" = start blocked_by_dependencies / waiting_for_children in
--     lane blocked:dependencies, for a flow member whose edges come later,
--     docs/flows.md#building-a-flow; "" = no), 17 concurrency_key ("" = none; needs a
--     quota_policy_id: docs/budgets.md#per-key-limits), 18 trace_context ("" = none; the
--     submitter's W3C context as `parent|link <traceparent>[ <tracestate>]`, checked at the API
--     edge, stored verbatim in core trace_context and handed back by the claims:
--     docs/observability.md#traces).
--   Now: TIME.
--   Replies: {1,"OK",execution_id,public_state} | {1,"DUPLICATE",existing_execution_id}
--   Errors (nothing written on any): invalid_input (numeric ARGV and their bounds, delay_until or
--     execution_deadline_at more than Bounds.HORIZON_MS after now, tags_json, more than
--     Bounds.TAGS tags, tag key/value sizes, a concurrency_key over Bounds.LABEL_BYTES, with
--     whitespace or control bytes, or without a quota_policy_id, a trace_context over
--     Bounds.TRACE_STATE_BYTES + 64 bytes or not printable ASCII), invalid_policy_json (malformed, or the field that
--     breaks the schema of include/policy.lua), invalid_capabilities (required:<why>),
--     invalid_tag_key; invalid_input for delay_until with blocked_by_dependencies.
--   Writes: core (one HSET, with policy_attempt_timeout_ms: the policy's attempt timeout, "0" =
--     none), payload (only when non-empty), policy (only when not empty or "{}"), tags,
--     eligible|delayed|blocked:dependencies, execution_deadline, all_executions,
--     lanes, idempotency key (PX ttl); SPUBLISH ff:exec_events:{p} state_changed.
local CREATE_ARGV = {
  {5, 'priority', 'int'},
  {9, 'delay_until', 'int?', min = 0, max = Bounds.TIMESTAMP_MS},
  {10, 'dedup_ttl_ms', 'int?', min = 0, max = Bounds.DEDUP_TTL_MS},
  {12, 'execution_deadline_at', 'int?', min = 0, max = Bounds.TIMESTAMP_MS},
  {13, 'partition_id', 'int'},
}

-- One create on `tag`: `idem` is the idempotency key (ff:idem:{p}:<ns>:<key>) or any other key
-- (no deduplication), `argv` the 18 ARGV above. Validates everything before its first write.
local function create_one(tag, idem, argv)
  local a, e = Argv.parse(argv, CREATE_ARGV)
  if not a then
    return e
  end
  local eid = argv[1]
  if string.sub(idem, 1, 8) == 'ff:idem:' then
    local existing = redis.call('GET', idem)
    if existing then
      return {1, 'DUPLICATE', existing}
    end
  end
  if redis.call('EXISTS', Keys.exec(tag, eid, 'core')) == 1 then
    return {1, 'DUPLICATE', eid}
  end
  local blocked = argv[16] == '1'
  if blocked and a.delay_until then
    return Reply.err('invalid_input', 'delay_until cannot be combined with blocked_by_dependencies')
  end
  local kerr = Create.check_concurrency_key(argv[17], argv[15])
  if kerr then
    return kerr
  end
  local trerr = Create.check_trace_context(argv[18])
  if trerr then
    return trerr
  end
  local policy, caps_csv, perr = Create.parse_policy(argv[7])
  if policy == nil then
    return perr
  end
  local tags, terr = Create.parse_tags(argv[11])
  if not tags then
    return terr
  end

  local now = Util.now_ms()
  local herr = Bounds.past_horizon('delay_until', a.delay_until, now)
    or Bounds.past_horizon('execution_deadline_at', a.execution_deadline_at, now)
  if herr then
    return herr
  end
  local public = Create.write(tag, {eid = eid, namespace = argv[2],
    lane = argv[3], kind = argv[4], priority = a.priority, creator = argv[6], policy = policy,
    policy_json = argv[7], caps_csv = caps_csv, payload = argv[8], encoding = argv[14],
    tags = tags, delay_until = a.delay_until, deadline = a.execution_deadline_at,
    partition = a.partition_id, quota_policy_id = argv[15], concurrency_key = argv[17],
    trace_context = argv[18], blocked = blocked, fresh = true}, now)
  if string.sub(idem, 1, 8) == 'ff:idem:' then
    local ttl = a.dedup_ttl_ms or Create.policy_number(policy, nil, 'dedup_window_ms')
      or Create.DEFAULT_DEDUP_WINDOW_MS
    if ttl > 0 then
      redis.call('SET', idem, eid, 'PX', Util.num(ttl))
    end
  end
  return Reply.ok(eid, public)
end

local function create_execution(keys, argv)
  return create_one(Util.tag_of(keys[1]), keys[7], argv)
end

redis.register_function('ff_create_execution', create_execution)

-- ff_create_executions (docs/lifecycle.md#batch-create, docs/lifecycle.md#batched-functions)
--   KEYS (10n), ARGV (2+18n): ARGV 1 = 10, 2 = 18, then n items each with the KEYS and ARGV of
--     ff_create_execution, all on one partition.
--   Replies: the list of the items' ff_create_execution replies, in order, each item created
--     on its own ({1,"OK",id,public_state} | {1,"DUPLICATE",id} | {0,code,detail...}). Items
--     run in order, so an item sees the idempotency keys of the ones before it; an item's error
--     writes nothing and leaves the others alone.
--   Errors (nothing written): invalid_input (the counts do not match, more than
--     Bounds.BATCH_ITEMS items).
--   Writes: per created item, what ff_create_execution writes.
redis.register_function('ff_create_executions', function(keys, argv)
  if tonumber(argv[1]) == 10 and #keys / 10 > Bounds.BATCH_ITEMS then
    return Reply.err('invalid_input', 'at most ' .. Bounds.BATCH_ITEMS .. ' items per call')
  end
  return Util.each_item(keys, argv, create_execution)
end)

-- ff_set_execution_tags
--   KEYS (2): 1 core, 2 tags.
--   ARGV: k1, v1, k2, v2, ... (non-empty, even length).
--   Now: TIME.
--   Replies: {1,"OK","<pairs written>"}
--   Errors (nothing written on any): invalid_input (empty or odd ARGV, a key or value over its
--     size bound, more than Bounds.TAGS tags on the execution afterwards), execution_not_found,
--     invalid_tag_key (detail = key).
--   Writes: tags (HSET), core last_mutation_at.
local function set_execution_tags(keys, argv)
  if #argv == 0 or #argv % 2 == 1 then
    return Reply.err('invalid_input', 'tags must be non-empty even-length key/value pairs')
  end
  if redis.call('EXISTS', keys[1]) == 0 then
    return Reply.err('execution_not_found')
  end
  local new = 0
  for i = 1, #argv, 2 do
    local terr = Create.tag_error(argv[i], argv[i + 1])
    if terr then
      return terr
    end
    if redis.call('HEXISTS', keys[2], argv[i]) == 0 then
      new = new + 1
    end
  end
  local total = redis.call('HLEN', keys[2]) + new
  if total > Bounds.TAGS then
    return Create.too_many_tags(total)
  end
  for i = 1, #argv, 2 do
    redis.call('HSET', keys[2], argv[i], argv[i + 1])
  end
  redis.call('HSET', keys[1], 'last_mutation_at', Util.num(Util.now_ms()))
  return Reply.ok(tostring(#argv / 2))
end

redis.register_function('ff_set_execution_tags', set_execution_tags)

-- -------------------------------------------------------------------------------------------
-- Owner transitions and terminal operations (docs/lifecycle.md).
--
-- KEYS marked (*) are declared for routing only and never read: the function builds that key
-- from the tag of KEYS[1] and core fields (docs/architecture.md#keys-built-inside-lua), because the
-- holder, lane or
-- attempt index a caller pre-reads may be stale. Pass the real key or the placeholder
-- ff:noop:{p}. Fenced functions take ARGV 2-4 = lease_id, lease_epoch, attempt_id.
-- -------------------------------------------------------------------------------------------

-- Shared validation of complete/fail/delay/move: numeric epoch, core, fence resolution (an
-- unfenced operator_override gets the server-side fence), then docs/lifecycle.md#leases-and-fencing
-- with marking: an
-- expired lease is marked and that write is kept behind the lease_expired reply.
-- A call that finds the execution no longer active first asks `replay(x)` whether its own outcome
-- already committed (docs/lifecycle.md#replays): a reply there is returned instead of
-- execution_not_active. Returns x (x.now set; x.fresh: nothing written yet, so the core
-- snapshot stands in for the previous state) or nil plus the reply to return.
local OWNER_ARGV = {{3, 'lease_epoch', 'int?'}}

local function owner_mutation(keys, argv, history_key, source, replay)
  local _, e1 = Argv.parse(argv, OWNER_ARGV)
  if e1 then
    return nil, e1
  end
  local x = State.load_exec(keys, argv)
  if not x then
    return nil, Reply.err('execution_not_found')
  end
  local fence, ferr = Lease.resolve_fence(x.core, argv[2], argv[3], argv[4], source, true)
  if not fence then
    return nil, ferr
  end
  if x.core.lifecycle_phase ~= 'active' and argv[2] ~= '' then
    local again = replay(x)
    if again then
      return nil, again
    end
  end
  x.history = history_key
  x.now = Util.now_ms()
  local lerr = Lease.check(x, fence, x.now, true)
  if lerr then
    return nil, lerr
  end
  x.fresh = true
  return x
end

-- ff_complete_execution
--   KEYS (12): 1 core, 2 attempt hash (*), 3 lease_expiry, 4 holder's worker leases (*),
--     5 lane terminal (*), 6 lease current (unused), 7 lease history, 8 lane active (*),
--     9 stream meta (*), 10 result, 11 attempt_timeout, 12 execution_deadline.
--   ARGV (7): 1 execution_id, 2 lease_id, 3 lease_epoch, 4 attempt_id, 5 result_payload (bytes,
--     stored verbatim; "" = none), 6 source ("" = operator_override), 7 result_encoding.
--   Now: TIME.
--   Replies: {1,"OK","completed"}
--     | {1,"ALREADY_SATISFIED","replayed","completed"}: a retry of this fence's own committed
--       completion (terminal success, same attempt id, core epoch and attempt hash lease id and
--       epoch = the fence); nothing written.
--   Errors (in order): invalid_input (lease_epoch), execution_not_found, partial_fence_triple,
--     fence_required (unfenced without operator_override), execution_not_active (enriched:
--     terminal_outcome, current_lease_epoch, lifecycle_phase, current_attempt_id),
--     lease_revoked, lease_expired (mark_expired kept), stale_lease.
--   Writes: core terminal success vector, completed_at, result_encoding, lease mirror cleared
--     (one HSET; the previous state is the core as read, not read again); ZREM attempt_timeout
--     unless the core's attempt_timeout_at is "0", ZREM execution_deadline only with an
--     execution_deadline_at; ZADD lane terminal; PUBLISH ff:dag:completions (flow member);
--     attempt ended_success, ended_at (its state not read again: the core says running); stream
--     meta closed attempt_success (its stream_closed event is the state_changed one: one
--     SPUBLISH); SET result when non-empty; lease release (ZREM lease_expiry, lane active, SREM
--     holder's lease set, history `released` reason completed).
local function complete_replay(argv)
  return function(x)
    local c = x.core
    if c.lifecycle_phase == 'terminal' and c.terminal_outcome == 'success'
        and c.current_attempt_id == argv[4]
        and Lease.made_by(x, argv[2], argv[3], argv[4], c.current_attempt_index) then
      return Reply.already('replayed', 'completed')
    end
  end
end

local function complete_execution(keys, argv)
  local x, e = owner_mutation(keys, argv, keys[7], argv[6], complete_replay(argv))
  if not x then
    return e
  end
  x.lease, x.lease_expiry, x.attempt_timeout, x.deadline = keys[6], keys[3], keys[11], keys[12]
  local idx, now = x.core.current_attempt_index, x.now
  -- The result first: the terminal transition resolves a flow member's edges, and a
  -- data-passing edge copies this result into the child (docs/flows.md#resolution).
  if argv[5] ~= '' then
    redis.call('SET', keys[10], argv[5])
  end
  Terminal.transition(x, 'success', now, Lease.cleared({result_encoding = argv[7] or ''}), true)
  if Attempt.finish(x, idx, 'ended_success', {}, now) then
    Stream.close(x, idx, 'attempt_success', now, false)
  end
  Lease.release(x, 'completed', now)
  return Reply.ok('completed')
end

redis.register_function('ff_complete_execution', complete_execution)

-- ff_complete_executions (docs/lifecycle.md#batched-functions)
--   KEYS (12n), ARGV (2+7n): ARGV 1 = 12, 2 = 7, then n items each with the KEYS and ARGV of
--     ff_complete_execution, all on one partition.
--   Replies: the list of the items' ff_complete_execution replies, in order, each item completed
--     on its own (errors and replays included); invalid_input when the counts do not match.
redis.register_function('ff_complete_executions', function(keys, argv)
  return Util.each_item(keys, argv, complete_execution)
end)

-- The retry policy: ARGV retry_policy_json when non-empty, else the stored policy's
-- retry_policy. Anything that is not a JSON object means "no retries".
local function retry_policy_of(x, json)
  local rp
  if json ~= nil and json ~= '' then
    rp = Util.decode_json(json)
  else
    rp = Policy.stored(x).retry_policy
  end
  if type(rp) ~= 'table' then
    return nil
  end
  return rp
end

local function json_number(v, default)
  if type(v) == 'number' then
    return v
  end
  return default
end

-- Backoff before the next attempt (docs/lifecycle.md#execution-policy), from the retry_count before
-- the increment.
local function backoff_ms(rp, retry_count)
  local b = rp.backoff
  if b == nil or b == cjson.null then
    b = {type = 'exponential'}
  end
  if type(b) ~= 'table' then
    return 1000
  end
  if b.type == 'exponential' then
    local initial = json_number(b.initial_delay_ms, 1000)
    local max = json_number(b.max_delay_ms, 60000)
    local mult = json_number(b.multiplier, 2.0)
    -- a policy stored before the schema check may hold anything: never past the horizon
    return math.floor(math.min(initial * mult ^ retry_count, max, Bounds.HORIZON_MS))
  elseif b.type == 'fixed' then
    return math.floor(math.min(json_number(b.delay_ms, 1000), Bounds.HORIZON_MS))
  end
  return 1000
end

-- Retry iff a policy exists, retry_count < max_retries (default 3) and, when
-- retryable_categories is non-empty, the category is listed (a project decision).
local function retry_allowed(rp, retry_count, category)
  if not rp or retry_count >= Policy.int(rp, 'max_retries', 3) then
    return false
  end
  local cats = rp.retryable_categories
  if type(cats) ~= 'table' or #cats == 0 then
    return true
  end
  for _, v in ipairs(cats) do
    if v == category then
      return true
    end
  end
  return false
end

-- ff_fail_execution
--   KEYS (12): 1 core, 2 attempt hash (*), 3 lease_expiry, 4 holder's worker leases (*),
--     5 lane terminal (*), 6 lane delayed (*), 7 lease current, 8 lease history,
--     9 lane active (*), 10 stream meta (*), 11 attempt_timeout, 12 execution_deadline.
--   ARGV (10): 1 execution_id, 2 lease_id, 3 lease_epoch, 4 attempt_id, 5 failure_reason,
--     6 failure_category, 7 retry_policy_json ("" = read retry_policy from the stored policy
--     ff:exec:{p}:<eid>:policy, built from the tag; a stored one that is absent or not an object
--     = no retries),
--     8 source ("" = operator_override), 9 retry_after_ms ("" = none; else the retry policy is
--     the stored retry_policy, or {max_retries = 3} without one, with a fixed backoff of that
--     many ms; given together with a non-empty retry_policy_json: invalid_input),
--     10 failure_details (free text, at most Bounds.FAILURE_DETAILS_BYTES; "" = none).
--   Now: TIME.
--   Replies: {1,"OK","retry_scheduled",delay_until,next_attempt_index} | {1,"OK","terminal_failed"}
--     | {1,"ALREADY_SATISFIED","replayed","retry_scheduled",delay_until,next_attempt_index}
--     | {1,"ALREADY_SATISFIED","replayed","terminal_failed"}: a retry of this fence's own
--       committed failure (same failure_reason; retry: still in its retry backoff, no lease
--       since, the failed attempt's hash holding the fence; terminal: failed, same attempt id,
--       core epoch and attempt hash = the fence); nothing written.
--   Errors: invalid_input (lease_epoch, retry_after_ms over Bounds.HORIZON_MS), invalid_policy_json
--     (retry_policy_json malformed or off the retry_policy schema of include/policy.lua), then as
--     ff_complete_execution.
--   Writes (both): attempt ended_failure, ended_at, failure_reason, failure_category,
--     failure_details; stream meta closed attempt_failure (its event is the call's
--     state_changed); lease release (history `released`).
--     Retry: core retry vector ("retry backoff until <ts> (attempt <idx> failed: <reason>)"),
--     pending_retry_reason, pending_previous_attempt_index, retry_count+1,
--     current_attempt_id="", lease mirror cleared, delay_until, failure_reason;
--     ZADD lane delayed at delay_until (execution_deadline entry kept); release reason
--     failed_retry_scheduled. Terminal: docs/lifecycle.md#terminal-transitions with failed (ZADD
--     lane terminal,
--     ff:dag:completions), failure_reason; release reason failed_terminal.
local FAIL_ARGV = {{9, 'retry_after_ms', 'int?', min = 0, max = Bounds.HORIZON_MS}}
local FAILURE_DETAILS = 10

local function fail_replay(argv)
  return function(x)
    local c = x.core
    if (c.failure_reason or '') ~= argv[5] then
      return nil
    elseif c.lifecycle_phase == 'terminal' then
      if c.terminal_outcome == 'failed' and c.current_attempt_id == argv[4]
          and Lease.made_by(x, argv[2], argv[3], argv[4], c.current_attempt_index) then
        return Reply.already('replayed', 'terminal_failed')
      end
    elseif c.lifecycle_phase == 'runnable' and c.eligibility_state == 'not_eligible_until_time'
        and c.blocking_reason == 'waiting_for_retry_backoff' and not Util.is_set(c.current_attempt_id)
        and Lease.made_by(x, argv[2], argv[3], argv[4], c.pending_previous_attempt_index) then
      return Reply.already('replayed', 'retry_scheduled', c.delay_until or '',
        c.total_attempt_count or '0')
    end
  end
end

-- The retry_after_ms policy: the stored retry_policy (or {max_retries = 3}) with a fixed backoff.
local function retry_after_policy(x, ms)
  local rp = Policy.stored(x).retry_policy
  local out = {}
  if type(rp) == 'table' then
    for k, v in pairs(rp) do
      out[k] = v
    end
  else
    out.max_retries = 3
  end
  out.backoff = {type = 'fixed', delay_ms = ms}
  return out
end

local function fail_execution(keys, argv)
  local a, e1 = Argv.parse(argv, FAIL_ARGV)
  if not a then
    return e1
  end
  local details = argv[FAILURE_DETAILS] or ''
  if #details > Bounds.FAILURE_DETAILS_BYTES then
    return Reply.err('invalid_input', 'failure_details over Bounds.FAILURE_DETAILS_BYTES')
  end
  if a.retry_after_ms and argv[7] ~= '' then
    return Reply.err('invalid_input', 'retry_after_ms and retry_policy_json are mutually exclusive')
  end
  if argv[7] ~= '' then
    local rp = Util.decode_json(argv[7])
    if type(rp) ~= 'table' then
      return Reply.err('invalid_policy_json', 'malformed')
    end
    local perr = Policy.check(rp, Policy.RETRY_SCHEMA, 'retry_policy')
    if perr then
      return perr
    end
  end
  local x, e = owner_mutation(keys, argv, keys[8], argv[8], fail_replay(argv))
  if not x then
    return e
  end
  x.lease, x.lease_expiry, x.attempt_timeout, x.deadline = keys[7], keys[3], keys[11], keys[12]
  local c, now = x.core, x.now
  local idx, reason, category = c.current_attempt_index or '', argv[5], argv[6]
  local retry_count = tonumber(c.retry_count or '0') or 0
  local rp
  if a.retry_after_ms then
    rp = retry_after_policy(x, a.retry_after_ms)
  else
    rp = retry_policy_of(x, argv[7])
  end
  local retry = retry_allowed(rp, retry_count, category)
  local delay_until
  if retry then
    delay_until = now + backoff_ms(rp, retry_count)
    State.write_vector(keys[1], x.eid, {'runnable', 'unowned', 'not_eligible_until_time',
      'waiting_for_retry_backoff', 'retry backoff until ' .. Util.num(delay_until) .. ' (attempt '
      .. idx .. ' failed: ' .. reason .. ')', 'none', 'pending_retry_attempt'}, now,
      Lease.cleared({pending_retry_reason = reason, pending_previous_attempt_index = idx,
        retry_count = Util.num(retry_count + 1), current_attempt_id = '',
        delay_until = Util.num(delay_until), failure_reason = reason}), c)
    x.announced = true
  else
    Terminal.transition(x, 'failed', now, Lease.cleared({failure_reason = reason}), true)
  end
  if Attempt.finish(x, idx, 'ended_failure', {'failure_reason', reason,
      'failure_category', category, 'failure_details', details}, now) then
    Stream.close(x, idx, 'attempt_failure', now, false)
  end
  if not retry then
    Lease.release(x, 'failed_terminal', now)
    return Reply.ok('terminal_failed')
  end
  Lease.release(x, 'failed_retry_scheduled', now)
  -- Lane index built from core.lane_id on the tag of KEYS[1]
  -- (docs/architecture.md#keys-built-inside-lua).
  redis.call('ZADD', Keys.lane(x.tag, c.lane_id, 'delayed'), Util.num(delay_until), x.eid)
  return Reply.ok('retry_scheduled', Util.num(delay_until), c.total_attempt_count or '0')
end

redis.register_function('ff_fail_execution', fail_execution)

-- Pauses the current attempt (delay, waiting for children): it is not ended, and resumes on the
-- same attempt through claim_resumed_execution.
local function pause_attempt(x, suspension_id, now)
  local idx = x.core.current_attempt_index
  if not Util.is_set(idx) then
    return
  end
  local key = Keys.attempt(x.tag, x.eid, idx)
  if redis.call('HGET', key, 'attempt_state') == 'started' then
    redis.call('HSET', key, 'attempt_state', 'suspended', 'suspended_at', Util.num(now),
      'suspension_id', suspension_id)
  end
end

-- ff_delay_execution (worker self-delay)
--   KEYS (9): 1 core, 2 attempt hash (*), 3 lease current, 4 lease history, 5 lease_expiry,
--     6 holder's worker leases (*), 7 lane active (*), 8 lane delayed (*), 9 attempt_timeout.
--   ARGV (6): 1 execution_id, 2 lease_id, 3 lease_epoch, 4 attempt_id, 5 delay_until (ms;
--     required), 6 source ("" = operator_override).
--   Now: TIME.
--   Replies: {1,"OK",delay_until}
--     | {1,"ALREADY_SATISFIED","replayed",delay_until}: a retry of this fence's own committed
--       delay (still delayed by the worker until the same delay_until, same attempt id, core
--       epoch and attempt hash = the fence); nothing written.
--   Errors: invalid_input (delay_until: not a number, or more than Bounds.HORIZON_MS after now;
--     lease_epoch), then as ff_complete_execution.
--   Writes: core worker-delay vector (not_eligible_until_time / waiting_for_delay,
--     "delayed until <ts>", attempt_interrupted), delay_until, lease mirror cleared (attempt id
--     and epoch kept); attempt suspended, suspended_at, suspension_id=worker_delay; lease release
--     reason worker_delay; ZADD lane delayed at delay_until. The stream stays open.
local DELAY_ARGV = {{5, 'delay_until', 'int', min = 0, max = Bounds.TIMESTAMP_MS}}

local function delay_execution(keys, argv)
  local a, e1 = Argv.parse(argv, DELAY_ARGV)
  if not a then
    return e1
  end
  local delay_until = a.delay_until
  local herr = Bounds.past_horizon('delay_until', delay_until, Util.now_ms())
  if herr then
    return herr
  end
  local function replay(x)
    local c = x.core
    if c.lifecycle_phase == 'runnable' and c.eligibility_state == 'not_eligible_until_time'
        and c.blocking_reason == 'waiting_for_delay' and c.delay_until == Util.num(delay_until)
        and c.current_attempt_id == argv[4]
        and Lease.made_by(x, argv[2], argv[3], argv[4], c.current_attempt_index) then
      return Reply.already('replayed', Util.num(delay_until))
    end
  end
  local x, e = owner_mutation(keys, argv, keys[4], argv[6], replay)
  if not x then
    return e
  end
  x.lease, x.lease_expiry, x.attempt_timeout = keys[3], keys[5], keys[9]
  local now = x.now
  State.write_vector(keys[1], x.eid, {'runnable', 'unowned', 'not_eligible_until_time',
    'waiting_for_delay', 'delayed until ' .. Util.num(delay_until), 'none', 'attempt_interrupted'},
    now, Lease.cleared({delay_until = Util.num(delay_until)}))
  pause_attempt(x, 'worker_delay', now)
  Lease.release(x, 'worker_delay', now)
  -- Lane index built from core.lane_id on the tag of KEYS[1]
  -- (docs/architecture.md#keys-built-inside-lua).
  redis.call('ZADD', Keys.lane(x.tag, x.core.lane_id, 'delayed'), Util.num(delay_until), x.eid)
  return Reply.ok(Util.num(delay_until))
end

redis.register_function('ff_delay_execution', delay_execution)

-- ff_move_to_waiting_children
--   KEYS (9): 1 core, 2 attempt hash (*), 3 lease current, 4 lease history, 5 lease_expiry,
--     6 holder's worker leases (*), 7 lane active (*), 8 lane blocked:dependencies (*),
--     9 attempt_timeout.
--   ARGV (5): 1 execution_id, 2 lease_id, 3 lease_epoch, 4 attempt_id, 5 source
--     ("" = operator_override).
--   Now: TIME.
--   Replies: {1,"OK"}
--     | {1,"ALREADY_SATISFIED","replayed"}: a retry of this fence's own committed move (still
--       waiting for children, same attempt id, core epoch and attempt hash = the fence);
--       nothing written.
--   Errors: as ff_complete_execution.
--   Writes: core waiting-for-children vector (blocked_by_dependencies / waiting_for_children,
--     "waiting for child executions to complete", attempt_interrupted), lease mirror cleared;
--     attempt suspended, suspended_at, suspension_id=waiting_children; lease release reason
--     waiting_children; ZADD lane blocked:dependencies at created_at.
local function children_replay(argv)
  return function(x)
    local c = x.core
    if c.lifecycle_phase == 'runnable' and c.eligibility_state == 'blocked_by_dependencies'
        and c.blocking_reason == 'waiting_for_children' and c.current_attempt_id == argv[4]
        and Lease.made_by(x, argv[2], argv[3], argv[4], c.current_attempt_index) then
      return Reply.already('replayed')
    end
  end
end

local function move_to_waiting_children(keys, argv)
  local x, e = owner_mutation(keys, argv, keys[4], argv[5], children_replay(argv))
  if not x then
    return e
  end
  x.lease, x.lease_expiry, x.attempt_timeout = keys[3], keys[5], keys[9]
  local now = x.now
  State.write_vector(keys[1], x.eid, {'runnable', 'unowned', 'blocked_by_dependencies',
    'waiting_for_children', 'waiting for child executions to complete', 'none',
    'attempt_interrupted'}, now, Lease.cleared({}))
  pause_attempt(x, 'waiting_children', now)
  Lease.release(x, 'waiting_children', now)
  -- Lane index built from core.lane_id on the tag of KEYS[1]
  -- (docs/architecture.md#keys-built-inside-lua).
  redis.call('ZADD', Keys.lane(x.tag, x.core.lane_id, 'blocked:dependencies'),
    x.core.created_at or Util.num(now), x.eid)
  return Reply.ok()
end

redis.register_function('ff_move_to_waiting_children', move_to_waiting_children)

-- Cancel by a non-override source of an active execution (docs/lifecycle.md#cancel, the project's
-- own rows included),
-- in the order of docs/lifecycle.md#leases-and-fencing: revoked, no lease id, expired (not marked),
-- stale fence.
local function holder_may_cancel(c, lease_id, epoch, attempt_id, now)
  if Lease.is_revoked(c) then
    return Reply.err('lease_revoked')
  elseif lease_id == '' then
    return Reply.err('fence_required')
  elseif Lease.is_expired(c, now) then
    return Reply.err('lease_expired')
  elseif lease_id ~= (c.current_lease_id or '')
      or (epoch ~= '' and tonumber(epoch) ~= tonumber(c.current_lease_epoch or ''))
      or (attempt_id ~= '' and attempt_id ~= (c.current_attempt_id or '')) then
    return Reply.err('stale_lease')
  end
  return nil
end

-- ff_cancel_execution
--   KEYS (21): 1 core, 2 attempt hash (*), 3 stream meta (*), 4 lease current, 5 lease history,
--     6 lease_expiry, 7 holder's worker leases (*), 8 suspension current, 9 waitpoint hash (*),
--     10 waitpoint condition (*), 11 suspension_timeout, 12 lane terminal (*),
--     13 attempt_timeout, 14 execution_deadline, 15 lane eligible (*), 16 lane delayed (*),
--     17 lane blocked:dependencies (*), 18 lane blocked:budget (*), 19 lane blocked:quota (*),
--     20 lane blocked:route (*), 21 lane blocked:operator (*). Lane active and suspended are
--     built too; waitpoint keys come from core.current_waitpoint_id.
--   ARGV (6): 1 execution_id, 2 reason, 3 source ("" = operator_override; flow_cascade
--     suppresses the completion publish), 4 lease_id, 5 lease_epoch, 6 attempt_id.
--   Now: TIME.
--   Replies: {1,"OK","cancelled",<previous lifecycle_phase>}
--     | {1,"ALREADY_SATISFIED","replayed","cancelled"}: a retry of this fence's own committed
--       cancel (a full fence and a source other than operator_override; cancelled by that
--       source, same attempt id, core epoch and attempt hash = the fence); nothing written.
--   Errors (in order): invalid_input (lease_epoch), execution_not_found, execution_not_active
--     (already terminal; enriched). Active and source != operator_override: lease_revoked,
--     fence_required (no lease_id), lease_expired (not marked), stale_lease (lease_id, or a
--     given epoch / attempt_id, differs).
--   Writes: core terminal cancelled vector, completed_at, cancellation_reason, cancelled_by,
--     lease mirror and suspension pointers cleared; ZADD lane terminal; ff:dag:completions
--     (flow member, not flow_cascade); an open attempt (active, suspended, or paused while
--     runnable) ended_cancelled, failure_reason "cancelled: <reason>", its stream meta closed
--     attempt_cancelled + stream_closed event; active: lease release (history `released`,
--     reason cancelled); suspended: suspension closed_at/close_reason=cancelled, waitpoint
--     state=closed, condition closed=1 (reason cancelled); the id leaves every other index of
--     its lane and partition and the holder's lease set.
local CANCEL_ARGV = {{5, 'lease_epoch', 'int?'}}

local function cancel_execution(keys, argv)
  local _, e1 = Argv.parse(argv, CANCEL_ARGV)
  if e1 then
    return e1
  end
  local x = State.load_exec(keys, argv)
  if not x then
    return Reply.err('execution_not_found')
  end
  local c = x.core
  local phase = c.lifecycle_phase
  local source = Lease.source_of(argv[3])
  if phase == 'terminal' then
    if source ~= 'operator_override' and c.terminal_outcome == 'cancelled'
        and c.cancelled_by == source and c.current_attempt_id == argv[6]
        and Lease.made_by(x, argv[4], argv[5], argv[6], c.current_attempt_index) then
      return Reply.already('replayed', 'cancelled')
    end
    return Reply.not_active(c)
  end
  local now = Util.now_ms()
  if phase == 'active' and source ~= 'operator_override' then
    local cerr = holder_may_cancel(c, argv[4], argv[5], argv[6], now)
    if cerr then
      return cerr
    end
  end
  x.lease, x.history, x.lease_expiry = keys[4], keys[5], keys[6]
  x.attempt_timeout, x.deadline = keys[13], keys[14]
  Cancel.apply(x, keys[8], argv[2], source, now)
  return Reply.ok('cancelled', phase or '')
end

redis.register_function('ff_cancel_execution', cancel_execution)

-- ff_update_progress (class B)
--   KEYS (1): 1 core.
--   ARGV (5): 1 execution_id, 2 lease_id, 3 lease_epoch, 4 progress_pct (0..100, "" = keep),
--     5 progress_message ("" = keep).
--   Now: TIME.
--   Replies: {1,"OK"}
--   Errors (in order): invalid_input (lease_epoch, progress_pct), execution_not_found,
--     execution_not_active (enriched), lease_revoked, lease_expired (not marked), stale_lease
--     (lease_id or epoch differ; attempt_id is not checked).
--   Writes: core progress_pct / progress_message (those given), progress_updated_at,
--     last_mutation_at; SPUBLISH progress on ff:exec_events:{p}.
local PROGRESS_ARGV = {
  {3, 'lease_epoch', 'int?'},
  {4, 'progress_pct', 'int?', min = 0, max = 100, says = 'be between 0 and 100'},
}

local function update_progress(keys, argv)
  local a, e1 = Argv.parse(argv, PROGRESS_ARGV)
  if not a then
    return e1
  end
  local pct = a.progress_pct
  local x = State.load_exec(keys, argv)
  if not x then
    return Reply.err('execution_not_found')
  end
  local c = x.core
  local now = Util.now_ms()
  if c.lifecycle_phase ~= 'active' then
    return Reply.not_active(c)
  elseif Lease.is_revoked(c) then
    return Reply.err('lease_revoked')
  elseif Lease.is_expired(c, now) then
    return Reply.err('lease_expired')
  elseif argv[2] ~= (c.current_lease_id or '')
      or tonumber(argv[3]) ~= tonumber(c.current_lease_epoch or '') then
    return Reply.err('stale_lease')
  end
  local args = {'HSET', keys[1], 'progress_updated_at', Util.num(now), 'last_mutation_at', Util.num(now)}
  if pct then
    args[#args + 1] = 'progress_pct'
    args[#args + 1] = Util.num(pct)
  end
  if argv[5] ~= nil and argv[5] ~= '' then
    args[#args + 1] = 'progress_message'
    args[#args + 1] = argv[5]
  end
  redis.call(unpack(args))
  -- wakes WatchExecution, which re-reads and sends the progress (docs/lifecycle.md#priority-and-progress)
  redis.call('SPUBLISH', 'ff:exec_events:' .. Util.tag_of(keys[1]), cjson.encode({
    type = 'progress', execution_id = argv[1], at = now,
  }))
  return Reply.ok()
end

redis.register_function('ff_update_progress', update_progress)

local EXPIRE_REASONS = {attempt_timeout = true, execution_deadline = true}

-- ff_expire_execution (attempt-timeout and execution-deadline scanners)
--   KEYS (14): 1 core, 2 attempt hash (*), 3 stream meta (*), 4 lease current, 5 lease history,
--     6 lease_expiry, 7 worker leases (*), 8 lane active (*), 9 lane terminal (*),
--     10 attempt_timeout, 11 execution_deadline, 12 lane suspended (*), 13 suspension_timeout,
--     14 suspension current.
--   ARGV (2): 1 execution_id, 2 expire_reason (attempt_timeout | execution_deadline;
--     "" = attempt_timeout).
--   Now: TIME.
--   Replies: {1,"OK","expired",<previous lifecycle_phase>}
--     | {1,"OK","not_found_cleaned"} | {1,"OK","already_terminal"} (both ZREM both timeout
--       indexes; -> AlreadyTerminal)
--     | {1,"ALREADY_SATISFIED","not_due"}: the reason's index entry is gone or not yet due
--       (the execution moved on between scan and call); nothing written.
--   Errors: invalid_input (expire_reason).
--   Writes: core terminal expired vector, completed_at, failure_reason=<reason>, lease mirror
--     and suspension pointers cleared; ZADD lane terminal; ff:dag:completions (flow member);
--     an open attempt (active, suspended, or paused while runnable) ended_failure with
--     failure_reason=<reason>, its stream meta closed `expired` + stream_closed event;
--     active: lease release (history `released`, reason expired:<reason>); suspended:
--     suspension closed_at/close_reason=expired:<reason>, waitpoint state=closed and condition
--     closed=1 (reason expired); the id leaves every other index of its lane and partition and
--     the holder's lease set.
local function expire_execution(keys, argv)
  local reason = argv[2]
  if reason == nil or reason == '' then
    reason = 'attempt_timeout'
  end
  if not EXPIRE_REASONS[reason] then
    return Reply.err('invalid_input',
      'expire_reason must be attempt_timeout or execution_deadline, got: ' .. reason)
  end
  local x = State.load_exec(keys, argv)
  if not x or x.core.lifecycle_phase == 'terminal' then
    redis.call('ZREM', keys[10], argv[1])
    redis.call('ZREM', keys[11], argv[1])
    return Reply.ok(x and 'already_terminal' or 'not_found_cleaned')
  end
  local c = x.core
  local now = Util.now_ms()
  local index = keys[10]
  if reason == 'execution_deadline' then
    index = keys[11]
  end
  local due = tonumber(redis.call('ZSCORE', index, x.eid) or '')
  if not due or due > now then
    return Reply.already('not_due')
  end
  x.lease, x.history, x.lease_expiry = keys[4], keys[5], keys[6]
  x.attempt_timeout, x.deadline = keys[10], keys[11]
  local phase, idx = c.lifecycle_phase, c.current_attempt_index
  Terminal.transition(x, 'expired', now, Lease.cleared({failure_reason = reason,
    current_suspension_id = '', current_waitpoint_id = ''}), true)
  if (phase ~= 'runnable' or c.attempt_state == 'attempt_interrupted')
      and Attempt.finish(x, idx, 'ended_failure', {'failure_reason', reason}, now) then
    Stream.close(x, idx, 'expired', now, false)
  end
  if phase == 'active' then
    Lease.release(x, 'expired:' .. reason, now)
  elseif phase == 'suspended' then
    Terminal.close_suspension(x, keys[14], 'expired:' .. reason, 'expired', now)
  end
  Terminal.remove_from_indexes(x, 'terminal')
  return Reply.ok('expired', phase or '')
end

redis.register_function('ff_expire_execution', expire_execution)

-- For a skipped flow member: the given inbound edges now `impossible` (to reopen) and the
-- number of edges unsatisfied after reopening them (deps:unresolved plus the reopened ones).
-- Keys built from the execution id on the tag of KEYS[1]
-- (docs/architecture.md#keys-built-inside-lua).
local function edges_to_reopen(x, argv)
  local reopen, pending, n = {}, {}, 0
  for _, m in ipairs(redis.call('SMEMBERS', Keys.exec(x.tag, x.eid, 'deps:unresolved'))) do
    pending[m] = true
  end
  for i = 3, #argv do
    local edge = argv[i]
    if redis.call('HGET', Keys.exec(x.tag, x.eid, 'dep:' .. edge), 'state') == 'impossible' then
      reopen[#reopen + 1] = edge
      pending[edge] = true
    end
  end
  for _ in pairs(pending) do
    n = n + 1
  end
  return reopen, n
end

local function reopen_edges(x, reopen, n, now)
  local unresolved = Keys.exec(x.tag, x.eid, 'deps:unresolved')
  for _, edge in ipairs(reopen) do
    redis.call('HSET', Keys.exec(x.tag, x.eid, 'dep:' .. edge), 'state', 'unsatisfied',
      'last_resolved_at', '')
    redis.call('SADD', unresolved, edge)
  end
  redis.call('HSET', Keys.exec(x.tag, x.eid, 'deps:meta'), 'unsatisfied_required_count', Util.num(n),
    'impossible_required_count', '0', 'last_dependency_update_at', Util.num(now))
end

-- ff_replay_execution
--   KEYS (4, or 7+n for a skipped flow member): 1 core, 2 lane terminal (*), 3 lane eligible (*),
--     4 lease history; optional 5 lane blocked:dependencies (*), 6 deps:meta (*),
--     7 deps:unresolved (*), 8.. dep:<edge_i> (*). Deps keys are built from the execution id.
--   ARGV (2+n): 1 execution_id, 2 now_ms (unused), 3.. inbound edge ids (a skipped flow
--     member's `in:<eid>` set, pre-read by the server; otherwise none).
--   Reads: the stored policy (built from the tag) for max_replay_count (default 10).
--   Now: TIME.
--   Replies: {1,"OK",public_state}   (waiting, or waiting_children for a skipped member)
--   Errors: execution_not_found, execution_not_terminal, max_replays_exhausted.
--   Writes: core replayed vector (pending_replay_attempt), replay_count+1, completed_at="",
--     pending_previous_attempt_index=current_attempt_index, pending reasons cleared,
--     failure_reason, cancellation_reason, cancelled_by, result_encoding, skip provenance
--     (skipped_by_edge, skipped_by_upstream, skipped_upstream_outcome) cleared, retry_count
--     and lease_reclaim_count reset to 0; DEL result; ZREM lane terminal; history
--     `replay_initiated` (replay_count, replay_type). Normal: ZADD lane eligible at
--     -(priority x 10^12) + created_at, replay_type=normal. Skipped flow member with n > 0
--     unsatisfied edges after reopening: each given `impossible` edge -> unsatisfied
--     (last_resolved_at="", SADD deps:unresolved), deps:meta unsatisfied_required_count=n,
--     impossible_required_count=0, last_dependency_update_at; core blocked_by_dependencies /
--     waiting_for_children "<n> dep(s) unsatisfied after replay"; ZADD lane
--     blocked:dependencies at created_at; replay_type=skipped_flow_member.
local function replay_execution(keys, argv)
  local x = State.load_exec(keys, argv)
  if not x then
    return Reply.err('execution_not_found')
  end
  local c = x.core
  if c.lifecycle_phase ~= 'terminal' then
    return Reply.err('execution_not_terminal')
  end
  local refused = Replay.refused(x)
  if refused then
    return refused
  end
  local reopen, n = {}, 0
  if c.terminal_outcome == 'skipped' and Util.is_set(c.flow_id) then
    reopen, n = edges_to_reopen(x, argv)
  end
  local now = Util.now_ms()
  local public = Replay.reset(x, n, (n > 0 and 'skipped_flow_member') or 'normal', now)
  if n > 0 then
    reopen_edges(x, reopen, n, now)
  end
  return Reply.ok(public)
end

redis.register_function('ff_replay_execution', replay_execution)
