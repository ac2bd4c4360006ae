-- uses: reply, util, keys

local Policy = {}

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
  local flat = {}
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
