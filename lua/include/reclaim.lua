-- uses: util, keys, state, stream, lease, attempt, terminal, policy

local Reclaim = {}

-- Whether an active execution's lease can be reclaimed now (docs/lifecycle.md#lease-expiry-and-reclaim):
-- expired (marked, or leased and past lease_expires_at) or revoked. A due lease that the
-- expiry scanner has not marked yet is marked here first (needs x.history), so a claim does
-- not wait for the scanner. Returns true when the lease is reclaimable.
function Reclaim.due(x, now)
  local c = x.core
  if c.lifecycle_phase ~= 'active' then
    return false
  elseif c.ownership_state == 'lease_expired_reclaimable' or c.ownership_state == 'lease_revoked' then
    return true
  elseif c.ownership_state ~= 'leased' then
    return false
  end
  local exp = tonumber(c.lease_expires_at or '')
  if exp and exp > now then
    return false
  end
  Lease.mark_expired(x, now)
  return true
end

-- The reclaim limit (a project decision, docs/lifecycle.md#lease-expiry-and-reclaim): a full
-- terminal failure instead of committed state behind an error. Needs the x fields of
-- Reclaim.take.
function Reclaim.fail_at_limit(x, now)
  local idx = x.core.current_attempt_index
  Terminal.transition(x, 'failed', now, Lease.cleared({failure_reason = 'max_reclaims_exceeded'}),
    true)
  if Attempt.finish(x, idx, 'interrupted_reclaimed', {'failure_reason', 'max_reclaims_exceeded'},
      now) then
    Stream.close(x, idx, 'reclaimed', now, false)
  end
  Lease.release(x, 'max_reclaims_exceeded', now)
end

-- The stored policy's reclaim limit is reached: the next reclaim fails the execution instead.
function Reclaim.at_limit(x, policy)
  local reclaims = tonumber(x.core.lease_reclaim_count or '0') or 0
  return reclaims >= Policy.int(policy, 'max_reclaim_count', 100)
end

-- The writes of a reclaim once every check passed (docs/lifecycle.md#lease-expiry-and-reclaim):
-- the old attempt ends interrupted_reclaimed, a new `reclaim` attempt starts under a new lease
-- with epoch + 1. Needs x.attempts, x.lease, x.history, x.lease_expiry, x.attempt_timeout;
-- p = {worker_id, worker_instance_id, lane ("" = core.lane_id; stored as current_lane),
-- lease_id, attempt_id, ttl, policy (flat list for the attempt policy hash)}; `policy` is the
-- stored execution policy table. Deletes `grant_key`. Returns the new attempt table.
function Reclaim.take(x, p, policy, grant_key, now)
  local c = x.core
  local reason = 'lease_expired'
  if c.ownership_state == 'lease_revoked' then
    reason = 'lease_revoked'
  end
  local old_idx = c.current_attempt_index
  local a = {
    idx = tonumber(c.total_attempt_count or '0') or 0, attempt_id = p.attempt_id,
    attempt_type = 'reclaim', lease_id = p.lease_id,
    epoch = (tonumber(c.current_lease_epoch or '0') or 0) + 1,
    worker_id = p.worker_id, worker_instance_id = p.worker_instance_id,
    expires = now + p.ttl, renewal = now + math.floor(p.ttl * 2 / 3),
    lineage = {'reclaim_reason', reason, 'previous_attempt_index', old_idx or ''},
    policy = p.policy,
  }
  local extra = Lease.claimed_fields(a, (p.lane ~= '' and p.lane) or c.lane_id, now)
  extra.lease_reclaim_count = Util.num((tonumber(c.lease_reclaim_count or '0') or 0) + 1)
  local timeout = Policy.attempt_timeout_of(policy)
  extra.attempt_timeout_at = timeout and Util.num(now + timeout) or '0'
  State.write_vector(x.core_key, x.eid, Lease.CLAIMED, now, extra)
  redis.call('DEL', grant_key)
  Attempt.finish(x, old_idx, 'interrupted_reclaimed', {'failure_reason', reason}, now)
  Stream.close(x, old_idx, 'reclaimed', now, false)
  Attempt.start(x, a, now)
  redis.call('ZADD', x.lease_expiry, Util.num(a.expires), x.eid)
  -- Lease sets and the lane index are built on the tag of KEYS[1]
  -- (docs/architecture.md#keys-built-inside-lua).
  local old_holder = c.current_worker_instance_id
  if Util.is_set(old_holder) and old_holder ~= p.worker_instance_id then
    redis.call('SREM', Keys.worker_leases(x.tag, old_holder), x.eid)
  end
  redis.call('SADD', Keys.worker_leases(x.tag, p.worker_instance_id), x.eid)
  redis.call('ZADD', Keys.lane(x.tag, c.lane_id, 'active'), Util.num(a.expires), x.eid)
  if timeout then
    redis.call('ZADD', x.attempt_timeout, Util.num(now + timeout), x.eid)
  else
    redis.call('ZREM', x.attempt_timeout, x.eid)
  end
  Lease.event(x.history, 'reclaimed', {'old_lease_epoch', c.current_lease_epoch,
    'new_lease_id', a.lease_id, 'new_lease_epoch', Util.num(a.epoch), 'new_attempt_id', a.attempt_id,
    'new_attempt_index', Util.num(a.idx), 'worker_id', a.worker_id, 'reason', reason}, now)
  return a
end
