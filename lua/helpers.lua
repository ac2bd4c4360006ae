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
