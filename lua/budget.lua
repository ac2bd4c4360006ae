-- budget.lua: budgets, consumable allowances over named dimensions (docs/budgets.md).
--
-- A budget lives on its budget partition {b:M}: the definition ff:budget:{b:M}:<bid>, its
-- ...:limits (hard:<dim>, soft:<dim>; 0 = no limit) and ...:usage (<dim> -> integer, absent = 0,
-- plus the reconciler's breached_at marker), the partition's indexes ff:idx:{b:M}:budget_resets
-- (zset, score = next_reset_at) and ff:idx:{b:M}:budget_policies (set), and usage dedup markers
-- ff:usagededup:{b:M}:<raw id>; for admission (docs/budgets.md#reservations) ...:reserved (<dim> ->
-- the sum of outstanding reservations), ...:holds (<eid> -> JSON {dim: amount still held}) and
-- ...:inflight (zset, <eid> -> admission time). KEYS[1] is always the definition; every other key must carry its
-- tag and is checked against the one built from it (a mismatch is a malformed call and raises).
--
-- uses: reply, util, bounds, argv

-- Usage fields that are not dimensions (docs/budgets.md#keys): refused as dimension names.
local RESERVED = {breached_at = true, _init = true}
-- HINCRBY works on signed 64-bit integers; Lua compares as doubles, so stay well inside.
local USAGE_CEILING = 9.0e18

local function budget_keys(keys, bid)
  local tag = Util.tag_of(keys[1])
  local def = 'ff:budget:' .. tostring(tag) .. ':' .. bid
  Util.expect_key(keys[1], def, 'budget definition')
  return tag, def
end

local function now_of(a)
  return a.now or Util.now_ms()
end

-- N names starting at argv[first], then `groups` parallel arrays of N amounts after them.
-- Returns dims, arrays (each a list of numbers), or nil plus the invalid_input reply.
local function parse_dimensions(argv, count_at, groups, what)
  local raw = argv[count_at]
  if not Argv.is_int(raw) or tonumber(raw) < 0 then
    return nil, nil, Reply.err('invalid_input', 'dim_count must be a number, got: ' .. tostring(raw))
  end
  local n = tonumber(raw)
  if n > Bounds.BUDGET_DIMENSIONS then
    return nil, nil, Reply.err('invalid_input', 'too_many_dimensions: limit='
      .. Bounds.BUDGET_DIMENSIONS .. ', got=' .. n)
  end
  if #argv ~= count_at + n * (groups + 1) then
    return nil, nil, Reply.err('invalid_input', what .. ': dimensions=' .. n .. ' argv='
      .. (#argv - count_at))
  end
  local dims, seen, arrays = {}, {}, {}
  for i = 1, n do
    local d = argv[count_at + i]
    if d == '' or #d > Bounds.DIMENSION_BYTES then
      return nil, nil, Reply.err('invalid_input', 'dimension names must be 1..'
        .. Bounds.DIMENSION_BYTES .. ' bytes')
    end
    if RESERVED[d] then
      return nil, nil, Reply.err('invalid_input', 'reserved dimension name: ' .. d)
    end
    if seen[d] then
      return nil, nil, Reply.err('invalid_input', 'duplicate_dimension: ' .. d)
    end
    seen[d] = true
    dims[i] = d
  end
  for g = 1, groups do
    local list = {}
    for i = 1, n do
      local v = argv[count_at + g * n + i]
      if not Argv.is_int(v) or tonumber(v) < 0 or tonumber(v) > Bounds.BUDGET_AMOUNT then
        return nil, nil, Reply.err('invalid_input', 'amounts must be 0..' .. Util.num(Bounds.BUDGET_AMOUNT)
          .. ', got: ' .. tostring(v))
      end
      list[i] = tonumber(v)
    end
    arrays[g] = list
  end
  return dims, arrays, nil
end

-- ff_create_budget
--   KEYS (5): 1 definition, 2 limits, 3 usage, 4 budget_resets, 5 budget_policies.
--   ARGV (9 + 4N): 1 budget_id, 2 scope_type, 3 scope_id, 4 enforcement_mode ("" = strict),
--     5 on_hard_limit ("" = fail), 6 on_soft_limit ("" = warn), 7 reset_interval_ms (0 =
--     never), 8 now ("" = TIME), 9 N, then N dimension names, N hard limits, N soft limits and
--     N reserve estimates (0 = none; docs/budgets.md#reservations).
--   Now: ARGV 8, else TIME.
--   Replies: {1,"OK","created"}; {1,"ALREADY_SATISFIED","exists"} (nothing but the index
--     heal below changes; differing arguments are ignored).
--   Errors (in order, nothing written): invalid_input (reset_interval_ms, now, N not a number,
--     N > BUDGET_DIMENSIONS "too_many_dimensions: limit=64, got=<n>", ARGV not 9 + 4N long,
--     empty/oversized/reserved/duplicate dimension name, an amount not 0..BUDGET_AMOUNT, a
--     reserve on a dimension without a hard limit or above it).
--   Writes: SADD budget_policies id (also when it exists: heals older indexes); definition
--     (budget_id, scope_type, scope_id, enforcement_mode, on_hard_limit, on_soft_limit,
--     reset_interval_ms, breach_count 0, soft_breach_count 0, reset_count 0, created_at,
--     last_updated_at, [next_reset_at]); limits hard:<dim>, soft:<dim> (zeros too),
--     reserve:<dim> (only non-zero); usage
--     left empty; interval > 0: ZADD budget_resets next_reset_at id.
local CREATE_ARGV = {
  {1, 'budget_id', 'str'},
  {7, 'reset_interval_ms', 'int', min = 0, max = Bounds.HORIZON_MS},
  {8, 'now', 'int?', min = 0, max = Bounds.TIMESTAMP_MS},
}

local function create_budget(keys, argv)
  local a, e = Argv.parse(argv, CREATE_ARGV)
  if not a then
    return e
  end
  local dims, arrays, derr = parse_dimensions(argv, 9, 3, 'dimension_limit_array_mismatch')
  if not dims then
    return derr
  end
  for i, d in ipairs(dims) do
    local r, h = arrays[3][i], arrays[1][i]
    if r > 0 and (h == 0 or r > h) then
      return Reply.err('invalid_input', 'reserve of ' .. d .. ' needs a hard limit of at least '
        .. Util.num(r))
    end
  end
  local _, def = budget_keys(keys, a.budget_id)
  Util.expect_key(keys[2], def .. ':limits', 'budget limits')
  Util.expect_key(keys[3], def .. ':usage', 'budget usage')
  redis.call('SADD', keys[5], a.budget_id)
  if redis.call('EXISTS', def) == 1 then
    return Reply.already('exists')
  end
  local now = now_of(a)
  local fields = {
    budget_id = a.budget_id, scope_type = argv[2] or '', scope_id = argv[3] or '',
    enforcement_mode = (argv[4] ~= '' and argv[4]) or 'strict',
    on_hard_limit = (argv[5] ~= '' and argv[5]) or 'fail',
    on_soft_limit = (argv[6] ~= '' and argv[6]) or 'warn',
    reset_interval_ms = Util.num(a.reset_interval_ms), breach_count = '0',
    soft_breach_count = '0', reset_count = '0', created_at = Util.num(now),
    last_updated_at = Util.num(now),
  }
  if a.reset_interval_ms > 0 then
    fields.next_reset_at = Util.num(now + a.reset_interval_ms)
  end
  Util.hmset(def, fields)
  local limits = {}
  for i, d in ipairs(dims) do
    limits['hard:' .. d] = Util.num(arrays[1][i])
    limits['soft:' .. d] = Util.num(arrays[2][i])
    if arrays[3][i] > 0 then
      limits['reserve:' .. d] = Util.num(arrays[3][i])
    end
  end
  Util.hmset(keys[2], limits)
  if fields.next_reset_at then
    redis.call('ZADD', keys[4], fields.next_reset_at, a.budget_id)
  end
  return Reply.ok('created')
end

redis.register_function('ff_create_budget', create_budget)

-- ff_report_usage_and_check
--   KEYS (6): 1 definition, 2 limits, 3 usage, 4 dedup marker ff:usagededup:{b:M}:<raw id>, or
--     the placeholder ff:noop:{b:M} when ARGV 3 is "", 5 reserved, 6 holds.
--   ARGV (5 + 2N): 1 budget_id, 2 now ("" = TIME), 3 raw dedup id ("" = none), 4 execution_id
--     of the reporter ("" = none: settles no reservation), 5 N, then N dimension names and N
--     deltas.
--   Now: ARGV 2, else TIME.
--   The hard-limit test counts the reservations of everybody but the reporter
--   (docs/budgets.md#reservations): usage + delta + (reserved - own hold) must stay <= limit.
--   Replies: {1,"OK","ok"}; {1,"OK","soft_breach",dim,usage_after,soft_limit} (applied);
--     {1,"OK","hard_breach",dim,usage_before,hard_limit,on_hard_limit} (nothing applied);
--     {1,"ALREADY_SATISFIED","already_applied"} (the dedup marker exists; nothing changes).
--   Errors (in order, nothing written): invalid_input (now; N not a number, N >
--     BUDGET_DIMENSIONS, ARGV not 5 + 2N long "dimension_delta_array_mismatch…", a bad or
--     duplicate name, a delta not 0..BUDGET_AMOUNT, a dimension that would pass the usage
--     ceiling), budget_not_found (no definition: nothing is created).
--   Writes: hard breach: definition breach_count += 1, last_breach_at, last_breach_dim,
--     last_updated_at (usage untouched, no dedup marker, so a retry is re-evaluated).
--     Otherwise HINCRBY usage per dimension; the reporter's hold shrinks by what it reported
--     (never below 0) and reserved by the same; last_updated_at; dedup marker "1" PX 86400000;
--     soft breach (first dimension over a non-zero soft limit): soft_breach_count += 1.
local REPORT_ARGV = {
  {1, 'budget_id', 'str'},
  {2, 'now', 'int?', min = 0, max = Bounds.TIMESTAMP_MS},
}
local DEDUP_TTL_MS = 86400000

-- The hold of `eid`: {dim: amount} and the admitting claimer's token (holds: JSON
-- {"t": token, "h": {dim: amount}}); {} and nil when it holds nothing.
local function hold_of(holds_key, eid)
  if eid == '' then
    return {}, nil
  end
  local raw = redis.call('HGET', holds_key, eid)
  local v = raw and Util.decode_json(raw)
  if type(v) ~= 'table' then
    return {}, nil
  end
  return type(v.h) == 'table' and v.h or {}, v.t
end

local function store_hold(holds_key, eid, hold, token)
  local v = {t = token or ''}
  if next(hold) ~= nil then
    v.h = hold
  end
  redis.call('HSET', holds_key, eid, cjson.encode(v))
end

-- The reporter's reservation settles: each reported dimension's hold shrinks by its delta.
local function settle(keys, eid, hold, token, dims, deltas)
  local changed = false
  for i, d in ipairs(dims) do
    local held = tonumber(hold[d] or 0) or 0
    if held > 0 and deltas[i] > 0 then
      local take = math.min(held, deltas[i])
      hold[d] = held - take
      if hold[d] == 0 then
        hold[d] = nil
      end
      redis.call('HINCRBY', keys[5], d, -take)
      changed = true
    end
  end
  if changed then
    store_hold(keys[6], eid, hold, token)
  end
end

local function report_usage(keys, argv)
  local a, e = Argv.parse(argv, REPORT_ARGV)
  if not a then
    return e
  end
  local dims, arrays, derr = parse_dimensions(argv, 5, 1, 'dimension_delta_array_mismatch')
  if not dims then
    return derr
  end
  local tag, def = budget_keys(keys, a.budget_id)
  Util.expect_key(keys[2], def .. ':limits', 'budget limits')
  Util.expect_key(keys[3], def .. ':usage', 'budget usage')
  Util.expect_key(keys[5], def .. ':reserved', 'budget reserved')
  Util.expect_key(keys[6], def .. ':holds', 'budget holds')
  local dedup = argv[3] or ''
  if dedup ~= '' then
    Util.expect_key(keys[4], 'ff:usagededup:' .. tag .. ':' .. dedup, 'usage dedup marker')
  end
  if redis.call('EXISTS', def) == 0 then
    return Reply.err('budget_not_found', a.budget_id)
  end
  if dedup ~= '' and redis.call('EXISTS', keys[4]) == 1 then
    return Reply.already('already_applied')
  end
  local eid = argv[4] or ''
  local hold, token = hold_of(keys[6], eid)
  local deltas = arrays[1]
  local now = Util.num(now_of(a))
  local current, hard, soft, others = {}, {}, {}, {}
  for i, d in ipairs(dims) do
    current[i] = tonumber(redis.call('HGET', keys[3], d) or '0') or 0
    local lim = redis.call('HMGET', keys[2], 'hard:' .. d, 'soft:' .. d)
    hard[i], soft[i] = tonumber(lim[1] or '0') or 0, tonumber(lim[2] or '0') or 0
    local reserved = tonumber(redis.call('HGET', keys[5], d) or '0') or 0
    others[i] = math.max(reserved - (tonumber(hold[d] or 0) or 0), 0)
    if current[i] + deltas[i] > USAGE_CEILING then
      return Reply.err('invalid_input', 'usage of ' .. d .. ' would pass ' .. Util.num(USAGE_CEILING))
    end
  end
  for i, d in ipairs(dims) do
    if hard[i] > 0 and current[i] + deltas[i] + others[i] > hard[i] then
      redis.call('HINCRBY', def, 'breach_count', 1)
      redis.call('HSET', def, 'last_breach_at', now, 'last_breach_dim', d, 'last_updated_at', now)
      local action = redis.call('HGET', def, 'on_hard_limit') or 'fail'
      return Reply.ok('hard_breach', d, Util.num(current[i]), Util.num(hard[i]), action)
    end
  end
  local breach
  for i, d in ipairs(dims) do
    local after = redis.call('HINCRBY', keys[3], d, Util.num(deltas[i]))
    if not breach and soft[i] > 0 and after > soft[i] then
      breach = {d, Util.num(after), Util.num(soft[i])}
    end
  end
  if next(hold) ~= nil then
    settle(keys, eid, hold, token, dims, deltas)
  end
  redis.call('HSET', def, 'last_updated_at', now)
  if dedup ~= '' then
    redis.call('SET', keys[4], '1', 'PX', DEDUP_TTL_MS)
  end
  if breach then
    redis.call('HINCRBY', def, 'soft_breach_count', 1)
    return Reply.ok('soft_breach', breach[1], breach[2], breach[3])
  end
  return Reply.ok('ok')
end

redis.register_function('ff_report_usage_and_check', report_usage)

-- Actions under which a hard breach stops admission until the budget is reset
-- (docs/budgets.md#hard-limit-actions).
local LOCKING = {block = true, cancel_running = true}

-- A stored count the admission check can trust, or nil plus the corrupt_record reply.
local function count_of(what, raw)
  local n = tonumber(raw or '0')
  if n == nil or n < 0 or n ~= math.floor(n) then
    return nil, Reply.err('corrupt_record', what .. ' does not parse: ' .. tostring(raw))
  end
  return n
end

-- The block detail when the budget cannot admit `eid`'s estimate, else nil; or nil, nil, err.
local function refusal(bid, d, limits, usage, reserved)
  if LOCKING[d.on_hard_limit or ''] and Util.is_set(d.last_breach_at) then
    return 'budget ' .. bid .. ': ' .. (d.last_breach_dim or '') .. ' hard limit breached ('
      .. d.on_hard_limit .. '); waiting for a reset'
  end
  local names = {}
  for f in pairs(limits) do
    names[#names + 1] = f
  end
  table.sort(names)
  for _, f in ipairs(names) do
    local dim = string.match(f, '^hard:(.*)$')
    if dim then
      local lim, e1 = count_of('budget ' .. bid .. ' limit ' .. f, limits[f])
      local used, e2 = count_of('budget ' .. bid .. ' usage ' .. dim, usage[dim])
      local held, e3 = count_of('budget ' .. bid .. ' reserved ' .. dim, reserved[dim])
      local est, e4 = count_of('budget ' .. bid .. ' reserve ' .. dim, limits['reserve:' .. dim])
      local err = e1 or e2 or e3 or e4
      if err then
        return nil, err
      end
      if lim > 0 and used >= lim then
        return 'budget ' .. bid .. ': ' .. dim .. ' ' .. Util.num(used) .. '/' .. Util.num(lim)
      end
      if lim > 0 and est > 0 and used + held + est > lim then
        return 'budget ' .. bid .. ': ' .. dim .. ' ' .. Util.num(used) .. '/' .. Util.num(lim)
          .. ', ' .. Util.num(held) .. ' reserved, needs ' .. Util.num(est)
      end
    end
  end
  return nil
end

-- ff_reserve_budget (admission, docs/budgets.md#reservations)
--   KEYS (6): 1 definition, 2 limits, 3 usage, 4 reserved, 5 holds, 6 inflight.
--   ARGV (4): 1 budget_id, 2 execution_id, 3 now ("" = TIME), 4 claim token: the epoch of the
--     lease the claim will create (one admission per lease; releases name it).
--   Now: ARGV 3, else TIME.
--   Replies: {1,"OK","admitted"} (in-flight, and holding the estimate when the budget has one);
--     {1,"ALREADY_SATISFIED","already_reserved"} (in flight already: a concurrent claim made
--     the admission, or an earlier lease's release has not arrived yet; nothing changes); {1,"OK","not_enforced"} (no definition, or advisory: nothing written);
--     {1,"OK","exhausted",detail} (nothing written): usage at a hard limit, usage + reserved +
--     estimate past it, or a hard breach of a block/cancel_running budget not yet reset.
--   Errors (nothing written): invalid_input (now, empty execution_id), corrupt_record (a
--     stored limit, usage or reservation that is not a count).
--   Writes: ZADD inflight now eid; holds eid = JSON
--     {"t": token, "h": {dim: estimate}} ("h" only with estimates); HINCRBY reserved per
--     estimate.
local RESERVE_ARGV = {
  {1, 'budget_id', 'str'},
  {2, 'execution_id', 'str'},
  {3, 'now', 'int?', min = 0, max = Bounds.TIMESTAMP_MS},
}

local function reserve_budget(keys, argv)
  local a, e = Argv.parse(argv, RESERVE_ARGV)
  if not a then
    return e
  end
  local _, def = budget_keys(keys, a.budget_id)
  for i, suffix in ipairs({'limits', 'usage', 'reserved', 'holds', 'inflight'}) do
    Util.expect_key(keys[i + 1], def .. ':' .. suffix, 'budget ' .. suffix)
  end
  local d = Util.hgetall(def)
  if next(d) == nil or d.enforcement_mode == 'advisory' then
    return Reply.ok('not_enforced')
  end
  if redis.call('ZSCORE', keys[6], a.execution_id) then
    return Reply.already('already_reserved')
  end
  local limits = Util.hgetall(keys[2])
  local detail, err = refusal(a.budget_id, d, limits, Util.hgetall(keys[3]), Util.hgetall(keys[4]))
  if err then
    return err
  end
  if detail then
    return Reply.ok('exhausted', detail)
  end
  redis.call('ZADD', keys[6], Util.num(now_of(a)), a.execution_id)
  local hold = {}
  for f, v in pairs(limits) do
    local dim = string.match(f, '^reserve:(.*)$')
    local est = tonumber(v) or 0
    if dim and est > 0 then
      hold[dim] = est
      redis.call('HINCRBY', keys[4], dim, Util.num(est))
    end
  end
  store_hold(keys[5], a.execution_id, hold, argv[4])
  return Reply.ok('admitted')
end

redis.register_function('ff_reserve_budget', reserve_budget)

-- ff_release_budget (lease end, failed claim, reconciler; docs/budgets.md#reservations)
--   KEYS (4): 1 definition, 2 reserved, 3 holds, 4 inflight.
--   ARGV (4): 1 budget_id, 2 execution_id, 3 claim token ("" = whichever admission: the
--     reconciler), 4 match: "" = only the admission made under that token (a failed claim
--     names the token it reserved with); "up_to" = an admission whose token is at most the
--     given lease epoch (the lease end: that lease's admission, or a stale one of an earlier
--     lease; never one made for a later lease).
--   Replies: {1,"OK","released",freed} (freed = the sum of what it still held, now returned);
--     {1,"ALREADY_SATISFIED","not_held"} (not in flight, or admitted under another token:
--     nothing changes).
--   Errors: invalid_input (empty execution_id).
--   Writes: ZREM inflight; HINCRBY reserved -held per dimension (never below 0); HDEL holds.
local RELEASE_ARGV = {
  {1, 'budget_id', 'str'},
  {2, 'execution_id', 'str'},
}

local function release_budget(keys, argv)
  local a, e = Argv.parse(argv, RELEASE_ARGV)
  if not a then
    return e
  end
  local _, def = budget_keys(keys, a.budget_id)
  for i, suffix in ipairs({'reserved', 'holds', 'inflight'}) do
    Util.expect_key(keys[i + 1], def .. ':' .. suffix, 'budget ' .. suffix)
  end
  local hold, token = hold_of(keys[3], a.execution_id)
  local want = argv[3] or ''
  if want ~= '' then
    local matches = token == want
    if argv[4] == 'up_to' then
      matches = tonumber(token or '') ~= nil and tonumber(want) ~= nil
        and tonumber(token) <= tonumber(want)
    end
    if not matches then
      return Reply.already('not_held')
    end
  end
  local was_in = redis.call('ZREM', keys[4], a.execution_id) == 1
  local freed = 0
  for dim, v in pairs(hold) do
    local held = tonumber(v) or 0
    if held > 0 then
      local left = tonumber(redis.call('HGET', keys[2], dim) or '0') or 0
      local take = math.min(held, math.max(left, 0))
      redis.call('HINCRBY', keys[2], dim, -take)
      freed = freed + take
    end
  end
  local had_hold = redis.call('HDEL', keys[3], a.execution_id) == 1
  if not was_in and not had_hold then
    return Reply.already('not_held')
  end
  return Reply.ok('released', Util.num(freed))
end

redis.register_function('ff_release_budget', release_budget)

-- ff_reset_budget
--   KEYS (3): 1 definition, 2 usage, 3 budget_resets.
--   ARGV (3): 1 budget_id, 2 now ("" = TIME), 3 only_if_due ("1": the reset scanner's call,
--     which resets only a budget whose next_reset_at has passed; "" or "0": always).
--   Now: ARGV 2, else TIME.
--   Replies: {1,"OK","reset",next_reset_at} (0 = not recurring);
--     {1,"ALREADY_SATISFIED","not_due",next_reset_at} (only_if_due and not yet due: another
--     server's scanner got there first).
--   Errors: invalid_input (now, only_if_due); budget_not_found (no definition: the id leaves
--     budget_resets, nothing else is written or created).
--   Writes: every existing usage field set to "0" (fields kept); usage breached_at deleted;
--     definition reset_count += 1, last_reset_at, last_updated_at, last_breach_at "",
--     last_breach_dim "" (breach counts stay cumulative); interval > 0: next_reset_at = now +
--     interval, stored and re-scored in budget_resets; else next_reset_at deleted, ZREM.
local RESET_ARGV = {
  {1, 'budget_id', 'str'},
  {2, 'now', 'int?', min = 0, max = Bounds.TIMESTAMP_MS},
  {3, 'only_if_due', 'int?', min = 0, max = 1, default = 0},
}

local function reset_budget(keys, argv)
  local a, e = Argv.parse(argv, RESET_ARGV)
  if not a then
    return e
  end
  local _, def = budget_keys(keys, a.budget_id)
  Util.expect_key(keys[2], def .. ':usage', 'budget usage')
  local d = redis.call('HMGET', def, 'budget_id', 'reset_interval_ms', 'next_reset_at')
  if not d[1] then
    redis.call('ZREM', keys[3], a.budget_id)
    return Reply.err('budget_not_found', a.budget_id)
  end
  local now = now_of(a)
  local due = tonumber(d[3] or '')
  if a.only_if_due == 1 and due and due > now then
    return Reply.already('not_due', Util.num(due))
  end
  local usage = redis.call('HKEYS', keys[2])
  local zeroed = {}
  for _, f in ipairs(usage) do
    if not RESERVED[f] then
      zeroed[f] = '0'
    end
  end
  Util.hmset(keys[2], zeroed)
  redis.call('HDEL', keys[2], 'breached_at', '_init')
  redis.call('HINCRBY', def, 'reset_count', 1)
  redis.call('HSET', def, 'last_reset_at', Util.num(now), 'last_updated_at', Util.num(now),
    'last_breach_at', '', 'last_breach_dim', '')
  local interval = tonumber(d[2] or '0') or 0
  if interval > 0 then
    local next_at = Util.num(now + interval)
    redis.call('HSET', def, 'next_reset_at', next_at)
    redis.call('ZADD', keys[3], next_at, a.budget_id)
    return Reply.ok('reset', next_at)
  end
  redis.call('HDEL', def, 'next_reset_at')
  redis.call('ZREM', keys[3], a.budget_id)
  return Reply.ok('reset', '0')
end

redis.register_function('ff_reset_budget', reset_budget)

-- ff_reconcile_budget (the budget reconciler, docs/budgets.md#reconcilers)
--   KEYS (4): 1 definition, 2 limits, 3 usage, 4 budget_policies.
--   ARGV (2): 1 budget_id, 2 now ("" = TIME).
--   Now: ARGV 2, else TIME.
--   Replies: {1,"OK",action}: "removed" (no definition: the id left budget_policies),
--     "skipped" (a resetting budget, or no limits), "marked" (breached_at set), "cleared"
--     (breached_at deleted), "unchanged".
--   Errors: invalid_input (now). A definition key of another type fails the call (WRONGTYPE)
--     before any write, so the id stays indexed.
--   Writes: SREM budget_policies (removed); usage breached_at set to now when some hard limit
--     > 0 has usage > limit and no marker exists; deleted when none is breached.
local RECONCILE_ARGV = {
  {1, 'budget_id', 'str'},
  {2, 'now', 'int?', min = 0, max = Bounds.TIMESTAMP_MS},
}

local function reconcile_budget(keys, argv)
  local a, e = Argv.parse(argv, RECONCILE_ARGV)
  if not a then
    return e
  end
  local _, def = budget_keys(keys, a.budget_id)
  Util.expect_key(keys[2], def .. ':limits', 'budget limits')
  Util.expect_key(keys[3], def .. ':usage', 'budget usage')
  local d = Util.hgetall(def)
  if next(d) == nil then
    redis.call('SREM', keys[4], a.budget_id)
    return Reply.ok('removed')
  end
  if Util.is_set(d.reset_interval_ms) and d.reset_interval_ms ~= '0' then
    return Reply.ok('skipped')
  end
  local limits = Util.hgetall(keys[2])
  if next(limits) == nil then
    return Reply.ok('skipped')
  end
  local usage = Util.hgetall(keys[3])
  local breached = false
  for f, v in pairs(limits) do
    local dim = string.match(f, '^hard:(.*)$')
    local lim = tonumber(v) or 0
    if dim and lim > 0 and (tonumber(usage[dim] or '0') or 0) > lim then
      breached = true
    end
  end
  if breached and not usage.breached_at then
    redis.call('HSET', keys[3], 'breached_at', Util.num(now_of(a)))
    return Reply.ok('marked')
  end
  if not breached and usage.breached_at then
    redis.call('HDEL', keys[3], 'breached_at')
    return Reply.ok('cleared')
  end
  return Reply.ok('unchanged')
end

redis.register_function('ff_reconcile_budget', reconcile_budget)
