-- signal.lua: signal delivery and buffering, and the waitpoint HMAC keystore
-- (docs/suspension.md#waitpoint-tokens,
-- docs/suspension.md#signal-delivery, docs/suspension.md#buffering-on-pending-waitpoints,
-- docs/suspension.md#kid-rotation).
--
-- Every key is on the tag of KEYS[1]. The waitpoint condition and signal stream, the signal
-- payload key and lane sets are built at run time from that tag
-- (docs/architecture.md#keys-built-inside-lua). Events go
-- to ff:signal_events:{p} (docs/suspension.md#watches) after the writes, never for rejected or
-- duplicate calls,
-- and never carry tokens, secrets or payload bytes.
--
-- uses: reply, util, bounds, argv, keys, state, policy, hmac, condition, suspend

local DEFAULT_SIGNAL_DEDUP_TTL_MS = 86400000
local DEFAULT_MAX_SIGNALS = 10000
local DEFAULT_SIGNAL_MAXLEN = 1000
local MAX_GRACE_MS = 9007199254740991

-- Shape checks of the signal ARGV (deliver and buffer share the layout). Returns the parsed
-- numbers or nil plus the invalid_input reply.
local SIGNAL_ARGV = {
  {13, 'created_at', 'int?', min = 0, max = Bounds.TIMESTAMP_MS},
  {14, 'dedup_ttl_ms', 'int?', min = 0, max = Bounds.DEDUP_TTL_MS,
    default = DEFAULT_SIGNAL_DEDUP_TTL_MS},
  {15, 'resume_delay_ms', 'int?', min = 0, max = Bounds.HORIZON_MS, default = 0},
  {16, 'max_signals_per_execution', 'int?', min = 0, max = Bounds.MAX_SIGNALS,
    default = DEFAULT_MAX_SIGNALS},
  {17, 'signal_maxlen', 'int?', min = 1, max = Bounds.STREAM_MAXLEN,
    default = DEFAULT_SIGNAL_MAXLEN},
  {2, 'waitpoint_id', 'str'},
  {3, 'signal_id', 'str'},
  {4, 'signal_name', 'str'},
}

local function signal_args(argv)
  local a, e = Argv.parse(argv, SIGNAL_ARGV)
  if not a then
    return nil, e
  end
  return {created_at = a.created_at, ttl = a.dedup_ttl_ms, delay = a.resume_delay_ms,
    limit = a.max_signals_per_execution, maxlen = a.signal_maxlen}, nil
end

-- Token failures (docs/suspension.md#token-security-properties failure stamp). Keystore faults
-- (invalid_keys_missing_hmac,
-- hmac_secret_not_initialized, invalid_secret) are the server's, not the sender's: no stamp.
local TOKEN_FAILURES = {missing_token = true, invalid_token = true, token_expired = true}

-- Steps 1-3b of docs/suspension.md#signal-delivery (also the buffer's front): core, waitpoint
-- existence and binding,
-- token, then the dedup key. A token failure stamps last_hmac_validation_failed_at (the only
-- write of a rejected call). Returns x, the waitpoint hash and the dedup key (or nil), or nil
-- plus the reply (error or DUPLICATE).
local function authenticate(keys, argv)
  local x = State.load_exec(keys, argv)
  if not x then
    return nil, Reply.err('execution_not_found')
  end
  local wpid, sid, idem = argv[2], argv[3], argv[11]
  Util.expect_key(keys[2], Keys.waitpoint(x.tag, wpid), 'waitpoint')
  Util.expect_key(keys[5], 'ff:signal:' .. x.tag .. ':' .. sid, 'signal')
  local dedup
  if idem ~= nil and idem ~= '' then
    dedup = 'ff:sigdedup:' .. x.tag .. ':' .. wpid .. ':' .. idem
    Util.expect_key(keys[6], dedup, 'dedup')
  end
  local now = Util.now_ms()
  x.now = now
  local wp = Util.hgetall(keys[2])
  local terr
  if not Util.is_set(wp.created_at) or wp.execution_id ~= x.eid then
    terr = Reply.err('invalid_token')
  else
    terr = Hmac.validate(keys[3], argv[18], wpid, wp.waitpoint_key or '', wp.created_at, now)
  end
  if terr then
    if TOKEN_FAILURES[terr[2]] then
      redis.call('HSET', x.core_key, 'last_hmac_validation_failed_at', Util.num(now))
    end
    return nil, terr
  end
  if dedup then
    local existing = redis.call('GET', dedup)
    if existing then
      return nil, {1, 'DUPLICATE', existing}
    end
  end
  return x, wp, dedup
end

-- Dedup key, stream entry, signal hash (with its stream_id) and payload of an accepted signal.
-- Returns the stream id.
local function record_signal(x, keys, argv, a, dedup, effect, matched)
  local now, wpid, sid = x.now, argv[2], argv[3]
  if dedup and a.ttl > 0 then
    redis.call('SET', dedup, sid, 'NX', 'PX', Util.num(a.ttl))
  end
  local stream_id = redis.call('XADD', keys[2] .. ':signals', 'MAXLEN', '~', Util.num(a.maxlen), '*',
    'signal_id', sid, 'signal_name', argv[4], 'signal_category', argv[5],
    'source_type', argv[6], 'source_identity', argv[7], 'matched', '0',
    'accepted_at', Util.num(now))
  redis.call('HSET', keys[5], 'signal_id', sid, 'target_execution_id', x.eid,
    'target_waitpoint_id', wpid, 'target_scope', (argv[12] ~= '' and argv[12]) or 'waitpoint',
    'signal_name', argv[4], 'signal_category', argv[5], 'source_type', argv[6],
    'source_identity', argv[7], 'correlation_id', argv[10], 'idempotency_key', argv[11],
    'created_at', Util.num(a.created_at or now), 'accepted_at', Util.num(now),
    'matched_waitpoint_id', (matched and wpid) or '',
    'payload_encoding', (argv[9] ~= '' and argv[9]) or 'json', 'observed_effect', effect,
    'stream_id', stream_id)
  if argv[8] ~= '' then
    redis.call('SET', keys[5] .. ':payload', argv[8])
  end
  return stream_id
end

local function accepted_event(x, argv, kind, effect, stream_id)
  Suspend.signal_event(x.tag, {type = kind, execution_id = x.eid, waitpoint_id = argv[2],
    signal_id = argv[3], signal_name = argv[4], signal_category = argv[5],
    source_type = argv[6], source_identity = argv[7], correlation_id = argv[10],
    observed_effect = effect, stream_id = stream_id, accepted_at = x.now, at = x.now})
end

-- Steps 4-9 of docs/suspension.md#signal-delivery after authentication. Returns the condition state
-- or the reply.
local function deliverable(x, keys, wp, a)
  local c = x.core
  if c.lifecycle_phase == 'terminal' then
    return nil, Reply.err('target_not_signalable')
  elseif wp.state == 'pending' then
    return nil, Reply.err('waitpoint_pending_use_buffer_script')
  elseif c.lifecycle_phase ~= 'suspended' and wp.state ~= 'active' then
    -- A waitpoint closed after use (resumed, proactive close, timeout) says so, so a replay of
    -- the signal that resumed gets waitpoint_closed (docs/suspension.md#token-security-properties,
    -- docs/suspension.md#signal-delivery); one that expired
    -- never activated (never_committed) was never signalable (docs/suspension.md#decisions).
    if wp.state == 'closed' then
      return nil, Reply.err('waitpoint_closed')
    end
    return nil, Reply.err('target_not_signalable')
  end
  local st = Condition.load(keys[2] .. ':condition')
  if not st then
    if wp.state == 'closed' then
      return nil, Reply.err('waitpoint_closed')
    elseif wp.state == 'expired' then
      return nil, Reply.err('target_not_signalable')
    end
    return nil, Reply.err('waitpoint_not_found')
  elseif st.closed then
    return nil, Reply.err('waitpoint_closed')
  elseif a.limit > 0 and redis.call('ZCARD', keys[4]) >= a.limit then
    return nil, Reply.err('signal_limit_exceeded')
  end
  return st, nil
end

-- ff_deliver_signal
--   KEYS (8): 1 core, 2 waitpoint (ff:wp:{p}:<ARGV[2]>), 3 HMAC keystore, 4 exec signals zset,
--     5 signal hash (ff:signal:{p}:<ARGV[3]>), 6 dedup key ff:sigdedup:{p}:<wp>:<ARGV[11]> (or
--     ff:noop:{p} without an idempotency key), 7 suspension current, 8 suspension_timeout.
--     Built: condition, signal stream and payload keys, lane suspended/eligible/delayed.
--   ARGV (18): 1 execution_id, 2 waitpoint_id, 3 signal_id, 4 signal_name, 5 signal_category,
--     6 source_type, 7 source_identity, 8 payload (raw bytes, stored verbatim; "" = none),
--     9 payload_encoding ("" = json), 10 correlation_id, 11 idempotency_key ("" = none),
--     12 target_scope ("" = waitpoint), 13 created_at ("" = now), 14 dedup_ttl_ms
--     ("" = 86400000; 0 disables), 15 resume_delay_ms ("" = 0; 0 falls back to the stored
--     resume_policy_json's resume_delay_ms), 16 max_signals_per_execution ("" = 10000;
--     0 disables), 17 signal_maxlen ("" = 1000), 18 waitpoint_token.
--   Now: TIME.
--   Replies: {1,"OK",signal_id,observed_effect,stream_id,accepted_at}
--       observed_effect: no_op | appended_to_waitpoint | resume_condition_satisfied
--     | {1,"DUPLICATE",existing_signal_id} (nothing written, nothing published)
--   Errors (in order): invalid_input (numeric ARGV, empty ids/name), execution_not_found,
--     invalid_token (waitpoint missing or of another execution), the token codes of
--     docs/suspension.md
--     docs/suspension.md#token-validation (invalid_keys_missing_hmac, missing_token, invalid_token,
--     hmac_secret_not_initialized,
--     token_expired, invalid_secret; missing_token, invalid_token and token_expired stamp core
--     last_hmac_validation_failed_at, the only write of a rejected call), then DUPLICATE,
--     target_not_signalable (terminal; or not suspended and the waitpoint neither active nor
--     closed, e.g. expired without activation), waitpoint_pending_use_buffer_script (pending
--     waitpoint), waitpoint_closed (closed waitpoint or closed condition), waitpoint_not_found (no condition),
--     signal_limit_exceeded.
--   Writes (accepted): when the condition is satisfied and the execution is suspended on this
--     waitpoint: core resume vector (delayed: "resume delay <n>ms after signal <name>",
--     delay_until), current ids cleared, ZREM lane suspended and suspension_timeout, ZADD lane
--     eligible or delayed. Always: ZADD exec signals (accepted_at); dedup SET NX PX ttl;
--     XADD signal stream MAXLEN ~ signal_maxlen; signal hash (+ stream_id) and payload;
--     condition matcher fields; waitpoint signal_count, matched_signal_count, last_signal_at;
--     suspension last_signal_at. Satisfied: condition closed=1 (satisfied), waitpoint closed
--     (resumed, satisfied_at), suspension closed (resumed). Events: signal_accepted,
--     execution_resumed, waitpoint_closed.
local function deliver_signal(keys, argv)
  local a, aerr = signal_args(argv)
  if not a then
    return aerr
  end
  local x, wp, dedup = authenticate(keys, argv)
  if not x then
    return wp
  end
  local st, derr = deliverable(x, keys, wp, a)
  if not st then
    return derr
  end
  local c, now, wpid, sid, name = x.core, x.now, argv[2], argv[3], argv[4]
  local matched = Condition.match(st, name, sid)
  local satisfied = matched and Condition.satisfied(st)
  local effect = 'no_op'
  if satisfied then
    effect = 'resume_condition_satisfied'
  elseif matched then
    effect = 'appended_to_waitpoint'
  end
  local s = Util.hgetall(keys[7])
  local own = Util.is_set(s.suspension_id) and s.waitpoint_id == wpid and not Util.is_set(s.closed_at)
  local public
  if satisfied and c.lifecycle_phase == 'suspended' and c.current_waitpoint_id == wpid then
    local delay = a.delay
    if delay == 0 then
      delay = Policy.resume_delay(s.resume_policy_json)
    end
    public = Suspend.resume_core(x, keys[8], delay,
      'resume delay ' .. delay .. 'ms after signal ' .. name, now)
  end
  redis.call('ZADD', keys[4], Util.num(now), sid)
  local stream_id = record_signal(x, keys, argv, a, dedup, effect, matched)
  Condition.write(keys[2] .. ':condition', st, now, satisfied and 'satisfied' or nil)
  redis.call('HINCRBY', keys[2], 'signal_count', 1)
  if matched then
    redis.call('HINCRBY', keys[2], 'matched_signal_count', 1)
  end
  redis.call('HSET', keys[2], 'last_signal_at', Util.num(now))
  if own then
    redis.call('HSET', keys[7], 'last_signal_at', Util.num(now))
    if satisfied then
      redis.call('HSET', keys[7], 'satisfied_at', Util.num(now), 'closed_at', Util.num(now),
        'close_reason', 'resumed')
    end
  end
  accepted_event(x, argv, 'signal_accepted', effect, stream_id)
  if public then
    Suspend.signal_event(x.tag, {type = 'execution_resumed', execution_id = x.eid, waitpoint_id = wpid,
      public_state = public, trigger = 'signal', signal_id = sid, at = now})
  end
  if satisfied then
    Suspend.close_waitpoint(x, wpid, 'resumed', 'satisfied', now, true)
  end
  return Reply.ok(sid, effect, stream_id, Util.num(now))
end

redis.register_function('ff_deliver_signal', deliver_signal)

-- ff_buffer_signal_for_pending_waitpoint
--   KEYS (8) and ARGV (18): as ff_deliver_signal (KEYS 7, 8 and ARGV 15 unused; empty ARGV
--     take the defaults).
--   Now: TIME.
--   Replies: {1,"OK",signal_id,"buffered_for_pending_waitpoint",stream_id,accepted_at}
--     | {1,"DUPLICATE",existing_signal_id} (nothing written, nothing published)
--   Errors (in order): invalid_input, execution_not_found, invalid_token (waitpoint missing or
--     of another execution) and the token codes (stamped as in ff_deliver_signal),
--     then DUPLICATE, target_not_signalable (terminal execution), waitpoint_closed
--     (closed/expired), waitpoint_not_pending (active), signal_limit_exceeded.
--   Writes: ZADD exec signals; dedup SET NX PX ttl; XADD signal stream; signal hash
--     (observed_effect buffered_for_pending_waitpoint) and payload; waitpoint signal_count+1,
--     last_signal_at. No evaluation, no state change. Event: signal_buffered.
local function buffer_signal(keys, argv)
  local a, aerr = signal_args(argv)
  if not a then
    return aerr
  end
  local x, wp, dedup = authenticate(keys, argv)
  if not x then
    return wp
  end
  if x.core.lifecycle_phase == 'terminal' then
    return Reply.err('target_not_signalable')
  elseif wp.state == 'closed' or wp.state == 'expired' then
    return Reply.err('waitpoint_closed')
  elseif wp.state ~= 'pending' then
    return Reply.err('waitpoint_not_pending')
  elseif a.limit > 0 and redis.call('ZCARD', keys[4]) >= a.limit then
    return Reply.err('signal_limit_exceeded')
  end
  local now, effect = x.now, 'buffered_for_pending_waitpoint'
  redis.call('ZADD', keys[4], Util.num(now), argv[3])
  local stream_id = record_signal(x, keys, argv, a, dedup, effect, false)
  redis.call('HINCRBY', keys[2], 'signal_count', 1)
  redis.call('HSET', keys[2], 'last_signal_at', Util.num(now))
  accepted_event(x, argv, 'signal_buffered', effect, stream_id)
  return Reply.ok(argv[3], effect, stream_id, Util.num(now))
end

redis.register_function('ff_buffer_signal_for_pending_waitpoint', buffer_signal)

-- -------------------------------------------------------------------------------------------
-- The waitpoint HMAC keystore ff:sec:{p}:waitpoint_hmac (docs/suspension.md#the-keystore):
-- current_kid,
-- secret:<kid>, expires_at:<kid> (non-current kids only), previous_kid/previous_expires_at
-- (audit mirror). Secrets never appear in replies or errors.
-- -------------------------------------------------------------------------------------------

local function valid_kid(kid)
  return type(kid) == 'string' and kid ~= '' and not string.find(kid, ':', 1, true)
end

-- ff_rotate_waitpoint_hmac_secret (one partition; the server fans out)
--   KEYS (1): 1 HMAC keystore.
--   ARGV (3): 1 new_kid, 2 new_secret_hex, 3 grace_ms (integer 0..2^53-1).
--   Now: TIME.
--   Replies: {1,"OK","rotated",previous_kid or "",new_kid,gc_count} | {1,"OK","noop",kid}
--   Errors (in order): invalid_kid (empty or contains ':'), invalid_secret_hex (empty, odd,
--     non-hex), invalid_grace_ms, rotation_conflict (detail = kid: new_kid is current with
--     another secret, or a still-held verifying kid with another secret). Nothing is written on
--     an error.
--   Writes: noop: secret:<current> when it was missing (torn). Rotated: GC of every
--     expires_at:<kid> not a positive integer >= now (with its secret:<kid>); when a current
--     kid exists: previous_kid, previous_expires_at and expires_at:<old> = now + grace;
--     current_kid = new_kid, secret:<new_kid>; a re-used verifying kid (same secret) is
--     reinstated and its expires_at:<new_kid> deleted.
local function rotate_hmac_secret(keys, argv)
  local kid, hex = argv[1], argv[2]
  if not valid_kid(kid) then
    return Reply.err('invalid_kid')
  end
  if not Hmac.hex_to_bytes(hex) then
    return Reply.err('invalid_secret_hex')
  end
  local grace = Argv.is_int(argv[3]) and tonumber(argv[3]) or nil
  if not grace or grace < 0 or grace > MAX_GRACE_MS then
    return Reply.err('invalid_grace_ms')
  end
  local ks = Util.hgetall(keys[1])
  local current = ks.current_kid
  if current == kid then
    local stored = ks['secret:' .. kid]
    if stored == nil then
      redis.call('HSET', keys[1], 'secret:' .. kid, hex)
    elseif stored ~= hex then
      return Reply.err('rotation_conflict', kid)
    end
    return Reply.ok('noop', kid)
  end
  local now = Util.now_ms()
  local collect = {}
  for field in pairs(ks) do
    local held = string.match(field, '^expires_at:(.*)$')
    if held then
      local exp = Hmac.kid_expiry(ks[field])
      if not exp or exp < now then
        collect[#collect + 1] = held
      end
    end
  end
  local reused = ks['secret:' .. kid]
  for _, held in ipairs(collect) do
    if held == kid then
      reused = nil
    end
  end
  if reused and reused ~= hex then
    return Reply.err('rotation_conflict', kid)
  end
  for _, held in ipairs(collect) do
    redis.call('HDEL', keys[1], 'expires_at:' .. held, 'secret:' .. held)
  end
  local prev = ''
  if Util.is_set(current) then
    prev = current
    local until_ms = Util.num(now + grace)
    redis.call('HSET', keys[1], 'previous_kid', current, 'previous_expires_at', until_ms,
      'expires_at:' .. current, until_ms)
  end
  redis.call('HDEL', keys[1], 'expires_at:' .. kid)
  redis.call('HSET', keys[1], 'current_kid', kid, 'secret:' .. kid, hex)
  return Reply.ok('rotated', prev, kid, Util.num(#collect))
end

redis.register_function('ff_rotate_waitpoint_hmac_secret', rotate_hmac_secret)

-- ff_list_waitpoint_hmac_kids (read-only, no-writes)
--   KEYS (1): 1 HMAC keystore.
--   ARGV: none.
--   Now: TIME.
--   Replies: {1,"OK",current_kid or "",n,kid_1,expires_at_1,...}: every non-current kid whose
--     expires_at is a positive integer >= now, in hash order. Never secrets.
--   Errors: none.
--   Writes: none.
local function list_hmac_kids(keys, _)
  local flat = redis.call('HGETALL', keys[1])
  local ks = {}
  for i = 1, #flat, 2 do
    ks[flat[i]] = flat[i + 1]
  end
  local current = ks.current_kid or ''
  local now = Util.now_ms()
  local out = {1, 'OK', current, '0'}
  for i = 1, #flat, 2 do
    local held = string.match(flat[i], '^expires_at:(.*)$')
    local exp = held and Hmac.kid_expiry(flat[i + 1])
    if exp and exp >= now and held ~= current then
      out[#out + 1] = held
      out[#out + 1] = Util.num(exp)
    end
  end
  out[4] = Util.num((#out - 4) / 2)
  return out
end

redis.register_function{
  function_name = 'ff_list_waitpoint_hmac_kids',
  callback = list_hmac_kids,
  flags = {'no-writes'},
}

-- ff_install_waitpoint_hmac_secret (boot initialisation, docs/suspension.md#the-keystore)
--   KEYS (1): 1 HMAC keystore.
--   ARGV (2): 1 kid (the initial kid, k1), 2 secret_hex (FF_WAITPOINT_HMAC_SECRET).
--   Replies: {1,"OK",status}: installed (no current_kid: current_kid + secret written in one
--     HSET) | repaired (current_kid without its secret: the given secret written there) |
--     unchanged (the current secret equals the given one, case-insensitively) | mismatch (the
--     stored secret differs: kept, an operator rotated).
--   Errors: invalid_kid, invalid_secret_hex.
--   Writes: as the status says.
local function install_hmac_secret(keys, argv)
  local kid, hex = argv[1], argv[2]
  if not valid_kid(kid) then
    return Reply.err('invalid_kid')
  end
  if not Hmac.hex_to_bytes(hex) then
    return Reply.err('invalid_secret_hex')
  end
  local current = redis.call('HGET', keys[1], 'current_kid')
  if not current or current == '' then
    redis.call('HSET', keys[1], 'current_kid', kid, 'secret:' .. kid, hex)
    return Reply.ok('installed')
  end
  local stored = redis.call('HGET', keys[1], 'secret:' .. current)
  if not stored or stored == '' then
    redis.call('HSET', keys[1], 'secret:' .. current, hex)
    return Reply.ok('repaired')
  elseif string.lower(stored) == string.lower(hex) then
    return Reply.ok('unchanged')
  end
  return Reply.ok('mismatch')
end

redis.register_function('ff_install_waitpoint_hmac_secret', install_hmac_secret)
