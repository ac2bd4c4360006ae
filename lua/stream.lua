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
--   ARGV (14 + 7n): 1 execution_id, 2 attempt_index, 3 lease_id, 4 lease_epoch, 5 attempt_id
--     (stored in meta, not validated), 6 frame_type (non-empty), 7 timestamp ("" or ms; "" =
--     server time), 8 payload (bytes, stored verbatim), 9 encoding ("" = utf8),
--     10 metadata_json ("" = none), 11 correlation_id ("" = none), 12 source ("" = worker),
--     13 retention_maxlen ("" or 0 = MAXLEN ~ 10000; n > 0 = MAXLEN = n, exact),
--     14 max_payload_bytes ("" = 65536; 1..65536); then n >= 0 more frames of the same attempt
--     (AppendFramesRequest.frames, docs/streams.md#appending), 7 values each: frame_type,
--     timestamp, payload, encoding, metadata_json, correlation_id, source (as ARGV 6-12), at
--     most Bounds.BATCH_ITEMS of them; appended after the first under the same fence check,
--     retention and payload cap.
--   Now: TIME.
--   Replies: {1,"OK",entry_id,frame_count} (the last frame's entry id; frame_count = lifetime
--     count after this call).
--   Errors (in order, first wins, nothing written: every frame is checked before the first
--     write, so a call appends all of its frames or none): invalid_input (numeric ARGV,
--     max_payload_bytes outside 1..65536, negative retention_maxlen, ARGV not 14 + 7n, more than
--     Bounds.BATCH_ITEMS more frames; a bad timestamp names its frame), invalid_frame_type
--     (empty), retention_limit_exceeded (payload longer than max_payload_bytes), stream_closed
--     (core missing or lifecycle_phase ~= active), stale_owner_cannot_append (ownership
--     lease_expired_reclaimable or lease_revoked; lease_expires_at empty or <= now;
--     current_attempt_index ~= attempt_index; lease_id or lease_epoch differ), stream_closed
--     (meta closed_at set). Never marks a lease expired; never uses the shared lease codes.
--   Writes: per frame XADD frame_type, ts, payload, encoding, source, [correlation_id],
--     [metadata_json] with the retention trim (MAXLEN = n, or ~ 10000); then one HSET of the
--     meta: frame_count and total_bytes (read with the closed check, plus this call's),
--     last_sequence, last_frame_at, and on the first append the rest of the meta (stream_id,
--     execution_id, attempt_id, attempt_index, created_at, closed_at "", closed_reason "",
--     durability_mode durable_full, retention_maxlen as given, and core stream_attempt =
--     attempt_index: Stream.close reads it instead of the meta). State vector untouched. Not
--     idempotent.
local APPEND_ARGV = {
  {2, 'attempt_index', 'int'},
  {4, 'lease_epoch', 'int?'},
  {7, 'timestamp', 'int?', min = 0, max = Bounds.TIMESTAMP_MS},
  {13, 'retention_maxlen', 'int?', min = 0, max = Bounds.STREAM_MAXLEN, default = 0},
  {14, 'max_payload_bytes', 'int?', min = 1, max = MAX_PAYLOAD_BYTES, default = MAX_PAYLOAD_BYTES},
}
local FRAME_ARGC = 7

-- The frames of one call: {frame_type, ts (number or false), payload, encoding, metadata_json,
-- correlation_id, source} each, or nil plus the error reply.
local function append_frames_of(argv, first_ts, cap)
  local extra = (#argv - 14) / FRAME_ARGC
  if #argv < 14 or extra ~= math.floor(extra) then
    return nil, Reply.err('invalid_input', 'ARGV must be 14 values, then 7 per further frame')
  end
  if extra > Bounds.BATCH_ITEMS then
    return nil, Reply.err('invalid_input', 'at most ' .. Bounds.BATCH_ITEMS
      .. ' further frames per call')
  end
  local frames = {{argv[6] or '', first_ts or false, argv[8] or '', argv[9], argv[10], argv[11],
    argv[12]}}
  for i = 0, extra - 1 do
    local b = 14 + i * FRAME_ARGC
    local ts = argv[b + 2]
    local n = false
    if ts ~= '' then
      n = Argv.is_int(ts) and tonumber(ts) or nil
      if not n or n < 0 or n > Bounds.TIMESTAMP_MS then
        return nil, Reply.err('invalid_input', 'timestamp of frame ' .. (i + 2)
          .. ' must be an integer 0..' .. Util.num(Bounds.TIMESTAMP_MS))
      end
    end
    frames[#frames + 1] = {argv[b + 1], n, argv[b + 3], argv[b + 4], argv[b + 5], argv[b + 6],
      argv[b + 7]}
  end
  for i, f in ipairs(frames) do
    if f[1] == '' then
      return nil, Reply.err('invalid_frame_type', 'frame_type must not be empty'
        .. (i > 1 and (' (frame ' .. i .. ')') or ''))
    end
    if #f[3] > cap then
      return nil, Reply.err('retention_limit_exceeded', 'payload is ' .. #f[3]
        .. ' bytes; the cap is ' .. cap .. (i > 1 and (' (frame ' .. i .. ')') or ''))
    end
  end
  return frames
end

local function append_frame(keys, argv)
  local a, e = Argv.parse(argv, APPEND_ARGV)
  if not a then
    return e
  end
  local idx, maxlen, cap = a.attempt_index, a.retention_maxlen, a.max_payload_bytes
  -- 1. frame types and payload caps, every frame
  local frames, ferr = append_frames_of(argv, a.timestamp, cap)
  if not frames then
    return ferr
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
  -- 7. closed? (one read of the meta: a missing one is created by the HSET below)
  local meta = keys[3]
  local m = redis.call('HMGET', meta, 'created_at', 'closed_at', 'closed_reason', 'frame_count',
    'total_bytes')
  if Util.is_set(m[2]) then
    return Reply.err('stream_closed', m[3] or '')
  end

  local trim = {'MAXLEN', '~', Util.num(DEFAULT_APPROX_MAXLEN)}
  if maxlen > 0 then
    trim = {'MAXLEN', '=', Util.num(maxlen)}
  end
  local id, bytes = nil, 0
  for _, f in ipairs(frames) do
    local args = {'XADD', keys[2], trim[1], trim[2], trim[3], '*', 'frame_type', f[1],
      'ts', Util.num(f[2] or now), 'payload', f[3],
      'encoding', Util.is_set(f[4]) and f[4] or 'utf8',
      'source', Util.is_set(f[7]) and f[7] or 'worker'}
    if Util.is_set(f[6]) then
      args[#args + 1] = 'correlation_id'
      args[#args + 1] = f[6]
    end
    if Util.is_set(f[5]) then
      args[#args + 1] = 'metadata_json'
      args[#args + 1] = f[5]
    end
    id = redis.call(unpack(args))
    bytes = bytes + #f[3]
  end
  local count = (tonumber(m[4] or '') or 0) + #frames
  local fields = {'frame_count', Util.num(count),
    'total_bytes', Util.num((tonumber(m[5] or '') or 0) + bytes), 'last_sequence', id,
    'last_frame_at', Util.num(now)}
  if not m[1] then
    local first = {'stream_id', x.eid .. ':' .. Util.num(idx), 'execution_id', x.eid,
      'attempt_id', argv[5] or '', 'attempt_index', Util.num(idx), 'created_at', Util.num(now),
      'closed_at', '', 'closed_reason', '', 'durability_mode', 'durable_full',
      'retention_maxlen', argv[13] or ''}
    for _, v in ipairs(first) do
      fields[#fields + 1] = v
    end
  end
  redis.call('HSET', meta, unpack(fields))
  if not m[1] then
    -- the core says which attempt has a meta, so closes need not look (include/stream.lua)
    redis.call('HSET', keys[1], 'stream_attempt', Util.num(idx))
  end
  return Reply.ok(id, Util.num(count))
end

redis.register_function('ff_append_frame', append_frame)

-- ff_append_frames (docs/lifecycle.md#batched-functions)
--   KEYS (3n), ARGV (2+14n): ARGV 1 = 3, 2 = 14, then n frames each with the KEYS and ARGV of
--     ff_append_frame (one frame each), all on one partition.
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
