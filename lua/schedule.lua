-- schedule.lua: schedules, periodic submission of an execution template (docs/schedules.md).
--
-- A schedule lives on its schedule partition {sp:N}: the definition ff:sched:{sp:N}:<sid> (hash:
-- schedule_id, spec (the canonical JSON of timetable, template and policies, opaque here), state
-- active|paused, cursor (the earliest slot that may still fire), pending_slot (claimed, its
-- execution not yet acknowledged), last_slot, last_execution_id, fire_count, skip_count,
-- created_at, updated_at) and the partition's indexes ff:idx:{sp:N}:schedule_due (zset, sid ->
-- cursor, active schedules only) and ff:idx:{sp:N}:schedules (set of every sid). KEYS[1] is the
-- definition; the other keys must carry its tag (a mismatch is a malformed call and raises).
--
-- uses: reply, util, bounds, argv

local function sched_keys(keys, sid)
  local tag = Util.tag_of(keys[1])
  local def = 'ff:sched:' .. tostring(tag) .. ':' .. sid
  Util.expect_key(keys[1], def, 'schedule definition')
  local idx = {'ff:idx:' .. tostring(tag) .. ':schedule_due', 'ff:idx:' .. tostring(tag) .. ':schedules'}
  for i = 2, #keys do
    Util.expect_key(keys[i], idx[i - 1], 'schedule index')
  end
  return def
end

-- ff_create_schedule
--   KEYS (3): 1 definition, 2 schedule_due, 3 schedules.
--   ARGV (4): 1 schedule_id, 2 spec, 3 first_fire_at (the first slot), 4 now ("" = TIME).
--   Now: ARGV 4, else TIME.
--   Replies: {1,"OK","created"}; {1,"ALREADY_SATISFIED","exists"} (same spec: nothing changes).
--   Errors: invalid_input (spec empty, first_fire_at, now); schedule_exists (another spec).
--   Writes: the definition (state active, cursor = first_fire_at, counters 0); ZADD
--     schedule_due cursor; SADD schedules.
local CREATE_ARGV = {
  {1, 'schedule_id', 'str'},
  {2, 'spec', 'str'},
  {3, 'first_fire_at', 'int', min = 0, max = Bounds.TIMESTAMP_MS},
  {4, 'now', 'int?', min = 0, max = Bounds.TIMESTAMP_MS},
}

local function create_schedule(keys, argv)
  local a, e = Argv.parse(argv, CREATE_ARGV)
  if not a then
    return e
  end
  local def = sched_keys(keys, a.schedule_id)
  local existing = redis.call('HGET', def, 'spec')
  if existing then
    if existing == a.spec then
      return Reply.already('exists')
    end
    return Reply.err('schedule_exists', a.schedule_id)
  end
  local now = Util.num(a.now or Util.now_ms())
  Util.hmset(def, {
    schedule_id = a.schedule_id, spec = a.spec, state = 'active',
    cursor = Util.num(a.first_fire_at), fire_count = '0', skip_count = '0',
    created_at = now, updated_at = now,
  })
  redis.call('ZADD', keys[2], Util.num(a.first_fire_at), a.schedule_id)
  redis.call('SADD', keys[3], a.schedule_id)
  return Reply.ok('created')
end

redis.register_function('ff_create_schedule', create_schedule)

