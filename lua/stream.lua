-- stream.lua: attempt output streams (docs/streams.md): append_frame and read_attempt_stream.
--
-- A stream is ff:stream:{fp:N}:<eid>:<idx> (Valkey stream) plus ff:stream:{fp:N}:<eid>:<idx>:meta
-- (hash). The meta hash is created by the first successful append only: never by reads, tails or
-- close paths (close_stream in helpers.lua writes closed_at/closed_reason only when it exists).
-- A tail of an attempt that never appended learns it ended from the attempt hash
-- (docs/streams.md#tails
-- step 5); the server does that, not these functions. Blocking reads (XREAD BLOCK) are not
-- allowed in Functions: the server issues them itself.
--
-- uses: reply, util, bounds, argv, state

-- Payload cap (docs/streams.md#retention-and-caps): callers may lower it, never raise it.
local MAX_PAYLOAD_BYTES = 65536
-- Matches STREAM_READ_HARD_CAP of the contract (ff_core_contracts); bump both together.
local STREAM_READ_HARD_CAP = 10000
-- retention_maxlen 0/absent: approximate trim to this length ("0 = no trim" is wrong).
local DEFAULT_APPROX_MAXLEN = 10000

local function stream_key(tag, eid, idx)
  return 'ff:stream:' .. tag .. ':' .. eid .. ':' .. idx
end

-- KEYS[2]/KEYS[3] must be the stream and meta of (ARGV execution_id, attempt_index): a mismatch
-- is a malformed call and raises before anything is read or written.
local function check_stream_keys(keys, tag, eid, idx)
  local s = stream_key(tag, eid, Util.num(idx))
  if keys[2] ~= s or keys[3] ~= s .. ':meta' then
    error({err = 'ERR flowfabric: KEYS[2]/KEYS[3] are not the stream of ARGV[1]/ARGV[2]'})
  end
end

-- ff_append_frame
--   KEYS (3): 1 core, 2 stream (ff:stream:{p}:<eid>:<idx>), 3 stream meta (…:<idx>:meta).
--   ARGV (14): 1 execution_id, 2 attempt_index, 3 lease_id, 4 lease_epoch, 5 attempt_id
--     (stored in meta, not validated), 6 frame_type (non-empty), 7 timestamp ("" or ms; "" =
--     server time), 8 payload (bytes, stored verbatim), 9 encoding ("" = utf8),
--     10 metadata_json ("" = none), 11 correlation_id ("" = none), 12 source ("" = worker),
--     13 retention_maxlen ("" or 0 = MAXLEN ~ 10000; n > 0 = MAXLEN = n, exact),
--     14 max_payload_bytes ("" = 65536; 1..65536).
--   Now: TIME.
--   Replies: {1,"OK",entry_id,frame_count} (frame_count = lifetime count after this append).
--   Errors (in order, first wins, nothing written): invalid_input (numeric ARGV,
--     max_payload_bytes outside 1..65536, negative retention_maxlen), invalid_frame_type
--     (empty), retention_limit_exceeded (payload longer than max_payload_bytes), stream_closed
--     (core missing or lifecycle_phase ~= active), stale_owner_cannot_append (ownership
--     lease_expired_reclaimable or lease_revoked; lease_expires_at empty or <= now;
--     current_attempt_index ~= attempt_index; lease_id or lease_epoch differ), stream_closed
--     (meta closed_at set). Never marks a lease expired; never uses the shared lease codes.
--   Writes: meta created on first append (stream_id, execution_id, attempt_id, attempt_index,
--     created_at, closed_at "", closed_reason "", durability_mode durable_full,
--     retention_maxlen as given, last_sequence "", frame_count 0, total_bytes 0,
--     last_frame_at ""); XADD frame_type, ts, payload, encoding, source, [correlation_id],
--     [metadata_json]; meta frame_count += 1, total_bytes += #payload, last_sequence,
--     last_frame_at; XTRIM per retention. State vector untouched. Not idempotent.
local APPEND_ARGV = {
  {2, 'attempt_index', 'int'},
  {4, 'lease_epoch', 'int?'},
  {7, 'timestamp', 'int?', min = 0, max = Bounds.TIMESTAMP_MS},
  {13, 'retention_maxlen', 'int?', min = 0, max = Bounds.STREAM_MAXLEN, default = 0},
  {14, 'max_payload_bytes', 'int?', min = 1, max = MAX_PAYLOAD_BYTES, default = MAX_PAYLOAD_BYTES},
}

local function append_frame(keys, argv)
  local a, e = Argv.parse(argv, APPEND_ARGV)
  if not a then
    return e
  end
  local idx, ts, maxlen, cap = a.attempt_index, a.timestamp, a.retention_maxlen,
    a.max_payload_bytes
  local frame_type = argv[6] or ''
  if frame_type == '' then
    return Reply.err('invalid_frame_type', 'frame_type must not be empty')
  end
  local payload = argv[8] or ''

  -- 1. payload cap
  if #payload > cap then
    return Reply.err('retention_limit_exceeded', 'payload is ' .. #payload .. ' bytes; the cap is '
      .. cap)
  end
  -- 2. execution active (a missing core is stream_closed too)
  local x = State.load_exec(keys, argv)
  if not x then
    return Reply.err('stream_closed', 'execution not found')
  end
  check_stream_keys(keys, x.tag, x.eid, idx)
  local c = x.core
  if c.lifecycle_phase ~= 'active' then
    return Reply.err('stream_closed', 'execution is ' .. (c.lifecycle_phase or ''))
  end
  -- 3-6. the caller still owns the current attempt's lease
  local now = Util.now_ms()
  if c.ownership_state == 'lease_expired_reclaimable' or c.ownership_state == 'lease_revoked' then
    return Reply.err('stale_owner_cannot_append', c.ownership_state)
  end
  local exp = tonumber(c.lease_expires_at or '')
  if exp == nil or exp <= now then
    return Reply.err('stale_owner_cannot_append', 'lease_expired')
  end
  if tonumber(c.current_attempt_index or '') ~= idx then
    return Reply.err('stale_owner_cannot_append', 'attempt_index')
  end
  if argv[3] ~= (c.current_lease_id or '')
    or tonumber(argv[4]) ~= tonumber(c.current_lease_epoch or '') then
    return Reply.err('stale_owner_cannot_append', 'lease')
  end
  -- 7. lazily create the meta hash; 8. closed?
  local meta = keys[3]
  if redis.call('EXISTS', meta) == 0 then
    redis.call('HSET', meta, 'stream_id', x.eid .. ':' .. Util.num(idx), 'execution_id', x.eid,
      'attempt_id', argv[5] or '', 'attempt_index', Util.num(idx), 'created_at', Util.num(now),
      'closed_at', '', 'closed_reason', '', 'durability_mode', 'durable_full',
      'retention_maxlen', argv[13] or '', 'last_sequence', '', 'frame_count', '0',
      'total_bytes', '0', 'last_frame_at', '')
  elseif Util.is_set(redis.call('HGET', meta, 'closed_at')) then
    return Reply.err('stream_closed', redis.call('HGET', meta, 'closed_reason') or '')
  end

  local args = {'XADD', keys[2], '*', 'frame_type', frame_type, 'ts', Util.num(ts or now),
    'payload', payload, 'encoding', Util.is_set(argv[9]) and argv[9] or 'utf8',
    'source', Util.is_set(argv[12]) and argv[12] or 'worker'}
  if Util.is_set(argv[11]) then
    args[#args + 1] = 'correlation_id'
    args[#args + 1] = argv[11]
  end
  if Util.is_set(argv[10]) then
    args[#args + 1] = 'metadata_json'
    args[#args + 1] = argv[10]
  end
  local id = redis.call(unpack(args))
  local count = redis.call('HINCRBY', meta, 'frame_count', 1)
  redis.call('HINCRBY', meta, 'total_bytes', #payload)
  redis.call('HSET', meta, 'last_sequence', id, 'last_frame_at', Util.num(now))
  if maxlen > 0 then
    redis.call('XTRIM', keys[2], 'MAXLEN', '=', Util.num(maxlen))
  else
    redis.call('XTRIM', keys[2], 'MAXLEN', '~', Util.num(DEFAULT_APPROX_MAXLEN))
  end
  return Reply.ok(id, Util.num(count))
end

redis.register_function('ff_append_frame', append_frame)

-- ff_append_frames (docs/lifecycle.md#batched-functions)
--   KEYS (3n), ARGV (2+14n): ARGV 1 = 3, 2 = 14, then n frames each with the KEYS and ARGV of
--     ff_append_frame, all on one partition.
--   Replies: the list of the frames' ff_append_frame replies, in order, each frame checked and
--     appended on its own; the first error reply ends the list (the frames after it are not
--     appended). invalid_input when the counts do not match.
redis.register_function('ff_append_frames', function(keys, argv)
  return Util.each_item(keys, argv, append_frame, true)
end)

-- ff_read_attempt_stream (read-only, no-writes: FCALL_RO-safe)
--   KEYS (2): 1 stream, 2 stream meta.
--   ARGV (3): 1 from_id, 2 to_id (lowered cursors: '-', '+', '<ms>' or '<ms>-<seq>'; the
--     StreamCursor grammar is enforced by the caller), 3 count_limit (1..10000).
--   Replies: {1,"OK",entries,closed_at|"",closed_reason|""}; entries = XRANGE from to COUNT n
--     (both ends inclusive), each {id, {field, value, ...}}. A missing stream yields no entries
--     and no markers (not an error).
--   Errors: invalid_input (count_limit not a number or < 1: "count_limit must be >= 1";
--     > 10000: "count_limit_exceeds_hard_cap").
--   Writes: none.
local function read_attempt_stream(keys, argv)
  local n = Argv.is_int(argv[3]) and tonumber(argv[3]) or nil
  if not n or n < 1 then
    return Reply.err('invalid_input', 'count_limit must be >= 1')
  end
  if n > STREAM_READ_HARD_CAP then
    return Reply.err('invalid_input', 'count_limit_exceeds_hard_cap')
  end
  local entries = redis.call('XRANGE', keys[1], argv[1], argv[2], 'COUNT', Util.num(n))
  local m = redis.call('HMGET', keys[2], 'closed_at', 'closed_reason')
  return Reply.ok(entries, m[1] or '', m[2] or '')
end

redis.register_function{
  function_name = 'ff_read_attempt_stream',
  callback = read_attempt_stream,
  flags = {'no-writes'},
}
