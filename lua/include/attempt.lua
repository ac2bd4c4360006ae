-- uses: util, keys, lease

local Attempt = {}

-- Ends attempt `idx` with `state` (+ `fields`) unless it is missing or already terminal (a
-- terminal attempt is never modified again, docs/lifecycle.md#attempts). Returns true when it ended
-- it.
function Attempt.finish(x, idx, state, fields, now)
  if not Util.is_set(idx) then
    return false
  end
  local key = Keys.attempt(x.tag, x.eid, idx)
  local cur = redis.call('HGET', key, 'attempt_state')
  if cur ~= 'started' and cur ~= 'suspended' then
    return false
  end
  local args = {'HSET', key, 'attempt_state', state, 'ended_at', Util.num(now)}
  for i = 1, #fields do
    args[#args + 1] = fields[i]
  end
  redis.call(unpack(args))
  return true
end

-- Creates a started attempt and its lease (claim, reclaim): attempt hash, attempts index, usage,
-- policy snapshot, and lease:current replaced. `a` = {idx, attempt_id, attempt_type, lease_id,
-- epoch, worker_id, worker_instance_id, expires, renewal, lineage = flat list, policy = flat list}.
-- Needs x.attempts, x.lease.
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
  redis.call('ZADD', x.attempts, Util.num(now), Util.num(a.idx))
  redis.call('HSET', akey .. ':usage', 'last_usage_report_seq', '0')
  if #a.policy > 0 then
    redis.call('HSET', akey .. ':policy', unpack(a.policy))
  end
  Lease.write(x.lease, x.eid, a, now)
end
