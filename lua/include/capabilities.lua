-- uses: reply, util

local Caps = {}

-- Capability tokens (docs/architecture.md#identifiers): non-empty, no ',', no byte <= 0x20 or 0x7F;
-- <= 256 tokens and a
-- sorted CSV of <= 4096 bytes. `side` is "required" or "worker". Returns the sorted CSV, or nil
-- plus an invalid_capabilities reply.
function Caps.csv(side, list)
  if type(list) ~= 'table' then
    return nil, Reply.err('invalid_capabilities', side .. ':not_array')
  end
  local seen, toks = {}, {}
  for _, t in ipairs(list) do
    if type(t) ~= 'string' then
      return nil, Reply.err('invalid_capabilities', side .. ':non_string_token')
    end
    if t == '' then
      return nil, Reply.err('invalid_capabilities', side .. ':empty_token')
    end
    if string.find(t, ',', 1, true) then
      return nil, Reply.err('invalid_capabilities', side .. ':comma_in_token')
    end
    if string.find(t, '[%z\1-\32\127]') then
      return nil, Reply.err('invalid_capabilities', side .. ':control_or_whitespace')
    end
    if not seen[t] then
      seen[t] = true
      toks[#toks + 1] = t
    end
  end
  if #toks > 256 then
    return nil, Reply.err('invalid_capabilities', side .. ':too_many_tokens')
  end
  table.sort(toks)
  local csv = table.concat(toks, ',')
  if #csv > 4096 then
    return nil, Reply.err('invalid_capabilities', side .. ':too_many_bytes')
  end
  return csv, nil
end

-- Grant-time capability check (docs/lifecycle.md#claims): size limits of both sides, then the
-- subset test.
-- A mismatch stamps last_capability_mismatch_at (the only write) and returns capability_mismatch
-- with the sorted CSV of missing tokens.
function Caps.check(x, worker_csv, now)
  local required = x.core.required_capabilities or ''
  local req = Util.split_csv(required)
  if #required > 4096 then
    return Reply.err('invalid_capabilities', 'required:too_many_bytes')
  elseif #req > 256 then
    return Reply.err('invalid_capabilities', 'required:too_many_tokens')
  end
  local have = Util.split_csv(worker_csv)
  if #worker_csv > 4096 then
    return Reply.err('invalid_capabilities', 'worker:too_many_bytes')
  elseif #have > 256 then
    return Reply.err('invalid_capabilities', 'worker:too_many_tokens')
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
    redis.call('HSET', x.core_key, 'last_capability_mismatch_at', Util.num(now))
    return Reply.err('capability_mismatch', table.concat(missing, ','))
  end
  return nil
end