-- ff_claim_schedule_slot
--   KEYS (2): 1 definition, 2 schedule_due.
--   ARGV (5): 1 schedule_id, 2 slot_ms, 3 next_slot_ms (> slot_ms: the cursor after this slot),
--     4 action ("fire" or "skip"), 5 now ("" = TIME).
--   Now: ARGV 5, else TIME.
--   Replies, checked in this order (docs/schedules.md#exactly-once):
--     {1,"ALREADY_SATISFIED","paused"} (state is not active);
--     {1,"ALREADY_SATISFIED","pending",pending_slot} (an earlier claim awaits its execution:
--       the caller creates that one first, then acknowledges it);
--     {1,"ALREADY_SATISFIED","already",cursor} (cursor > slot_ms: another claimer won);
--     {1,"ALREADY_SATISFIED","not_due",cursor} (slot_ms > now);
--     {1,"OK","fire","sched:<sid>:<slot_ms>"} (the slot is this caller's; the idempotency key
--       of its execution); {1,"OK","skipped"} (action skip: the slot is passed over).
--   Errors: invalid_input (slot_ms, next_slot_ms <= slot_ms, action, now); schedule_not_found
--     (no definition: the id leaves schedule_due, nothing else is written).
--   Writes: cursor = next_slot_ms, updated_at; fire: pending_slot = last_slot = slot_ms, ZADD
--     schedule_due slot_ms (due at once until acknowledged); skip: skip_count += 1, ZADD
--     schedule_due next_slot_ms.
local CLAIM_ARGV = {
  {1, 'schedule_id', 'str'},
  {2, 'slot_ms', 'int', min = 0, max = Bounds.TIMESTAMP_MS},
  {3, 'next_slot_ms', 'int', min = 0, max = Bounds.TIMESTAMP_MS},
  {4, 'action', 'str'},
  {5, 'now', 'int?', min = 0, max = Bounds.TIMESTAMP_MS},
}

local function claim_schedule_slot(keys, argv)
  local a, e = Argv.parse(argv, CLAIM_ARGV)
  if not a then
    return e
  end
  if a.next_slot_ms <= a.slot_ms then
    return Reply.err('invalid_input', 'next_slot_ms must be after slot_ms')
  end
  if a.action ~= 'fire' and a.action ~= 'skip' then
    return Reply.err('invalid_input', 'action must be fire or skip, got: ' .. a.action)
  end
  local def = sched_keys(keys, a.schedule_id)
  local d = redis.call('HMGET', def, 'state', 'cursor', 'pending_slot')
  if not d[1] then
    redis.call('ZREM', keys[2], a.schedule_id)
    return Reply.err('schedule_not_found', a.schedule_id)
  end
  if d[1] ~= 'active' then
    return Reply.already('paused')
  end
  if d[3] and d[3] ~= '' then
    return Reply.already('pending', d[3])
  end
  local cursor = tonumber(d[2]) or 0
  if cursor > a.slot_ms then
    return Reply.already('already', Util.num(cursor))
  end
  local now = a.now or Util.now_ms()
  if a.slot_ms > now then
    return Reply.already('not_due', Util.num(cursor))
  end
  local next_at = Util.num(a.next_slot_ms)
  redis.call('HSET', def, 'cursor', next_at, 'updated_at', Util.num(now))
  if a.action == 'skip' then
    redis.call('ZADD', keys[2], next_at, a.schedule_id)
    redis.call('HINCRBY', def, 'skip_count', 1)
    return Reply.ok('skipped')
  end
  -- scored at the slot until acknowledged, so any scanner finds a pending slot at once
  redis.call('ZADD', keys[2], Util.num(a.slot_ms), a.schedule_id)
  redis.call('HSET', def, 'pending_slot', Util.num(a.slot_ms), 'last_slot', Util.num(a.slot_ms))
  return Reply.ok('fire', 'sched:' .. a.schedule_id .. ':' .. Util.num(a.slot_ms))
end

redis.register_function('ff_claim_schedule_slot', claim_schedule_slot)

-- ff_ack_schedule_fire
--   KEYS (2): 1 definition, 2 schedule_due.
--   ARGV (3): 1 schedule_id, 2 slot_ms, 3 execution_id (the execution created for it).
--   Now: not read.
--   Replies: {1,"OK","acked"}; {1,"ALREADY_SATISFIED","not_pending"} (pending_slot is another
--     slot or none: an earlier ack won).
--   Errors: invalid_input (slot_ms, execution_id); schedule_not_found.
--   Writes: pending_slot deleted; last_execution_id; fire_count += 1; ZADD schedule_due cursor
--     (when active).
local ACK_ARGV = {
  {1, 'schedule_id', 'str'},
  {2, 'slot_ms', 'int', min = 0, max = Bounds.TIMESTAMP_MS},
  {3, 'execution_id', 'str'},
}

local function ack_schedule_fire(keys, argv)
  local a, e = Argv.parse(argv, ACK_ARGV)
  if not a then
    return e
  end
  local def = sched_keys(keys, a.schedule_id)
  local d = redis.call('HMGET', def, 'state', 'pending_slot', 'cursor')
  if not d[1] then
    return Reply.err('schedule_not_found', a.schedule_id)
  end
  if d[2] ~= Util.num(a.slot_ms) then
    return Reply.already('not_pending')
  end
  redis.call('HDEL', def, 'pending_slot')
  if d[1] == 'active' then
    redis.call('ZADD', keys[2], d[3], a.schedule_id)
  end
  redis.call('HSET', def, 'last_execution_id', a.execution_id)
  redis.call('HINCRBY', def, 'fire_count', 1)
  return Reply.ok('acked')
end

redis.register_function('ff_ack_schedule_fire', ack_schedule_fire)

-- ff_set_schedule_state
--   KEYS (3): 1 definition, 2 schedule_due, 3 schedules.
--   ARGV (4): 1 schedule_id, 2 op ("pause", "resume" or "delete"), 3 next_fire_at (resume: the
--     new cursor, the first slot after now, so slots missed while paused never fire; else ""),
--     4 now ("" = TIME).
--   Now: ARGV 4, else TIME.
--   Replies: {1,"OK",op}; {1,"ALREADY_SATISFIED",state} (pause of a paused or resume of an
--     active schedule).
--   Errors: invalid_input (op, next_fire_at missing on resume, now); schedule_not_found.
--   Writes: pause: state paused, ZREM schedule_due; resume: state active, cursor =
--     max(next_fire_at, cursor) (it never moves back), ZADD schedule_due; delete: DEL definition, ZREM schedule_due, SREM schedules.
local STATE_ARGV = {
  {1, 'schedule_id', 'str'},
  {2, 'op', 'str'},
  {3, 'next_fire_at', 'int?', min = 0, max = Bounds.TIMESTAMP_MS},
  {4, 'now', 'int?', min = 0, max = Bounds.TIMESTAMP_MS},
}

local function set_schedule_state(keys, argv)
  local a, e = Argv.parse(argv, STATE_ARGV)
  if not a then
    return e
  end
  if a.op ~= 'pause' and a.op ~= 'resume' and a.op ~= 'delete' then
    return Reply.err('invalid_input', 'op must be pause, resume or delete, got: ' .. a.op)
  end
  if a.op == 'resume' and not a.next_fire_at then
    return Reply.err('invalid_input', 'resume needs next_fire_at')
  end
  local def = sched_keys(keys, a.schedule_id)
  local state = redis.call('HGET', def, 'state')
  if not state then
    return Reply.err('schedule_not_found', a.schedule_id)
  end
  local now = Util.num(a.now or Util.now_ms())
  if a.op == 'delete' then
    redis.call('DEL', def)
    redis.call('ZREM', keys[2], a.schedule_id)
    redis.call('SREM', keys[3], a.schedule_id)
    return Reply.ok('delete')
  end
  if a.op == 'pause' then
    if state == 'paused' then
      return Reply.already('paused')
    end
    redis.call('HSET', def, 'state', 'paused', 'updated_at', now)
    redis.call('ZREM', keys[2], a.schedule_id)
    return Reply.ok('pause')
  end
  if state == 'active' then
    return Reply.already('active')
  end
  -- the cursor never moves back, so a slot that fired cannot fire again
  local cursor = tonumber(redis.call('HGET', def, 'cursor') or '0') or 0
  local next_at = Util.num(math.max(a.next_fire_at, cursor))
  redis.call('HSET', def, 'state', 'active', 'cursor', next_at, 'updated_at', now)
  redis.call('ZADD', keys[2], next_at, a.schedule_id)
  return Reply.ok('resume')
end

redis.register_function('ff_set_schedule_state', set_schedule_state)
