-- helpers.lua: local helpers shared by every domain file. Nothing here is FCALL-able.
--
-- Conventions (spec 00 §8):
--   * Replies: {1, "OK", ...} success; {1, "ALREADY_SATISFIED", reason, ...} idempotent no-op;
--     {1, "DUPLICATE", id} dedup hit; {0, "<error_code>", detail...} failure.
--   * "now" is always the Valkey clock (TIME), never an ARGV value, unless a function's header
--     says otherwise.
--   * Every key a function touches shares the hash tag of KEYS[1]. Keys a function builds at run
--     time reuse that tag (tag_of(KEYS[1])), so every call stays single-slot on Valkey Cluster.
--   * No rollback: validate everything before the first write.

local function ok(...)
  return {1, 'OK', ...}
end

local function err(code, ...)
  return {0, code, ...}
end

local function already(reason, ...)
  return {1, 'ALREADY_SATISFIED', reason, ...}
end

-- Integer to decimal string. Lua's tostring() keeps only 14 significant digits, which corrupts
-- scores like -(priority x 10^12) + created_at; always format integers through this.
local function num(n)
  return string.format('%.0f', n)
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The first {...} of a key: the hash tag every key of one call shares.
local function tag_of(key)
  return string.match(key, '(%b{})')
end

local function is_int(s)
  return type(s) == 'string' and string.match(s, '^%-?%d+$') ~= nil
end

-- Required integer ARGV: nil plus an invalid_input reply when malformed.
local function req_int(name, v)
  if not is_int(v) then
    return nil, err('invalid_input', name .. ' must be a number, got: ' .. tostring(v))
  end
  return tonumber(v), nil
end

-- Optional integer ARGV ("" = unset): returns false when unset.
local function opt_int(name, v)
  if v == nil or v == '' then
    return false, nil
  end
  return req_int(name, v)
end

local function hgetall(key)
  local flat = redis.call('HGETALL', key)
  local m = {}
  for i = 1, #flat, 2 do
    m[flat[i]] = flat[i + 1]
  end
  return m
end

