-- quota.lua: quota policies, admission pacing by a sliding-window rate limit and a concurrency
-- cap, policy-wide or per concurrency key (docs/budgets.md#quota-policies).
--
-- A policy lives on its quota partition {q:K}: the definition ff:quota:{q:K}:<qid>, its
-- admission sequence ...:admission_seq (string), the index of the concurrency keys in use
-- ...:keys (set) and the partition's index ff:idx:{q:K}:quota_policies (set). Admission state
-- lives in a bucket: the policy-wide one (...:window:requests_per_window, ...:concurrency,
-- ...:admitted) or one per concurrency key (...:k:<key>:window, ...:k:<key>:concurrency,
-- ...:k:<key>:admitted). A window is a sorted set, one member per admission (<eid>:<seq>) ->
-- admission time; the admitted set is a sorted set, execution id -> admission time, and is the
-- truth for concurrency (the counter is kept equal to its size). Every key carries the
-- definition's tag, and every KEYS entry is checked against the key built from the definition
-- key and the ids in ARGV (docs/budgets.md#keys).
--
-- uses: reply, util, bounds, argv

local function policy_key(keys, at, qid)
  local tag = Util.tag_of(keys[at])
  local def = 'ff:quota:' .. tostring(tag) .. ':' .. qid
  Util.expect_key(keys[at], def, 'quota policy definition')
  return def
end

-- The prefix of a bucket's keys, or nil plus the invalid_input reply for a bad key (the API
-- edge refuses the same keys: docs/budgets.md#per-key-limits).
local function bucket_prefix(def, ck)
  if ck == nil or ck == '' then
    return def, nil
  end
  if #ck > Bounds.LABEL_BYTES then
    return nil, Reply.err('invalid_input', 'concurrency_key must be at most '
      .. string.format('%.0f', Bounds.LABEL_BYTES) .. ' bytes')
  end
  if string.find(ck, '[%z\1-\32\127]') then
    return nil, Reply.err('invalid_input', 'concurrency_key must not contain whitespace or '
      .. 'control bytes')
  end
  return def .. ':k:' .. ck, nil
end

local function window_key(def, prefix)
  return prefix == def and (def .. ':window:requests_per_window') or (prefix .. ':window')
end

-- Checks a bucket's KEYS (window and admitted may be nil: not passed); raises on a mismatch.
local function expect_bucket(def, prefix, window, concurrency, admitted)
  if window then
    Util.expect_key(window, window_key(def, prefix), 'quota window')
  end
  Util.expect_key(concurrency, prefix .. ':concurrency', 'quota concurrency')
  if admitted then
    Util.expect_key(admitted, prefix .. ':admitted', 'quota admitted set')
  end
end

-- The number of the bucket's waiters (the index checked against the bucket).
local function waiters_of(prefix, key)
  Util.expect_key(key, prefix .. ':waiters', 'quota waiters')
  return Util.num(redis.call('ZCARD', key))
end

-- The counter follows the admitted set (docs/budgets.md#slots).
local function sync_counter(concurrency, admitted)
  local live = redis.call('ZCARD', admitted)
  redis.call('SET', concurrency, Util.num(live))
  return live
end

-- ff_create_quota_policy
--   KEYS (5): 1 definition, 2 window, 3 concurrency, 4 admitted, 5 quota_policies (the policy-
--     wide bucket; per-key buckets need no set-up).
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
  expect_bucket(def, def, keys[2], keys[3], keys[4])
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

-- ff_check_admission_and_record (docs/budgets.md#ffcheckadmissionandrecord)
--   KEYS (6): 1 window, 2 concurrency, 3 definition (only checked, not read: the caller passes
--     the limits it read from it), 4 admitted, 5 keys index, 6 admission_seq; 1, 2 and 4 are
--     the bucket's (the concurrency key's when ARGV 8 is set).
--   ARGV (8): 1 now ("" = TIME), 2 window_seconds, 3 rate_limit (0 = none), 4 concurrency_cap
--     (0 = none), 5 execution_id, 6 jitter_ms ("" = 0), 7 quota_policy_id, 8 concurrency_key
--     ("" = the policy-wide bucket).
--   Now: ARGV 1, else TIME.
--   Replies: {1,"OK","admitted",window_member,admitted_at}; {1,"ALREADY_SATISFIED",
--     "already_admitted"} (the execution holds a slot of the bucket: nothing changes);
--     {1,"OK","rate_exceeded",retry_after_ms};
--     {1,"OK","concurrency_exceeded"} (rate wins when both apply). Denials record nothing.
--   Errors (in order, nothing written): invalid_input ("<name> must be a number, got: <v>";
--     a value outside its bound; execution_id empty; a concurrency_key over LABEL_BYTES or
--     with whitespace or control bytes).
--   Writes: none when already admitted. Else ZREMRANGEBYSCORE window -inf now-W
--     (W = window_seconds x 1000); on admission INCR admission_seq, ZADD window now <eid>:<seq>,
--     ZADD admitted now eid, SET concurrency ZCARD admitted, a key: SADD keys index key.
local CHECK_ARGV = {
  {1, 'now', 'int?', min = 0, max = Bounds.TIMESTAMP_MS},
  {2, 'window_seconds', 'int', min = 0, max = Bounds.QUOTA_WINDOW_S},
  {3, 'rate_limit', 'int', min = 0, max = Bounds.QUOTA_LIMIT},
  {4, 'concurrency_cap', 'int', min = 0, max = Bounds.QUOTA_LIMIT},
  {5, 'execution_id', 'str'},
  {6, 'jitter_ms', 'int?', min = 0, max = Bounds.QUOTA_JITTER_MS, default = 0},
  {7, 'quota_policy_id', 'str'},
}

local function rate_denial(window, a, now, w)
  if a.rate_limit <= 0 or redis.call('ZCARD', window) < a.rate_limit then
    return nil
  end
  local oldest = redis.call('ZRANGE', window, 0, 0, 'WITHSCORES')
  local retry = math.max(0, (tonumber(oldest[2]) or now) + w - now)
  if a.jitter_ms > 0 then
    retry = retry + math.random(0, a.jitter_ms)
  end
  return Reply.ok('rate_exceeded', Util.num(retry))
end

local function check_admission(keys, argv)
  local a, e = Argv.parse(argv, CHECK_ARGV)
  if not a then
    return e
  end
  local def = policy_key(keys, 3, a.quota_policy_id)
  local ck = argv[8] or ''
  local prefix, bad = bucket_prefix(def, ck)
  if not prefix then
    return bad
  end
  expect_bucket(def, prefix, keys[1], keys[2], keys[4])
  Util.expect_key(keys[5], def .. ':keys', 'quota keys index')
  Util.expect_key(keys[6], def .. ':admission_seq', 'quota admission sequence')
  if redis.call('ZSCORE', keys[4], a.execution_id) then
    return Reply.already('already_admitted')
  end
  local now = a.now or Util.now_ms()
  local w = a.window_seconds * 1000
  redis.call('ZREMRANGEBYSCORE', keys[1], '-inf', Util.num(now - w))
  local denied = rate_denial(keys[1], a, now, w)
  if denied then
    return denied
  end
  if a.concurrency_cap > 0 and redis.call('ZCARD', keys[4]) >= a.concurrency_cap then
    return Reply.ok('concurrency_exceeded')
  end
  local member = a.execution_id .. ':' .. Util.num(redis.call('INCR', keys[6]))
  redis.call('ZADD', keys[1], Util.num(now), member)
  redis.call('ZADD', keys[4], Util.num(now), a.execution_id)
  sync_counter(keys[2], keys[4])
  if ck ~= '' then
    redis.call('SADD', keys[5], ck)
  end
  return Reply.ok('admitted', member, Util.num(now))
end

redis.register_function('ff_check_admission_and_record', check_admission)

-- ff_release_admission: the admitted work gave up its lease
-- (docs/budgets.md#releasing-admissions).
--   KEYS (4): 1 definition (only checked), 2 admitted, 3 concurrency, 4 waiters (the
--     bucket's; only read, for the reply's count).
--   ARGV (3): 1 quota_policy_id, 2 execution_id, 3 concurrency_key ("" = policy-wide).
--   Now: not used.
--   Replies: {1,"OK","released",waiters} (a slot was freed); {1,"OK","not_held",waiters}
--     (nothing held: released already, or never admitted; nothing changes). waiters: the
--     bucket's blocked executions (ZCARD of KEYS[4]): a release that frees a
--     slot nobody waits for wakes nobody (docs/budgets.md#waking-blocked-work).
--   Errors (nothing written): invalid_input (an id empty, a bad concurrency_key).
--   Writes: ZREM admitted eid; when it removed a member, SET concurrency ZCARD admitted.
--     Window entries stay: a release does not refund rate.
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
  local prefix, bad = bucket_prefix(def, argv[3])
  if not prefix then
    return bad
  end
  expect_bucket(def, prefix, nil, keys[3], keys[2])
  local waiting = waiters_of(prefix, keys[4])
  if redis.call('ZREM', keys[2], a.execution_id) == 0 then
    return Reply.ok('not_held', waiting)
  end
  sync_counter(keys[3], keys[2])
  return Reply.ok('released', waiting)
end

redis.register_function('ff_release_admission', release_admission)

-- ff_refund_admission: the claim that followed an admission failed, so the admission is undone
-- (docs/budgets.md#ffrefundadmission).
--   KEYS (5): 1 definition (only checked), 2 window, 3 admitted, 4 concurrency, 5 waiters
--     (the bucket's; only read, for the reply's count).
--   ARGV (5): 1 quota_policy_id, 2 execution_id, 3 concurrency_key ("" = policy-wide),
--     4 window_member and 5 admitted_at, both from the admitted reply.
--   Now: not used.
--   Replies: {1,"OK","refunded",waiters} (the slot was freed too); {1,"OK","not_held",
--     waiters} (the window entry, if still there, is removed; the execution's slot is no
--     longer this admission's). waiters: as ff_release_admission's.
--   Errors (nothing written): invalid_input (an id or the window member empty, admitted_at
--     not a number, a bad concurrency_key).
--   Writes: ZREM window window_member; when the admitted score is still admitted_at, ZREM
--     admitted eid and SET concurrency ZCARD admitted.
local REFUND_ARGV = {
  {1, 'quota_policy_id', 'str'},
  {2, 'execution_id', 'str'},
  {4, 'window_member', 'str'},
  {5, 'admitted_at', 'int', min = 0},
}

local function refund_admission(keys, argv)
  local a, e = Argv.parse(argv, REFUND_ARGV)
  if not a then
    return e
  end
  local def = policy_key(keys, 1, a.quota_policy_id)
  local prefix, bad = bucket_prefix(def, argv[3])
  if not prefix then
    return bad
  end
  expect_bucket(def, prefix, keys[2], keys[4], keys[3])
  local waiting = waiters_of(prefix, keys[5])
  redis.call('ZREM', keys[2], a.window_member)
  if tonumber(redis.call('ZSCORE', keys[3], a.execution_id)) ~= a.admitted_at then
    return Reply.ok('not_held', waiting)
  end
  redis.call('ZREM', keys[3], a.execution_id)
  sync_counter(keys[4], keys[3])
  return Reply.ok('refunded', waiting)
end

redis.register_function('ff_refund_admission', refund_admission)

-- ff_reconcile_quota_policy: the quota reconciler's repair of one bucket
-- (docs/budgets.md#reconcilers). The caller found the members that hold no live lease.
--   KEYS (6): 1 definition, 2 window, 3 concurrency, 4 admitted (the bucket's), 5 keys index,
--     6 quota_policies.
--   ARGV (3 + 2n): 1 quota_policy_id, 2 concurrency_key ("" = policy-wide), 3 now ("" = TIME),
--     then n pairs execution_id, admitted_at (n <= 100).
--   Now: ARGV 3, else TIME.
--   Replies: {1,"OK",removed,counter,drifted} (drifted "1" when the counter differed from the
--     live count); {1,"ALREADY_SATISFIED","removed"} (no definition: the id left
--     quota_policies).
--   Errors (nothing written): invalid_input (now, a pair not numeric, too many pairs, a bad
--     concurrency_key).
--   Writes: ZREMRANGEBYSCORE window -inf now-W; ZREM admitted each pair's execution whose
--     score is still its admitted_at (a re-admission in between keeps its slot); SET
--     concurrency ZCARD admitted. A key whose window and admitted set are empty: SREM keys
--     index key, DEL its concurrency.
local RECONCILE_ARGV = {
  {1, 'quota_policy_id', 'str'},
  {3, 'now', 'int?', min = 0, max = Bounds.TIMESTAMP_MS},
}
local RECONCILE_PAIRS = 100

local function stale_pairs(argv)
  local n = (#argv - 3) / 2
  if n ~= math.floor(n) or n > RECONCILE_PAIRS then
    return nil, Reply.err('invalid_input', 'expected at most ' .. RECONCILE_PAIRS
      .. ' execution_id, admitted_at pairs')
  end
  local pairs_ = {}
  for i = 0, n - 1 do
    local at = argv[5 + 2 * i]
    if not Argv.is_int(at) or argv[4 + 2 * i] == '' then
      return nil, Reply.err('invalid_input', 'admitted_at must be a number, got: ' .. tostring(at))
    end
    pairs_[#pairs_ + 1] = {argv[4 + 2 * i], tonumber(at)}
  end
  return pairs_, nil
end

local function reconcile_quota(keys, argv)
  local a, e = Argv.parse(argv, RECONCILE_ARGV)
  if not a then
    return e
  end
  local stale, bad_pairs = stale_pairs(argv)
  if not stale then
    return bad_pairs
  end
  local def = policy_key(keys, 1, a.quota_policy_id)
  local ck = argv[2] or ''
  local prefix, bad = bucket_prefix(def, ck)
  if not prefix then
    return bad
  end
  expect_bucket(def, prefix, keys[2], keys[3], keys[4])
  Util.expect_key(keys[5], def .. ':keys', 'quota keys index')
  local d = Util.hgetall(def)
  if next(d) == nil then
    redis.call('SREM', keys[6], a.quota_policy_id)
    return Reply.already('removed')
  end
  local window_s = tonumber(d.requests_per_window_seconds or '0') or 0
  local now = a.now or Util.now_ms()
  redis.call('ZREMRANGEBYSCORE', keys[2], '-inf', Util.num(now - window_s * 1000))
  local removed = 0
  for _, p in ipairs(stale) do
    if tonumber(redis.call('ZSCORE', keys[4], p[1])) == p[2] then
      removed = removed + redis.call('ZREM', keys[4], p[1])
    end
  end
  local before = tonumber(redis.call('GET', keys[3]) or '')
  local live = redis.call('ZCARD', keys[4])
  local drifted = before ~= live and '1' or '0'
  if ck ~= '' and live == 0 and redis.call('ZCARD', keys[2]) == 0 then
    redis.call('SREM', keys[5], ck)
    redis.call('DEL', keys[3])
  else
    redis.call('SET', keys[3], Util.num(live))
  end
  return Reply.ok(Util.num(removed), Util.num(live), drifted)
end

redis.register_function('ff_reconcile_quota_policy', reconcile_quota)
