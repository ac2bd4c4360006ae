-- uses: reply, util, bounds, keys
--
-- The policy schemas (docs/lifecycle.md#execution-policy): the one place a policy a caller sends
-- is checked. ff_create_execution checks the execution policy, ff_fail_execution an argument
-- retry policy, ff_suspend_execution the resume policy, each before its first write, so a direct
-- FCALL caller cannot store a policy the readers below cannot use either. A field is checked by
-- its kind: {'int', lo, hi} an integral JSON number, {'num', lo, hi} any number, {'bool'},
-- {'str'} a string of at most LABEL_BYTES, {'enum', {...}} one of the strings, {'obj', schema},
-- {'list', item} an array of at most LIST_ITEMS items, {'any'} anything (checked elsewhere).
-- Unknown keys are refused; a JSON null is "unset". The failure is invalid_policy_json with
-- the field's path: "retry_policy.max_retries must be an integer 0..1000, got: two".

local Policy = {}

do
  local H = 'HORIZON_MS'
  local function int(bound, lo)
    return {'int', lo or 0, bound}
  end
  local LABEL = {'str'}
  local BACKOFF = {
    type = LABEL, initial_delay_ms = int(H), max_delay_ms = int(H), multiplier = {'num', 0, 100},
    jitter = {'bool'}, delay_ms = int(H),
  }
  local RETRY = {
    max_retries = int('MAX_RETRIES'), backoff = {'obj', BACKOFF},
    retryable_categories = {'list', LABEL},
  }
  Policy.RETRY_SCHEMA = RETRY
  Policy.EXECUTION_SCHEMA = {
    priority = {'num', -1e15, 1e15}, delay_until = {'num', -1e15, 1e15}, -- ignored (the Args')
    retry_policy = {'obj', RETRY},
    timeout_policy = {'obj', {attempt_timeout_ms = int(H), execution_deadline_ms = int(H),
      max_reclaim_count = int('MAX_RECLAIM_COUNT')}},
    max_reclaim_count = int('MAX_RECLAIM_COUNT'),
    max_replay_count = int('MAX_REPLAY_COUNT'),
    suspension_policy = {'obj', {timeout_behavior = {'enum',
      {'fail', 'cancel', 'expire', 'auto_resume', 'escalate'}}}},
    fallback_policy = {'obj', {tiers = {'list', {'any'}}}},
    budget_ids = {'list', {'str', csv = true}},
    routing_requirements = {'obj', {required_capabilities = {'any'}, preferred_locality = LABEL,
      isolation_level = LABEL}},
    dedup_window_ms = int('DEDUP_TTL_MS'),
    stream_policy = {'obj', {durability_mode = LABEL, retention_maxlen = int('STREAM_MAXLEN'),
      retention_ttl_ms = int(H)}},
    max_signals_per_execution = int('MAX_SIGNALS'),
  }
  Policy.RESUME_SCHEMA = {
    resume_target = {'enum', {'runnable'}}, close_waitpoint_on_resume = {'bool'},
    consume_matched_signals = {'bool'}, retain_signal_buffer_until_closed = {'bool'},
    resume_delay_ms = int(H),
  }

  local function is_object(t)
    if type(t) ~= 'table' then
      return false
    end
    for k in pairs(t) do
      if type(k) ~= 'string' then
        return false
      end
    end
    return true
  end

  local function is_list(t)
    if type(t) ~= 'table' then
      return false
    end
    local n = 0
    for _ in pairs(t) do
      n = n + 1
    end
    return n == #t
  end

  local function shown(v)
    if type(v) == 'number' then
      return v == math.floor(v) and Util.num(v) or tostring(v)
    elseif type(v) == 'string' then
      return string.sub(v, 1, 64)
    end
    return type(v) == 'table' and 'a JSON ' .. (is_list(v) and 'array' or 'object') or tostring(v)
  end

  local check_object

  -- The detail of the first failure of `v` against `kind`, or nil.
  local function check_value(path, kind, v)
    local k = kind[1]
    if k == 'any' then
      return nil
    elseif k == 'int' or k == 'num' then
      local lo, hi = kind[2], kind[3]
      if type(hi) == 'string' then
        hi = Bounds[hi]
      end
      local integral = type(v) == 'number' and v == math.floor(v)
      if type(v) ~= 'number' or (k == 'int' and not integral) or v < lo or v > hi then
        local what = k == 'int' and 'an integer ' or 'a number '
        return path .. ' must be ' .. what .. shown(lo) .. '..' .. shown(hi) .. ', got: '
          .. shown(v)
      end
    elseif k == 'bool' then
      if type(v) ~= 'boolean' then
        return path .. ' must be true or false, got: ' .. shown(v)
      end
    elseif k == 'str' then
      if type(v) ~= 'string' or #v > Bounds.LABEL_BYTES or (kind.csv and (v == ''
          or string.find(v, ',', 1, true))) then
        local extra = kind.csv and ' (non-empty, no commas)' or ''
        return path .. ' must be a string of at most ' .. Bounds.LABEL_BYTES .. ' bytes' .. extra
      end
    elseif k == 'enum' then
      for _, ok in ipairs(kind[2]) do
        if v == ok then
          return nil
        end
      end
      return path .. ' must be one of ' .. table.concat(kind[2], ', ') .. ', got: ' .. shown(v)
    elseif k == 'list' then
      if not is_list(v) then
        return path .. ' must be an array, got: ' .. shown(v)
      elseif #v > Bounds.LIST_ITEMS then
        return path .. ' must have at most ' .. Bounds.LIST_ITEMS .. ' items, got: ' .. #v
      end
      for i, item in ipairs(v) do
        local d = check_value(path .. '[' .. (i - 1) .. ']', kind[2], item)
        if d then
          return d
        end
      end
    elseif k == 'obj' then
      return check_object(path, kind[2], v)
    end
    return nil
  end

  check_object = function(path, schema, t)
    if not is_object(t) then
      return (path == '' and 'policy' or path) .. ' must be a JSON object, got: ' .. shown(t)
    end
    local prefix = path == '' and '' or path .. '.'
    local names = {}
    for name in pairs(t) do
      names[#names + 1] = name
    end
    table.sort(names) -- the first failure is the same on every call
    for _, name in ipairs(names) do
      local v = t[name]
      local kind = schema[name]
      if not kind then
        return prefix .. name .. ' is not a known policy field'
      elseif v ~= cjson.null then
        local d = check_value(prefix .. name, kind, v)
        if d then
          return d
        end
      end
    end
    return nil
  end

  -- A decoded policy `t` against `schema` (one of the schemas above), fields named under `path`
  -- ("" at the top): nil, or the invalid_policy_json reply naming the first bad field.
  function Policy.check(t, schema, path)
    local detail = check_object(path or '', schema, t)
    if detail then
      return Reply.err('invalid_policy_json', detail)
    end
    return nil
  end
end

-- The stored execution policy (ff:exec:{p}:<eid>:policy, built on the tag of KEYS[1]) as a table;
-- {} when absent or unreadable.
function Policy.stored(x)
  local raw = redis.call('GET', Keys.exec(x.tag, x.eid, 'policy'))
  local p = raw and Util.decode_json(raw)
  if type(p) ~= 'table' then
    return {}
  end
  return p
end

function Policy.int(t, field, default)
  local v = type(t) == 'table' and t[field]
  if type(v) == 'number' then
    return math.floor(v)
  end
  return default
end

function Policy.attempt_timeout_of(policy)
  local v = Policy.int(policy.timeout_policy, 'attempt_timeout_ms', 0)
  return v > 0 and v or false
end

-- Attempt policy JSON -> flat field list for the attempt policy hash (nested values JSON-encoded).
-- "" -> {}. Returns nil plus invalid_input when it is not a JSON object.
function Policy.flatten(json)
  if json == nil or json == '' then
    return {}
  end
  local t = Util.decode_json(json)
  if type(t) ~= 'table' then
    return nil, Reply.err('invalid_input', 'attempt_policy_json must be a JSON object')
  end
  local flat, n = {}, 0
  for _ in pairs(t) do
    n = n + 1
  end
  if n > Bounds.LIST_ITEMS then
    return nil, Reply.err('invalid_input', 'attempt_policy_json must have at most '
      .. Bounds.LIST_ITEMS .. ' fields, got: ' .. n)
  end
  for k, v in pairs(t) do
    if type(v) == 'table' then
      v = cjson.encode(v)
    elseif type(v) == 'number' and v == math.floor(v) then
      v = Util.num(v)
    else
      v = tostring(v)
    end
    flat[#flat + 1] = tostring(k)
    flat[#flat + 1] = v
  end
  return flat
end

-- The resume_delay_ms of a stored resume_policy_json (0 when absent or unreadable).
function Policy.resume_delay(policy_json)
  local p = policy_json and policy_json ~= '' and Util.decode_json(policy_json)
  if type(p) ~= 'table' or type(p.resume_delay_ms) ~= 'number' or p.resume_delay_ms < 0 then
    return 0
  end
  return math.floor(p.resume_delay_ms)
end
