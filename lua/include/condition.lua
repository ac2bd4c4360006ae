-- uses: reply, util

local Condition = {}

-- Resume condition (docs/suspension.md#resume-conditions). Returns {condition_type, match_mode,
-- min, names = {...}} or nil plus invalid_resume_condition. "" = all defaults.
Condition.ZERO_MATCHER_TYPES = {operator_only = true, timeout_only = true}

function Condition.parse(json)
  local t = {}
  if json ~= nil and json ~= '' then
    t = Util.decode_json(json)
    if type(t) ~= 'table' or #t > 0 then
      return nil, Reply.err('invalid_resume_condition', 'malformed JSON or not an object')
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
    return nil, Reply.err('invalid_resume_condition', 'condition_type and signal_match_mode are strings')
  end
  if type(c.min) ~= 'number' or c.min ~= math.floor(c.min) or c.min < 1 then
    return nil, Reply.err('invalid_resume_condition', 'minimum_signal_count must be an integer >= 1')
  end
  local names = field('required_signal_names', {})
  if type(names) ~= 'table' then
    return nil, Reply.err('invalid_resume_condition', 'required_signal_names must be an array')
  end
  c.names = {}
  if not Condition.ZERO_MATCHER_TYPES[c.condition_type] then
    for i = 1, #names do
      if type(names[i]) ~= 'string' then
        return nil, Reply.err('invalid_resume_condition', 'required_signal_names must be strings')
      end
      c.names[i] = names[i]
    end
    if #c.names == 0 then
      c.names[1] = ''
    end
    if c.min > #c.names then
      return nil, Reply.err('invalid_resume_condition', 'minimum_signal_count exceeds the matchers')
    end
  end
  return c, nil
end

-- In-memory condition state from a parsed condition: {type, mode, min, total, count, matchers}.
function Condition.new_state(c)
  local st = {condition_type = c.condition_type, match_mode = c.match_mode, min = c.min,
    total = #c.names, count = 0, matchers = {}}
  for i, name in ipairs(c.names) do
    st.matchers[i] = {name = name, satisfied = false, signal_id = ''}
  end
  return st
end

-- In-memory condition state from a stored condition hash (nil when absent).
function Condition.load(key)
  local h = Util.hgetall(key)
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

-- Step 4 of docs/suspension.md#resume-conditions; a zero-matcher condition is never satisfied.
function Condition.satisfied(st)
  if st.total == 0 then
    return false
  elseif st.match_mode == 'all' then
    return st.count >= st.total
  end
  return st.count >= st.min
end

-- Steps 1-3 of docs/suspension.md#resume-conditions: the lowest unsatisfied matcher named "" or
-- `name` consumes the
-- signal. Returns true when a matcher took it.
function Condition.match(st, name, signal_id)
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
function Condition.write(key, st, now, closed_reason)
  local args = {'HSET', key, 'condition_type', st.condition_type, 'match_mode', st.match_mode,
    'minimum_signal_count', Util.num(st.min), 'total_matchers', Util.num(st.total),
    'satisfied_count', Util.num(st.count), 'closed', closed_reason and '1' or '0',
    'closed_at', closed_reason and Util.num(now) or '', 'closed_reason', closed_reason or '',
    'updated_at', Util.num(now)}
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
