-- waiters.lua: the waiters indexes of quota policies and budgets, the executions blocked on
-- them in block order (docs/budgets.md#waking-blocked-work).
--
-- A waiters index is a sorted set, execution id -> block time, on its owner's own tag: a quota
-- policy's ff:quota:{q:K}:<qid>:waiters (or ...:<qid>:k:<concurrency_key>:waiters for one
-- concurrency key) and a budget's ff:budget:{b:M}:<bid>:waiters. KEYS[1] is checked against
-- the key built from its tag and the owner named in ARGV. Every function takes the same first
-- three ARGV: 1 owner_kind (quota|budget), 2 owner_id, 3 concurrency_key ("" = the policy's
-- whole bucket; must be "" for a budget).
--
-- uses: reply, util, argv

local MAX_TAKE = 1000

local OWNER_ARGV = {
  {1, 'owner_kind', 'str'},
  {2, 'owner_id', 'str'},
}

-- The index the call names, or nil plus the invalid_input reply. Raises when KEYS[1] is not
-- that index (a malformed call).
local function waiters_index(keys, argv)
  local a, e = Argv.parse(argv, OWNER_ARGV)
  if not a then
    return nil, e
  end
  local ck = argv[3] or ''
  local tag = tostring(Util.tag_of(keys[1] or ''))
  local def
  if a.owner_kind == 'quota' then
    def = 'ff:quota:' .. tag .. ':' .. a.owner_id
  elseif a.owner_kind == 'budget' then
    if ck ~= '' then
      return nil, Reply.err('invalid_input', 'a budget has no concurrency_key')
    end
    def = 'ff:budget:' .. tag .. ':' .. a.owner_id
  else
    return nil, Reply.err('invalid_input', 'owner_kind must be quota or budget, got: ' .. a.owner_kind)
  end
  local want = ck ~= '' and (def .. ':k:' .. ck .. ':waiters') or (def .. ':waiters')
  Util.expect_key(keys[1], want, 'waiters index')
  return want, nil
end

-- ff_add_waiter
--   KEYS (1): 1 waiters index.
--   ARGV (5): 1 owner_kind, 2 owner_id, 3 concurrency_key, 4 execution_id, 5 now ("" = TIME).
--   Now: ARGV 5, else TIME.
--   Replies: {1,"OK","added"}; {1,"ALREADY_SATISFIED","already_waiting"} (the entry keeps its
--     first block time, so a re-block keeps its place in line).
--   Errors (in order, nothing written): invalid_input (owner_kind, owner_id, a concurrency key
--     for a budget, execution_id empty, now not a number).
--   Writes: ZADD NX waiters now execution_id.
local ADD_ARGV = {
  {4, 'execution_id', 'str'},
  {5, 'now', 'int?', min = 0},
}

local function add_waiter(keys, argv)
  local index, e = waiters_index(keys, argv)
  if not index then
    return e
  end
  local a, e2 = Argv.parse(argv, ADD_ARGV)
  if not a then
    return e2
  end
  local added = redis.call('ZADD', index, 'NX', Util.num(a.now or Util.now_ms()), a.execution_id)
  if added == 0 then
    return Reply.already('already_waiting')
  end
  return Reply.ok('added')
end

redis.register_function('ff_add_waiter', add_waiter)

-- ff_take_waiters
--   KEYS (1): 1 waiters index.
--   ARGV (4): 1 owner_kind, 2 owner_id, 3 concurrency_key, 4 count (1..1000).
--   Now: not used.
--   Replies: {1,"OK","taken",execution_id...}: the `count` oldest entries, removed (none when
--     the index is empty). Two callers never take the same entry.
--   Errors (in order, nothing written): invalid_input (owner_kind, owner_id, a concurrency key
--     for a budget, count).
--   Writes: ZPOPMIN waiters count.
local TAKE_ARGV = {
  {4, 'count', 'int', min = 1, max = MAX_TAKE},
}

local function take_waiters(keys, argv)
  local index, e = waiters_index(keys, argv)
  if not index then
    return e
  end
  local a, e2 = Argv.parse(argv, TAKE_ARGV)
  if not a then
    return e2
  end
  local popped = redis.call('ZPOPMIN', index, a.count)
  local out = {1, 'OK', 'taken'}
  for i = 1, #popped, 2 do
    out[#out + 1] = popped[i]
  end
  return out
end

redis.register_function('ff_take_waiters', take_waiters)

-- ff_remove_waiter
--   KEYS (1): 1 waiters index.
--   ARGV (4): 1 owner_kind, 2 owner_id, 3 concurrency_key, 4 execution_id.
--   Now: not used.
--   Replies: {1,"OK","removed"} (this call took the entry); {1,"ALREADY_SATISFIED",
--     "not_waiting"} (no entry: another caller took it, or it was never added).
--   Errors (in order, nothing written): invalid_input (owner_kind, owner_id, a concurrency key
--     for a budget, execution_id empty).
--   Writes: ZREM waiters execution_id.
local REMOVE_ARGV = {
  {4, 'execution_id', 'str'},
}

local function remove_waiter(keys, argv)
  local index, e = waiters_index(keys, argv)
  if not index then
    return e
  end
  local a, e2 = Argv.parse(argv, REMOVE_ARGV)
  if not a then
    return e2
  end
  if redis.call('ZREM', index, a.execution_id) == 0 then
    return Reply.already('not_waiting')
  end
  return Reply.ok('removed')
end

redis.register_function('ff_remove_waiter', remove_waiter)