local function hmset(key, m)
  local args = {}
  for k, v in pairs(m) do
    args[#args + 1] = k
    args[#args + 1] = tostring(v)
  end
  if #args > 0 then
    redis.call('HSET', key, unpack(args))
  end
end

local function decode_json(s)
  local okd, v = pcall(cjson.decode, s)
  if not okd then
    return nil
  end
  return v
end

-- Tag keys are reserved for callers: ^[a-z][a-z0-9_]*\.[^.]
local function valid_tag_key(k)
  return type(k) == 'string' and string.match(k, '^[a-z][a-z0-9_]*%.[^.]') ~= nil
end

-- Capability tokens (spec 00 §2): non-empty, no ',', no byte <= 0x20 or 0x7F; <= 256 tokens and a
-- sorted CSV of <= 4096 bytes. `side` is "required" or "worker". Returns the sorted CSV, or nil
-- plus an invalid_capabilities reply.
local function capabilities_csv(side, list)
  if type(list) ~= 'table' then
    return nil, err('invalid_capabilities', side .. ':not_array')
  end
  local seen, toks = {}, {}
  for _, t in ipairs(list) do
    if type(t) ~= 'string' then
      return nil, err('invalid_capabilities', side .. ':non_string_token')
    end
    if t == '' then
      return nil, err('invalid_capabilities', side .. ':empty_token')
    end
    if string.find(t, ',', 1, true) then
      return nil, err('invalid_capabilities', side .. ':comma_in_token')
    end
    if string.find(t, '[%z\1-\32\127]') then
      return nil, err('invalid_capabilities', side .. ':control_or_whitespace')
    end
    if not seen[t] then
      seen[t] = true
      toks[#toks + 1] = t
    end
  end
  if #toks > 256 then
    return nil, err('invalid_capabilities', side .. ':too_many_tokens')
  end
  table.sort(toks)
  local csv = table.concat(toks, ',')
  if #csv > 4096 then
    return nil, err('invalid_capabilities', side .. ':too_many_bytes')
  end
  return csv, nil
end

-- Public state derivation (spec 00 §6.3): the only mapping.
local RUNNABLE_PUBLIC = {
  eligible_now = 'waiting',
  not_eligible_until_time = 'delayed',
  blocked_by_dependencies = 'waiting_children',
  blocked_by_budget = 'rate_limited',
  blocked_by_quota = 'rate_limited',
  blocked_by_route = 'waiting',
  blocked_by_lane_state = 'waiting',
  blocked_by_operator = 'waiting',
}
local TERMINAL_PUBLIC = {
  success = 'completed',
  failed = 'failed',
  cancelled = 'cancelled',
  expired = 'expired',
  skipped = 'skipped',
}

local function public_state_of(phase, eligibility, outcome)
  if phase == 'terminal' then
    return TERMINAL_PUBLIC[outcome] or 'failed'
  elseif phase == 'suspended' then
    return 'suspended'
  elseif phase == 'active' then
    return 'active'
  elseif phase == 'runnable' then
    return RUNNABLE_PUBLIC[eligibility] or 'waiting'
  end
  return 'waiting'
end

-- Writes all six state-vector dimensions, public_state, last_transition_at and last_mutation_at
-- (plus any `extra` fields) in one HSET, then publishes the watch event. Returns public_state.
-- v = {phase, ownership, eligibility, blocking, detail, outcome, attempt}
local function write_vector(core_key, eid, v, now, extra)
  local public = public_state_of(v[1], v[3], v[6])
  local args = {
    'lifecycle_phase', v[1], 'ownership_state', v[2], 'eligibility_state', v[3],
    'blocking_reason', v[4], 'blocking_detail', v[5], 'terminal_outcome', v[6],
    'attempt_state', v[7], 'public_state', public,
    'last_transition_at', num(now), 'last_mutation_at', num(now),
  }
  if extra then
    for k, val in pairs(extra) do
      args[#args + 1] = k
      args[#args + 1] = tostring(val)
    end
  end
  redis.call('HSET', core_key, unpack(args))
  redis.call('SPUBLISH', 'ff:exec_events:' .. tag_of(core_key), cjson.encode({
    type = 'state_changed', execution_id = eid, public_state = public, at = now,
  }))
  return public
end

-- Eligible-set score: highest priority first, then oldest (spec 00 §5.2).
local function eligible_score(priority, created_at)
  return -(priority * 1000000000000) + created_at
end

local function clamp_priority(p)
  if p < 0 then
    return 0
  elseif p > 9000 then
    return 9000
  end
  return p
end

-- Per-execution and per-lane key builders, all on the tag of the caller's first key.
local function exec_key(tag, eid, suffix)
  return 'ff:exec:' .. tag .. ':' .. eid .. ':' .. suffix
end

local function lane_key(tag, lane, which)
  return 'ff:idx:' .. tag .. ':lane:' .. lane .. ':' .. which
end

-- ---------------------------------------------------------------------------------------------
-- Lifecycle helpers (spec 10 §1): keys built at run time, lease history, fencing, expiry,
-- release, terminal effects, attempts and grants. Shared by lease, scheduling and execution.
--
-- Key rule (spec 00 §4 rule 3): the builders below are only ever called with the tag taken from
-- the caller's KEYS[1] (tag_of(KEYS[1])), so every lane index, attempt/stream key, worker lease
-- set or waitpoint key a function builds from core fields hashes to the same slot as its KEYS.
-- ---------------------------------------------------------------------------------------------

local function attempt_key(tag, eid, idx)
  return 'ff:attempt:' .. tag .. ':' .. eid .. ':' .. idx
end

local function stream_meta_key(tag, eid, idx)
  return 'ff:stream:' .. tag .. ':' .. eid .. ':' .. idx .. ':meta'
end

local function partition_key(tag, name)
  return 'ff:idx:' .. tag .. ':' .. name
end

local function worker_leases_key(tag, wiid)
  return 'ff:idx:' .. tag .. ':worker:' .. wiid .. ':leases'
end

local function waitpoint_key(tag, wpid)
  return 'ff:wp:' .. tag .. ':' .. wpid
end

local function is_set(v)
  return v ~= nil and v ~= false and v ~= ''
end

-- Execution context of one call: {tag, eid, core_key, core = HGETALL snapshot taken before any
-- write}; nil when the core does not exist. Functions add the passed keys they use (history,
-- lease, lease_expiry, ...). ARGV[1] names the index members, so it must be the id of KEYS[1]:
-- a mismatch is a malformed call and raises (nothing is written).
local function load_exec(keys, argv)
  local tag = tag_of(keys[1] or '')
  if not tag or keys[1] ~= exec_key(tag, argv[1] or '', 'core') then
    error({err = 'ERR flowfabric: ARGV[1] (execution_id) is not the execution of KEYS[1]'})
  end
  local core = hgetall(keys[1])
  if next(core) == nil then
    return nil
  end
  return {tag = tag, eid = argv[1], core_key = keys[1], core = core}
end

-- One lease-history event, MAXLEN ~ 1000 (spec 00 §5.1). `fields` = flat name/value list.
local function lease_event(key, event, fields, now)
  local args = {'XADD', key, 'MAXLEN', '~', '1000', '*', 'event', event}
  for i = 1, #fields do
    args[#args + 1] = tostring(fields[i] or '')
  end
  args[#args + 1] = 'ts'
  args[#args + 1] = num(now)
  redis.call(unpack(args))
end

-- The lease fields every history event of the current lease carries.
local function lease_fields(c, reason)
  return {'lease_id', c.current_lease_id, 'lease_epoch', c.current_lease_epoch,
    'attempt_index', c.current_attempt_index, 'attempt_id', c.current_attempt_id,
    'worker_id', c.current_worker_id, 'reason', reason}
end

-- Enriched execution_not_active (spec 00 §8.3): lets a caller whose committed call lost its reply
-- recognise its own success (spec 10 §1.4).
local function not_active(c)
  return err('execution_not_active', c.terminal_outcome or '', c.current_lease_epoch or '',
    c.lifecycle_phase or '', c.current_attempt_id or '')
end

-- CancelSource: "" is the contract default, operator_override.
local function source_of(s)
  if s == nil or s == '' then
    return 'operator_override'
  end
  return s
end

-- Fence resolution (spec 00 §8.3): all three set -> checked; all empty -> the server-side fence
-- (the core mirror) when `allow_override` and source is operator_override, else fence_required;
-- mixed -> partial_fence_triple. Returns {lease_id, epoch, attempt_id} or nil plus an error reply.
local function resolve_fence(c, lease_id, epoch, attempt_id, source, allow_override)
  local n = 0
  for _, v in ipairs({lease_id, epoch, attempt_id}) do
    if v ~= '' then
      n = n + 1
    end
  end
  if n == 3 then
    return {lease_id = lease_id, epoch = epoch, attempt_id = attempt_id}
  elseif n > 0 then
    return nil, err('partial_fence_triple')
  elseif allow_override and source_of(source) == 'operator_override' then
    return {lease_id = c.current_lease_id or '', epoch = c.current_lease_epoch or '',
      attempt_id = c.current_attempt_id or ''}
  end
  return nil, err('fence_required')
end

local function lease_is_revoked(c)
  return c.ownership_state == 'lease_revoked' or is_set(c.lease_revoked_at)
end

local function lease_is_expired(c, now)
  local exp = tonumber(c.lease_expires_at or '')
  return c.ownership_state == 'lease_expired_reclaimable' or exp == nil or exp <= now
end

local function fence_matches(c, fence)
  return fence.lease_id == (c.current_lease_id or '')
    and tonumber(fence.epoch) == tonumber(c.current_lease_epoch or '')
    and fence.attempt_id == (c.current_attempt_id or '')
end

-- Closes the stream meta of attempt `idx` if the meta exists (spec 30 §1.4), then publishes
-- stream_closed on ff:exec_events:{p}. `only_if_open`: leave an existing close alone.
local function close_stream(x, idx, reason, now, only_if_open)
  if not is_set(idx) then
    return
  end
  local meta = stream_meta_key(x.tag, x.eid, idx)
  if redis.call('EXISTS', meta) == 0 then
    return
  end
  if only_if_open and is_set(redis.call('HGET', meta, 'closed_at')) then
    return
  end
  redis.call('HSET', meta, 'closed_at', num(now), 'closed_reason', reason)
  redis.call('SPUBLISH', 'ff:exec_events:' .. x.tag, cjson.encode({
    type = 'stream_closed', execution_id = x.eid, attempt_index = tonumber(idx),
    closed_reason = reason, at = now,
  }))
end

-- mark_expired (spec 00 §8.3), idempotent. Needs x.history. Updates the x.core snapshot.
local function mark_expired(x, now)
  local c = x.core
  if c.ownership_state == 'lease_expired_reclaimable' then
    return false
  end
  write_vector(x.core_key, x.eid, {'active', 'lease_expired_reclaimable',
    c.eligibility_state or 'not_applicable', 'waiting_for_worker',
    'lease expired, awaiting reclaim', 'none', 'attempt_interrupted'}, now,
    {lease_expired_at = num(now)})
  lease_event(x.history, 'expired', lease_fields(c, 'lease_expired'), now)
  close_stream(x, c.current_attempt_index, 'lease_expired', now, true)
  c.ownership_state = 'lease_expired_reclaimable'
  c.attempt_state = 'attempt_interrupted'
  return true
end

-- Lease validation of an owner mutation (spec 10 §1.2), in order: not active -> revoked ->
-- expired -> stale. With `mark` (write paths) an expired lease is first marked, and that write is
-- kept behind the lease_expired reply. Returns nil when the fence holds, else the error reply.
local function check_lease(x, fence, now, mark)
  local c = x.core
  if c.lifecycle_phase ~= 'active' then
    return not_active(c)
  end
  if lease_is_revoked(c) then
    return err('lease_revoked')
  end
  if lease_is_expired(c, now) then
    if mark then
      mark_expired(x, now)
    end
    return err('lease_expired')
  end
  if not fence_matches(c, fence) then
    return err('stale_lease')
  end
  return nil
end

-- The lease mirror cleared by every release (spec 10 §1.3); current_lease_epoch always stays.
local LEASE_MIRROR = {
  'current_lease_id', 'current_worker_id', 'current_worker_instance_id', 'lease_expires_at',
  'lease_last_renewed_at', 'lease_renewal_deadline', 'lease_expired_at', 'lease_revoked_at',
  'lease_revoke_reason',
}

local function lease_cleared(extra)
  for _, f in ipairs(LEASE_MIRROR) do
    extra[f] = ''
  end
  return extra
end

-- Lease release (spec 10 §1.3), after the core was written. Needs x.lease, x.lease_expiry,
-- x.attempt_timeout, x.history; reads the holder from the pre-write x.core snapshot.
local function release_lease(x, reason, now)
  local c = x.core
  redis.call('DEL', x.lease)
  redis.call('ZREM', x.lease_expiry, x.eid)
  -- The holder's lease set and the lane's active index: built from core fields on the tag of
  -- KEYS[1] (spec 00 §4 rule 3); the caller may not know the holder.
  if is_set(c.current_worker_instance_id) then
    redis.call('SREM', worker_leases_key(x.tag, c.current_worker_instance_id), x.eid)
  end
  redis.call('ZREM', lane_key(x.tag, c.lane_id, 'active'), x.eid)
  redis.call('ZREM', x.attempt_timeout, x.eid)
  lease_event(x.history, 'released', {'lease_id', c.current_lease_id,
    'lease_epoch', c.current_lease_epoch, 'attempt_index', c.current_attempt_index,
    'attempt_id', c.current_attempt_id, 'reason', reason}, now)
end

-- Ends attempt `idx` with `state` (+ `fields`) unless it is missing or already terminal (a
-- terminal attempt is never modified again, spec 00 §6.5). Returns true when it ended it.
local function end_attempt(x, idx, state, fields, now)
  if not is_set(idx) then
    return false
  end
  local key = attempt_key(x.tag, x.eid, idx)
  local cur = redis.call('HGET', key, 'attempt_state')
  if cur ~= 'started' and cur ~= 'suspended' then
    return false
  end
  local args = {'HSET', key, 'attempt_state', state, 'ended_at', num(now)}
  for i = 1, #fields do
    args[#args + 1] = fields[i]
  end
  redis.call(unpack(args))
  return true
end

-- Terminal transition common effects (spec 10 §1.5). Writes the core first (vector, completed_at
-- and `extra`), then ZREM attempt_timeout/execution_deadline, ZADD lane terminal, and PUBLISH
-- ff:dag:completions for a flow member when `publish`. Needs x.attempt_timeout, x.deadline.
local function terminal_transition(x, outcome, now, extra, publish)
  local c = x.core
  local attempt = 'attempt_terminal'
  if (tonumber(c.total_attempt_count or '0') or 0) == 0 then
    attempt = 'none'
  end
  extra.completed_at = num(now)
  local public = write_vector(x.core_key, x.eid,
    {'terminal', 'unowned', 'not_applicable', 'none', '', outcome, attempt}, now, extra)
  redis.call('ZREM', x.attempt_timeout, x.eid)
  redis.call('ZREM', x.deadline, x.eid)
  -- Lane index built from core.lane_id on the tag of KEYS[1] (spec 00 §4 rule 3).
  redis.call('ZADD', lane_key(x.tag, c.lane_id, 'terminal'), num(now), x.eid)
  if publish and is_set(c.flow_id) then
    redis.call('PUBLISH', 'ff:dag:completions', cjson.encode({
      execution_id = x.eid, flow_id = c.flow_id, outcome = outcome,
    }))
  end
  return public
end

-- Every scheduling set of a lane and every per-partition timeout/lease index (spec 00 §5.2).
local LANE_SETS = {
  'eligible', 'delayed', 'active', 'suspended', 'terminal', 'blocked:dependencies',
  'blocked:budget', 'blocked:quota', 'blocked:route', 'blocked:operator',
}
local PARTITION_SETS = {'lease_expiry', 'attempt_timeout', 'execution_deadline',
  'suspension_timeout'}

-- Defensive index removal (spec 00 §8.3; cancel, expire): the id leaves every index of its lane
-- and partition except `keep` (a lane set name), and the holder's lease set. All keys built on
-- the tag of KEYS[1] (spec 00 §4 rule 3).
local function remove_from_indexes(x, keep)
  local c = x.core
  for _, which in ipairs(LANE_SETS) do
    if which ~= keep then
      redis.call('ZREM', lane_key(x.tag, c.lane_id, which), x.eid)
    end
  end
  for _, name in ipairs(PARTITION_SETS) do
    redis.call('ZREM', partition_key(x.tag, name), x.eid)
  end
  if is_set(c.current_worker_instance_id) then
    redis.call('SREM', worker_leases_key(x.tag, c.current_worker_instance_id), x.eid)
  end
end

-- Closes the current suspension, its waitpoint and the waitpoint's condition (cancel, expire of
-- a suspended execution) and publishes waitpoint_closed on ff:signal_events:{p}. Only hashes
-- that exist are written. Waitpoint keys are built from core.current_waitpoint_id on the tag of
-- KEYS[1] (spec 00 §4 rule 3).
local function close_suspension(x, suspension_key, reason, wp_reason, now)
  local c = x.core
  if redis.call('EXISTS', suspension_key) == 1 then
    redis.call('HSET', suspension_key, 'closed_at', num(now), 'close_reason', reason)
  end
  if is_set(c.current_waitpoint_id) then
    local wp = waitpoint_key(x.tag, c.current_waitpoint_id)
    if redis.call('EXISTS', wp) == 1 then
      redis.call('HSET', wp, 'state', 'closed', 'closed_at', num(now), 'close_reason', wp_reason)
    end
    if redis.call('EXISTS', wp .. ':condition') == 1 then
      redis.call('HSET', wp .. ':condition', 'closed', '1', 'closed_at', num(now),
        'closed_reason', wp_reason)
    end
    -- Watchers of the waitpoint learn it closed (spec 20 §8; no token or payload).
    redis.call('SPUBLISH', 'ff:signal_events:' .. x.tag, cjson.encode({
      type = 'waitpoint_closed', execution_id = x.eid, waitpoint_id = c.current_waitpoint_id,
      close_reason = wp_reason, at = now,
    }))
  end
end

-- The stored execution policy (ff:exec:{p}:<eid>:policy, built on the tag of KEYS[1]) as a table;
-- {} when absent or unreadable.
local function stored_policy(x)
  local raw = redis.call('GET', exec_key(x.tag, x.eid, 'policy'))
  local p = raw and decode_json(raw)
  if type(p) ~= 'table' then
    return {}
  end
  return p
end

local function policy_int(t, field, default)
  local v = type(t) == 'table' and t[field]
  if type(v) == 'number' then
    return math.floor(v)
  end
  return default
end

local function attempt_timeout_of(policy)
  local v = policy_int(policy.timeout_policy, 'attempt_timeout_ms', 0)
  return v > 0 and v or false
end

-- Attempt policy JSON -> flat field list for the attempt policy hash (nested values JSON-encoded).
-- "" -> {}. Returns nil plus invalid_input when it is not a JSON object.
local function flatten_policy(json)
  if json == nil or json == '' then
    return {}
  end
  local t = decode_json(json)
  if type(t) ~= 'table' then
    return nil, err('invalid_input', 'attempt_policy_json must be a JSON object')
  end
  local flat = {}
  for k, v in pairs(t) do
    if type(v) == 'table' then
      v = cjson.encode(v)
    elseif type(v) == 'number' and v == math.floor(v) then
      v = num(v)
    else
      v = tostring(v)
    end
    flat[#flat + 1] = tostring(k)
    flat[#flat + 1] = v
  end
  return flat
end

-- Replaces lease:current with lease `a` (spec 00 §5.1 fields).
local function write_lease(key, eid, a, now)
  redis.call('DEL', key)
  redis.call('HSET', key, 'lease_id', a.lease_id, 'lease_epoch', num(a.epoch),
    'execution_id', eid, 'attempt_id', a.attempt_id, 'worker_id', a.worker_id,
    'worker_instance_id', a.worker_instance_id, 'acquired_at', num(now),
    'expires_at', num(a.expires), 'last_renewed_at', num(now),
    'renewal_deadline', num(a.renewal))
end

-- Creates a started attempt and its lease (claim, reclaim): attempt hash, attempts index, usage,
-- policy snapshot, and lease:current replaced. `a` = {idx, attempt_id, attempt_type, lease_id,
-- epoch, worker_id, worker_instance_id, expires, renewal, lineage = flat list, policy = flat list}.
-- Needs x.attempts, x.lease.
local function start_attempt(x, a, now)
  local akey = attempt_key(x.tag, x.eid, a.idx)
  local args = {'HSET', akey, 'attempt_id', a.attempt_id, 'execution_id', x.eid,
    'attempt_index', num(a.idx), 'attempt_type', a.attempt_type, 'attempt_state', 'started',
    'created_at', num(now), 'started_at', num(now), 'lease_id', a.lease_id,
    'lease_epoch', num(a.epoch), 'worker_id', a.worker_id,
    'worker_instance_id', a.worker_instance_id}
  for i = 1, #a.lineage do
    args[#args + 1] = a.lineage[i]
  end
  redis.call(unpack(args))
  redis.call('ZADD', x.attempts, num(now), num(a.idx))
  redis.call('HSET', akey .. ':usage', 'last_usage_report_seq', '0')
  if #a.policy > 0 then
    redis.call('HSET', akey .. ':policy', unpack(a.policy))
  end
  write_lease(x.lease, x.eid, a, now)
end

-- A fresh lease on lane `lane`: out of eligible, into lease_expiry and lane active at its
-- expiry, into the claimer's lease set. Lane keys and the lease set are built on the tag of
-- the caller's KEYS[1] (spec 00 §4 rule 3).
local function index_lease(x, lane, lease_expiry_key, a)
  redis.call('ZREM', lane_key(x.tag, lane, 'eligible'), x.eid)
  redis.call('ZADD', lease_expiry_key, num(a.expires), x.eid)
  redis.call('SADD', worker_leases_key(x.tag, a.worker_instance_id), x.eid)
  redis.call('ZADD', lane_key(x.tag, lane, 'active'), num(a.expires), x.eid)
end

-- Core fields of a fresh lease on attempt `a` (claimed vector extras; spec 10 §2.3 step 5).
local function claimed_fields(a, lane, now)
  return {
    current_attempt_index = num(a.idx), total_attempt_count = num(a.idx + 1),
    current_attempt_id = a.attempt_id, current_lease_id = a.lease_id,
    current_lease_epoch = num(a.epoch), current_worker_id = a.worker_id,
    current_worker_instance_id = a.worker_instance_id, current_lane = lane,
    lease_acquired_at = num(now), lease_expires_at = num(a.expires),
    lease_last_renewed_at = num(now), lease_renewal_deadline = num(a.renewal),
    lease_expired_at = '', lease_revoked_at = '', lease_revoke_reason = '',
  }
end

local CLAIMED = {'active', 'leased', 'not_applicable', 'none', '', 'none', 'running_attempt'}

local function split_csv(csv)
  local toks = {}
  for t in string.gmatch(csv or '', '[^,]+') do
    toks[#toks + 1] = t
  end
  return toks
end

-- Grant-time capability check (spec 10 §2.2): size limits of both sides, then the subset test.
-- A mismatch stamps last_capability_mismatch_at (the only write) and returns capability_mismatch
-- with the sorted CSV of missing tokens.
local function check_capabilities(x, worker_csv, now)
  local required = x.core.required_capabilities or ''
  local req = split_csv(required)
  if #required > 4096 then
    return err('invalid_capabilities', 'required:too_many_bytes')
  elseif #req > 256 then
    return err('invalid_capabilities', 'required:too_many_tokens')
  end
  local have = split_csv(worker_csv)
  if #worker_csv > 4096 then
    return err('invalid_capabilities', 'worker:too_many_bytes')
  elseif #have > 256 then
    return err('invalid_capabilities', 'worker:too_many_tokens')
  end
  local has = {}
  for _, t in ipairs(have) do
    has[t] = true
  end
  local missing = {}
  for _, t in ipairs(req) do
    if not has[t] then
      missing[#missing + 1] = t
    end
  end
  if #missing > 0 then
    table.sort(missing)
    redis.call('HSET', x.core_key, 'last_capability_mismatch_at', num(now))
    return err('capability_mismatch', table.concat(missing, ','))
  end
  return nil
end

-- Writes the claim grant hash (spec 00 §5.1) and expires the key at grant_expires_at. `argv` is
-- the grant-issuer layout: 2 worker_id, 3 worker_instance_id, 4 lane_id, 5 capability_hash,
-- 7 route_snapshot_json, 8 admission_summary.
local function write_grant(key, argv, now, ttl)
  local expires = now + ttl
  redis.call('HSET', key, 'worker_id', argv[2], 'worker_instance_id', argv[3],
    'lane_id', argv[4], 'capability_hash', argv[5], 'route_snapshot_json', argv[7],
    'admission_summary', argv[8], 'created_at', num(now), 'grant_expires_at', num(expires))
  redis.call('PEXPIREAT', key, num(expires))
  return expires
end

-- A grant is consumable by `worker_id` until grant_expires_at. Returns nil or the error reply.
local function check_grant(key, worker_id, now)
  local g = hgetall(key)
  if g.worker_id == nil or g.worker_id ~= worker_id then
    return err('invalid_claim_grant')
  end
  local exp = tonumber(g.grant_expires_at or '')
  if exp and exp < now then
    return err('claim_grant_expired')
  end
  return nil
end

-- Required non-empty string ARGV, as {{index, name}, ...} checked in order. Returns nil or the
-- invalid_input reply.
local function require_strings(argv, specs)
  for _, s in ipairs(specs) do
    local v = argv[s[1]]
    if v == nil or v == '' then
      return err('invalid_input', s[2] .. ' must not be empty')
    end
  end
  return nil
end

-- Required positive integer ARGV.
local function req_pos(name, v)
  local n, e = req_int(name, v)
  if not n then
    return nil, e
  end
  if n <= 0 then
    return nil, err('invalid_input', name .. ' must be positive, got: ' .. v)
  end
  return n, nil
end

-- ---------------------------------------------------------------------------------------------
-- Suspension, waitpoints and signals (spec 20): HMAC-SHA1 waitpoint tokens and the keystore,
-- the resume-condition language, the resume transition, waitpoint closure and signal events.
-- Shared by suspension.lua and signal.lua. Keys built here (waitpoint, condition, lane sets)
-- always use the tag of the caller's KEYS[1] (spec 00 §4 rule 3).
-- ---------------------------------------------------------------------------------------------

-- Lane-suspended score of a suspension without a timeout (spec 20 §7).
local NO_TIMEOUT_SCORE = '9999999999999'

-- Hex string -> bytes; nil for an empty, odd-length or non-hex input (no coercion).
local function hex_to_bytes(hex)
  if type(hex) ~= 'string' or hex == '' or #hex % 2 ~= 0 or string.find(hex, '[^0-9a-fA-F]') then
    return nil
  end
  return (string.gsub(hex, '..', function(h)
    return string.char(tonumber(h, 16))
  end))
end

-- Every byte of `s` XOR `b`.
local function xor_bytes(s, b)
  local out = {}
  for i = 1, #s do
    out[i] = string.char(bit.bxor(string.byte(s, i), b))
  end
  return table.concat(out)
end

-- RFC 2104 HMAC-SHA1 over redis.sha1hex (spec 20 §4.2): lowercase hex digest. `key` = raw bytes.
local function hmac_sha1_hex(key, msg)
  if #key > 64 then
    key = hex_to_bytes(redis.sha1hex(key))
  end
  key = key .. string.rep('\0', 64 - #key)
  local inner = hex_to_bytes(redis.sha1hex(xor_bytes(key, 0x36) .. msg))
  return redis.sha1hex(xor_bytes(key, 0x5c) .. inner)
end

-- Constant-time equality of two 40-char digests: OR-accumulated byte XORs over all 40 bytes.
local function digest_equal(a, b)
  if #a ~= 40 or #b ~= 40 then
    return false
  end
  local acc = 0
  for i = 1, 40 do
    acc = bit.bor(acc, bit.bxor(string.byte(a, i), string.byte(b, i)))
  end
  return acc == 0
end

-- The signed message (spec 20 §4.1).
local function token_message(wpid, wpkey, created_at)
  return wpid .. '|' .. wpkey .. '|' .. created_at
end

-- A keystore key was supplied (not absent, not the ff:noop placeholder).
local function keystore_given(key)
  return type(key) == 'string' and string.sub(key, 1, 7) == 'ff:sec:'
end

-- expires_at:<kid> as a positive integer, or nil (missing/malformed fails closed).
local function kid_expiry(v)
  if type(v) ~= 'string' or not string.match(v, '^%d+$') then
    return nil
  end
  local n = tonumber(v)
  if n <= 0 then
    return nil
  end
  return n
end

-- Mint (spec 20 §4.3): the token for (wpid, wpkey, created_at) under the current kid, or nil
-- plus the error reply.
local function mint_token(keystore, wpid, wpkey, created_at)
  if not keystore_given(keystore) then
    return nil, err('invalid_keys_missing_hmac')
  end
  local kid = redis.call('HGET', keystore, 'current_kid')
  if not kid or kid == '' then
    return nil, err('hmac_secret_not_initialized')
  end
  local hex = redis.call('HGET', keystore, 'secret:' .. kid)
  if not hex or hex == '' then
    return nil, err('hmac_secret_not_initialized')
  end
  local key = hex_to_bytes(hex)
  if not key then
    return nil, err('invalid_secret')
  end
  return kid .. ':' .. hmac_sha1_hex(key, token_message(wpid, wpkey, created_at)), nil
end

-- Validate (spec 20 §4.5), first failing step wins. Returns nil when valid, else the error reply.
local function validate_token(keystore, token, wpid, wpkey, created_at, now)
  if not keystore_given(keystore) then
    return err('invalid_keys_missing_hmac')
  end
  if type(token) ~= 'string' or token == '' then
    return err('missing_token')
  end
  local sep = string.find(token, ':', 1, true)
  if not sep or sep == 1 or sep == #token then
    return err('invalid_token')
  end
  local kid, digest = string.sub(token, 1, sep - 1), string.sub(token, sep + 1)
  if #digest ~= 40 then
    return err('invalid_token')
  end
  local current = redis.call('HGET', keystore, 'current_kid')
  if not current or current == '' then
    return err('hmac_secret_not_initialized')
  end
  local hex = redis.call('HGET', keystore, 'secret:' .. kid)
  if kid ~= current then
    if not hex then
      return err('invalid_token')
    end
    local exp = kid_expiry(redis.call('HGET', keystore, 'expires_at:' .. kid))
    if not exp or exp < now then
      return err('token_expired')
    end
  elseif not hex then
    return err('invalid_token')
  end
  local key = hex_to_bytes(hex)
  if not key then
    return err('invalid_secret')
  end
  if not digest_equal(hmac_sha1_hex(key, token_message(wpid, wpkey, created_at)), digest) then
    return err('invalid_token')
  end
  return nil
end

-- Resume condition (spec 20 §3.1, Recommended validation). Returns {condition_type, match_mode,
-- min, names = {...}} or nil plus invalid_resume_condition. "" = all defaults.
local ZERO_MATCHER_TYPES = {operator_only = true, timeout_only = true}

local function parse_condition(json)
  local t = {}
  if json ~= nil and json ~= '' then
    t = decode_json(json)
    if type(t) ~= 'table' or #t > 0 then
      return nil, err('invalid_resume_condition', 'malformed JSON or not an object')
    end
  end
  local function field(name, default)
    local v = t[name]
    if v == nil or v == cjson.null then
      return default
    end
    return v
  end
  local c = {condition_type = field('condition_type', 'signal_set'),
    match_mode = field('signal_match_mode', 'any'), min = field('minimum_signal_count', 1)}
  if type(c.condition_type) ~= 'string' or type(c.match_mode) ~= 'string' then
    return nil, err('invalid_resume_condition', 'condition_type and signal_match_mode are strings')
  end
  if type(c.min) ~= 'number' or c.min ~= math.floor(c.min) or c.min < 1 then
    return nil, err('invalid_resume_condition', 'minimum_signal_count must be an integer >= 1')
  end
  local names = field('required_signal_names', {})
  if type(names) ~= 'table' then
    return nil, err('invalid_resume_condition', 'required_signal_names must be an array')
  end
  c.names = {}
  if not ZERO_MATCHER_TYPES[c.condition_type] then
    for i = 1, #names do
      if type(names[i]) ~= 'string' then
        return nil, err('invalid_resume_condition', 'required_signal_names must be strings')
      end
      c.names[i] = names[i]
    end
    if #c.names == 0 then
      c.names[1] = ''
    end
    if c.min > #c.names then
      return nil, err('invalid_resume_condition', 'minimum_signal_count exceeds the matchers')
    end
  end
  return c, nil
end

-- In-memory condition state from a parsed condition: {type, mode, min, total, count, matchers}.
local function new_condition_state(c)
  local st = {condition_type = c.condition_type, match_mode = c.match_mode, min = c.min,
    total = #c.names, count = 0, matchers = {}}
  for i, name in ipairs(c.names) do
    st.matchers[i] = {name = name, satisfied = false, signal_id = ''}
  end
  return st
end

-- In-memory condition state from a stored condition hash (nil when absent).
local function load_condition(key)
  local h = hgetall(key)
  if next(h) == nil then
    return nil
  end
  local st = {condition_type = h.condition_type or '', match_mode = h.match_mode or 'any',
    min = tonumber(h.minimum_signal_count or '1') or 1,
    total = tonumber(h.total_matchers or '0') or 0,
    count = tonumber(h.satisfied_count or '0') or 0, matchers = {}, closed = h.closed == '1'}
  for i = 1, st.total do
    local p = 'matcher:' .. (i - 1) .. ':'
    st.matchers[i] = {name = h[p .. 'name'] or '', satisfied = h[p .. 'satisfied'] == '1',
      signal_id = h[p .. 'signal_id'] or ''}
  end
  return st
end

-- Step 4 of spec 20 §3.1; a zero-matcher condition is never satisfied.
local function condition_satisfied(st)
  if st.total == 0 then
    return false
  elseif st.match_mode == 'all' then
    return st.count >= st.total
  end
  return st.count >= st.min
end

-- Steps 1-3 of spec 20 §3.1: the lowest unsatisfied matcher named "" or `name` consumes the
-- signal. Returns true when a matcher took it.
local function match_signal(st, name, signal_id)
  for _, m in ipairs(st.matchers) do
    if not m.satisfied and (m.name == '' or m.name == name) then
      m.satisfied, m.signal_id = true, signal_id
      st.count = st.count + 1
      return true
    end
  end
  return false
end

-- Writes the whole condition hash from the in-memory state.
local function write_condition(key, st, now, closed_reason)
  local args = {'HSET', key, 'condition_type', st.condition_type, 'match_mode', st.match_mode,
    'minimum_signal_count', num(st.min), 'total_matchers', num(st.total),
    'satisfied_count', num(st.count), 'closed', closed_reason and '1' or '0',
    'closed_at', closed_reason and num(now) or '', 'closed_reason', closed_reason or '',
    'updated_at', num(now)}
  for i, m in ipairs(st.matchers) do
    local p = 'matcher:' .. (i - 1) .. ':'
    args[#args + 1] = p .. 'name'
    args[#args + 1] = m.name
    args[#args + 1] = p .. 'satisfied'
    args[#args + 1] = m.satisfied and '1' or '0'
    args[#args + 1] = p .. 'signal_id'
    args[#args + 1] = m.signal_id
  end
  redis.call(unpack(args))
end

-- One JSON event on ff:signal_events:{p} (spec 20 §8). Never tokens, secrets or payloads.
local function signal_event(tag, ev)
  redis.call('SPUBLISH', 'ff:signal_events:' .. tag, cjson.encode(ev))
end

-- Closes waitpoint `wpid` (state closed, or `state` when given), its condition hash when
-- present (closed=1 with `cond_reason`), and publishes waitpoint_closed. `satisfied` also
-- stamps satisfied_at.
local function close_waitpoint_at(x, wpid, reason, cond_reason, now, satisfied, state)
  local wp = waitpoint_key(x.tag, wpid)
  local args = {'HSET', wp, 'state', state or 'closed', 'closed_at', num(now),
    'close_reason', reason}
  if satisfied then
    args[#args + 1] = 'satisfied_at'
    args[#args + 1] = num(now)
  end
  redis.call(unpack(args))
  if redis.call('EXISTS', wp .. ':condition') == 1 then
    redis.call('HSET', wp .. ':condition', 'closed', '1', 'closed_at', num(now),
      'closed_reason', cond_reason, 'updated_at', num(now))
  end
  signal_event(x.tag, {type = 'waitpoint_closed', execution_id = x.eid, waitpoint_id = wpid,
    close_reason = reason, at = now})
end

-- The resume_delay_ms of a stored resume_policy_json (0 when absent or unreadable).
local function policy_resume_delay(policy_json)
  local p = policy_json and policy_json ~= '' and decode_json(policy_json)
  if type(p) ~= 'table' or type(p.resume_delay_ms) ~= 'number' or p.resume_delay_ms < 0 then
    return 0
  end
  return math.floor(p.resume_delay_ms)
end

-- Resume transition of a suspended execution (spec 20 §1 rows "resume"): core first (current
-- suspension/waitpoint cleared, delay_until on a delayed resume), then the lane moves and the
-- suspension-timeout entry. `detail` = blocking_detail of a delayed resume. Returns
-- public_state. Lane keys built from core.lane_id on the tag of KEYS[1].
local function resume_core(x, timeout_idx, delay, detail, now)
  local c = x.core
  local public
  if delay > 0 then
    public = write_vector(x.core_key, x.eid, {'runnable', 'unowned', 'not_eligible_until_time',
      'waiting_for_resume_delay', detail, 'none', 'attempt_interrupted'}, now,
      {current_suspension_id = '', current_waitpoint_id = '', delay_until = num(now + delay)})
  else
    public = write_vector(x.core_key, x.eid, {'runnable', 'unowned', 'eligible_now',
      'waiting_for_worker', '', 'none', 'attempt_interrupted'}, now,
      {current_suspension_id = '', current_waitpoint_id = '', delay_until = ''})
  end
  redis.call('ZREM', lane_key(x.tag, c.lane_id, 'suspended'), x.eid)
  if delay > 0 then
    redis.call('ZADD', lane_key(x.tag, c.lane_id, 'delayed'), num(now + delay), x.eid)
  else
    local score = eligible_score(tonumber(c.priority or '0') or 0,
      tonumber(c.created_at or '0') or 0)
    redis.call('ZADD', lane_key(x.tag, c.lane_id, 'eligible'), num(score), x.eid)
  end
  redis.call('ZREM', timeout_idx, x.eid)
  return public
end

-- A KEYS entry that must be the key built from ARGV (a waitpoint or signal id): a mismatch is a
-- malformed call and raises before anything is written.
local function expect_key(actual, expected, what)
  if actual ~= expected then
    error({err = 'ERR flowfabric: KEYS entry for ' .. what .. ' does not match its ARGV id'})
  end
end

-- A list of strings as a JSON array ("[]" when empty; cjson would encode {} as an object).
local function json_array(list)
  if #list == 0 then
    return '[]'
  end
  return cjson.encode(list)
end
