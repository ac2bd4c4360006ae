-- quota.lua: quota policies, admission pacing by a sliding-window rate limit and a concurrency
-- cap (docs/budgets.md#quota-policies).
--
-- A policy lives on its quota partition {q:K}: the definition ff:quota:{q:K}:<qid>, its window
-- ...:window:requests_per_window (zset: execution id -> admission time), ...:concurrency (string
-- counter), ...:admitted_set (set of admitted execution ids) and one guard per admission
-- ...:admitted:<eid> (string, TTL = the window), plus the partition's index
-- ff:idx:{q:K}:quota_policies (set). KEYS are checked against the keys built from the
-- definition key; guards of members found by the reconciler are built from it at run time
-- (docs/architecture.md#keys-built-inside-lua).
--
-- uses: reply, util, bounds, argv

local function policy_key(keys, at, qid)
  local tag = Util.tag_of(keys[at])
  local def = 'ff:quota:' .. tostring(tag) .. ':' .. qid
  Util.expect_key(keys[at], def, 'quota policy definition')
  return def
end

-- ff_create_quota_policy
--   KEYS (5): 1 definition, 2 window, 3 concurrency, 4 admitted_set, 5 quota_policies.
--   ARGV (6): 1 quota_policy_id, 2 window_seconds, 3 max_requests_per_window (0 = no rate
--     limit), 4 max_concurrent (0 = no cap), 5 jitter_ms ("" = 0), 6 now ("" = TIME).
--   Now: ARGV 6, else TIME.
--   Replies: {1,"OK","created"}; {1,"ALREADY_SATISFIED","exists"} (nothing changes).
--   Errors (in order, nothing written): invalid_input (a number missing or outside its bound;
--     window_seconds 0 with a non-zero limit).
--   Writes: definition (quota_policy_id, requests_per_window_seconds, max_requests_per_window,
--     active_concurrency_cap, jitter_ms, created_at); SET concurrency "0"; SADD quota_policies.
local CREATE_ARGV = {
  {1, 'quota_policy_id', 'str'},
  {2, 'window_seconds', 'int', min = 0, max = Bounds.QUOTA_WINDOW_S},
  {3, 'max_requests_per_window', 'int', min = 0, max = Bounds.QUOTA_LIMIT},
  {4, 'max_concurrent', 'int', min = 0, max = Bounds.QUOTA_LIMIT},
  {5, 'jitter_ms', 'int?', min = 0, max = Bounds.QUOTA_JITTER_MS, default = 0},
  {6, 'now', 'int?', min = 0, max = Bounds.TIMESTAMP_MS},
}

local function create_quota_policy(keys, argv)
  local a, e = Argv.parse(argv, CREATE_ARGV)
  if not a then
    return e
  end
  if a.window_seconds == 0 and (a.max_requests_per_window > 0 or a.max_concurrent > 0) then
    return Reply.err('invalid_input', 'window_seconds must be positive when a limit is set')
  end
  local def = policy_key(keys, 1, a.quota_policy_id)
  Util.expect_key(keys[2], def .. ':window:requests_per_window', 'quota window')
  Util.expect_key(keys[3], def .. ':concurrency', 'quota concurrency')
  Util.expect_key(keys[4], def .. ':admitted_set', 'quota admitted set')
  if redis.call('EXISTS', def) == 1 then
    return Reply.already('exists')
  end
  redis.call('HSET', def, 'quota_policy_id', a.quota_policy_id,
    'requests_per_window_seconds', Util.num(a.window_seconds),
    'max_requests_per_window', Util.num(a.max_requests_per_window),
    'active_concurrency_cap', Util.num(a.max_concurrent), 'jitter_ms', Util.num(a.jitter_ms),
    'created_at', Util.num(a.now or Util.now_ms()))
  redis.call('SET', keys[3], '0')
  redis.call('SADD', keys[5], a.quota_policy_id)
  return Reply.ok('created')
end

redis.register_function('ff_create_quota_policy', create_quota_policy)

-- ff_check_admission_and_record
--   KEYS (5): 1 window, 2 concurrency, 3 definition (only checked, not read: the caller passes
--     the limits it read from it), 4 guard ...:admitted:<eid>, 5 admitted_set.
--   ARGV (7): 1 now ("" = TIME), 2 window_seconds, 3 rate_limit (0 = none), 4 concurrency_cap
--     (0 = none), 5 execution_id, 6 jitter_ms ("" = 0), 7 quota_policy_id.
--   Now: ARGV 1, else TIME.
--   Replies: {1,"OK","admitted"}; {1,"ALREADY_SATISFIED","already_admitted"} (a live guard:
--     nothing changes); {1,"OK","rate_exceeded",retry_after_ms}; {1,"OK",
--     "concurrency_exceeded"} (rate wins when both apply). Denials record nothing.
--   Errors (in order, nothing written): invalid_input ("<name> must be a number, got: <v>";
--     a value outside its bound; execution_id empty).
--   Writes: ZREMRANGEBYSCORE window -inf now-W (W = window_seconds x 1000); on admission ZADD
--     window now eid (re-admitting refreshes the score), W > 0: SET guard "1" PX W NX,
--     cap > 0: INCR concurrency, SADD admitted_set eid.
local CHECK_ARGV = {
  {1, 'now', 'int?', min = 0, max = Bounds.TIMESTAMP_MS},
  {2, 'window_seconds', 'int', min = 0, max = Bounds.QUOTA_WINDOW_S},
  {3, 'rate_limit', 'int', min = 0, max = Bounds.QUOTA_LIMIT},
  {4, 'concurrency_cap', 'int', min = 0, max = Bounds.QUOTA_LIMIT},
  {5, 'execution_id', 'str'},
  {6, 'jitter_ms', 'int?', min = 0, max = Bounds.QUOTA_JITTER_MS, default = 0},
  {7, 'quota_policy_id', 'str'},
}

local function check_admission(keys, argv)
  local a, e = Argv.parse(argv, CHECK_ARGV)
  if not a then
    return e
  end
  local def = policy_key(keys, 3, a.quota_policy_id)
  Util.expect_key(keys[1], def .. ':window:requests_per_window', 'quota window')
  Util.expect_key(keys[2], def .. ':concurrency', 'quota concurrency')
  Util.expect_key(keys[4], def .. ':admitted:' .. a.execution_id, 'admission guard')
  Util.expect_key(keys[5], def .. ':admitted_set', 'quota admitted set')
  if redis.call('EXISTS', keys[4]) == 1 then
    return Reply.already('already_admitted')
  end
  local now = a.now or Util.now_ms()
  local w = a.window_seconds * 1000
  redis.call('ZREMRANGEBYSCORE', keys[1], '-inf', Util.num(now - w))
  if a.rate_limit > 0 and redis.call('ZCARD', keys[1]) >= a.rate_limit then
    local oldest = redis.call('ZRANGE', keys[1], 0, 0, 'WITHSCORES')
    local retry = math.max(0, (tonumber(oldest[2]) or now) + w - now)
    if a.jitter_ms > 0 then
      retry = retry + math.random(0, a.jitter_ms)
    end
    return Reply.ok('rate_exceeded', Util.num(retry))
  end
  if a.concurrency_cap > 0 and (tonumber(redis.call('GET', keys[2]) or '0') or 0)
    >= a.concurrency_cap then
    return Reply.ok('concurrency_exceeded')
  end
  redis.call('ZADD', keys[1], Util.num(now), a.execution_id)
  if w > 0 then
    redis.call('SET', keys[4], '1', 'PX', Util.num(w), 'NX')
  end
  if a.concurrency_cap > 0 then
    redis.call('INCR', keys[2])
  end
  redis.call('SADD', keys[5], a.execution_id)
  return Reply.ok('admitted')
end

redis.register_function('ff_check_admission_and_record', check_admission)

-- ff_release_admission
--   KEYS (4): 1 definition (only checked), 2 guard ...:admitted:<eid>, 3 admitted_set,
--     4 concurrency.
--   ARGV (2): 1 quota_policy_id, 2 execution_id.
--   Now: not used.
--   Replies: {1,"OK","released"}, always (releasing twice, or what was never admitted, is a
--     no-op on the counter).
--   Errors: invalid_input (an id empty).
--   Writes: DEL guard; SREM admitted_set eid; DECR concurrency only when the SREM removed a
--     member and the counter is > 0. Window entries stay: a release does not refund rate.
local RELEASE_ARGV = {
  {1, 'quota_policy_id', 'str'},
  {2, 'execution_id', 'str'},
}

local function release_admission(keys, argv)
  local a, e = Argv.parse(argv, RELEASE_ARGV)
  if not a then
    return e
  end
  local def = policy_key(keys, 1, a.quota_policy_id)
  Util.expect_key(keys[2], def .. ':admitted:' .. a.execution_id, 'admission guard')
  Util.expect_key(keys[3], def .. ':admitted_set', 'quota admitted set')
  Util.expect_key(keys[4], def .. ':concurrency', 'quota concurrency')
  redis.call('DEL', keys[2])
  if redis.call('SREM', keys[3], a.execution_id) == 1
    and (tonumber(redis.call('GET', keys[4]) or '0') or 0) > 0 then
    redis.call('DECR', keys[4])
  end
  return Reply.ok('released')
end

redis.register_function('ff_release_admission', release_admission)

-- ff_reconcile_quota_policy (the quota reconciler, docs/budgets.md#reconcilers): one SSCAN page
-- of the admitted set per call; the caller repeats with the returned cursor until it is "0".
--   KEYS (5): 1 definition, 2 window, 3 concurrency, 4 admitted_set, 5 quota_policies.
--   ARGV (3): 1 quota_policy_id, 2 cursor ("0" starts a pass), 3 now ("" = TIME).
--   Now: ARGV 3, else TIME.
--   Replies: {1,"OK",next_cursor,pruned,counter} (counter "" unless this call ended the pass
--     and rewrote it); {1,"ALREADY_SATISFIED","removed"} (no definition: the id left
--     quota_policies).
--   Errors: invalid_input (cursor, now).
--   Writes: first page (cursor "0"), when requests_per_window_seconds > 0: ZREMRANGEBYSCORE
--     window -inf now-W. Every page: SREM admitted_set members whose guard has expired (also
--     for rate-only policies). Last page (next cursor "0"), cap > 0 and counter ~= SCARD
--     admitted_set: SET concurrency to SCARD (admission and release keep set and counter
--     together, so the pruned set size is the live count).
local RECONCILE_ARGV = {
  {1, 'quota_policy_id', 'str'},
  {2, 'cursor', 'int', min = 0},
  {3, 'now', 'int?', min = 0, max = Bounds.TIMESTAMP_MS},
}
local RECONCILE_PAGE = 100

local function reconcile_quota(keys, argv)
  local a, e = Argv.parse(argv, RECONCILE_ARGV)
  if not a then
    return e
  end
  local def = policy_key(keys, 1, a.quota_policy_id)
  Util.expect_key(keys[2], def .. ':window:requests_per_window', 'quota window')
  Util.expect_key(keys[3], def .. ':concurrency', 'quota concurrency')
  Util.expect_key(keys[4], def .. ':admitted_set', 'quota admitted set')
  local d = Util.hgetall(def)
  if next(d) == nil then
    redis.call('SREM', keys[5], a.quota_policy_id)
    return Reply.already('removed')
  end
  local window_s = tonumber(d.requests_per_window_seconds or '0') or 0
  if argv[2] == '0' and window_s > 0 then
    local now = a.now or Util.now_ms()
    redis.call('ZREMRANGEBYSCORE', keys[2], '-inf', Util.num(now - window_s * 1000))
  end
  local page = redis.call('SSCAN', keys[4], argv[2], 'COUNT', RECONCILE_PAGE)
  local pruned = 0
  for _, eid in ipairs(page[2]) do
    if redis.call('EXISTS', def .. ':admitted:' .. eid) == 0 then
      pruned = pruned + redis.call('SREM', keys[4], eid)
    end
  end
  local counter = ''
  if page[1] == '0' and (tonumber(d.active_concurrency_cap or '0') or 0) > 0 then
    local live = redis.call('SCARD', keys[4])
    if tonumber(redis.call('GET', keys[3]) or '') ~= live then
      redis.call('SET', keys[3], Util.num(live))
      counter = Util.num(live)
    end
  end
  return Reply.ok(page[1], Util.num(pruned), counter)
end

redis.register_function('ff_reconcile_quota_policy', reconcile_quota)
