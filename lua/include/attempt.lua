-- uses: util, keys

local Attempt = {}

-- Ends attempt `idx` with `state` (+ `fields`) unless it is missing or already terminal (a
-- terminal attempt is never modified again, docs/lifecycle.md#attempts). Returns true when it ended
-- it. A core snapshot (x.core) whose attempt_state is running_attempt says the current attempt
-- is started (a claim writes both in one call, and every path that ends, suspends or interrupts
-- the attempt moves the core off running_attempt in the same call), so it is not read again.
function Attempt.finish(x, idx, state, fields, now)
  if not Util.is_set(idx) then
    return false
  end
  local key = Keys.attempt(x.tag, x.eid, idx)
  local running = x.core and x.core.attempt_state == 'running_attempt'
    and tostring(idx) == (x.core.current_attempt_index or '')
  if not running then
    local cur = redis.call('HGET', key, 'attempt_state')
    if cur ~= 'started' and cur ~= 'suspended' then
      return false
    end
  end
  local args = {'HSET', key, 'attempt_state', state, 'ended_at', Util.num(now)}
  for i = 1, #fields do
    args[#args + 1] = fields[i]
  end
  redis.call(unpack(args))
  return true
end

-- Creates a started attempt (claim, reclaim): the attempt hash and, when given, its policy
-- snapshot. The lease itself lives on the core mirror (docs/lifecycle.md#leases-and-fencing);
-- the attempt indexes are 0 .. total_attempt_count - 1 on the core. `a` = {idx, attempt_id,
-- attempt_type, lease_id, epoch, worker_id, worker_instance_id, expires, renewal, lineage =
-- flat list, policy = flat list}.
function Attempt.start(x, a, now)
  local akey = Keys.attempt(x.tag, x.eid, a.idx)
  local args = {'HSET', akey, 'attempt_id', a.attempt_id, 'execution_id', x.eid,
    'attempt_index', Util.num(a.idx), 'attempt_type', a.attempt_type, 'attempt_state', 'started',
    'created_at', Util.num(now), 'started_at', Util.num(now), 'lease_id', a.lease_id,
    'lease_epoch', Util.num(a.epoch), 'worker_id', a.worker_id,
    'worker_instance_id', a.worker_instance_id}
  for i = 1, #a.lineage do
    args[#args + 1] = a.lineage[i]
  end
  redis.call(unpack(args))
  if #a.policy > 0 then
    redis.call('HSET', akey .. ':policy', unpack(a.policy))
  end
end
