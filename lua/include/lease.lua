-- uses: reply, util, keys, state, eligible, stream

local Lease = {}

-- One lease-history event, MAXLEN ~ 1000 (docs/architecture.md#key-schema). `fields` = flat
-- name/value list.
function Lease.event(key, event, fields, now)
  local args = {'XADD', key, 'MAXLEN', '~', '1000', '*', 'event', event}
  for i = 1, #fields do
    args[#args + 1] = tostring(fields[i] or '')
  end
  args[#args + 1] = 'ts'
  args[#args + 1] = Util.num(now)
  redis.call(unpack(args))
end

-- The lease fields every history event of the current lease carries.
function Lease.fields(c, reason)
  return {'lease_id', c.current_lease_id, 'lease_epoch', c.current_lease_epoch,
    'attempt_index', c.current_attempt_index, 'attempt_id', c.current_attempt_id,
    'worker_id', c.current_worker_id, 'reason', reason}
end

-- CancelSource: "" is the contract default, operator_override.
function Lease.source_of(s)
  if s == nil or s == '' then
    return 'operator_override'
  end
  return s
end

-- Fence resolution (docs/architecture.md#shared-transition-rules): all three set -> checked; all
-- empty -> the server-side fence
-- (the core mirror) when `allow_override` and source is operator_override, else fence_required;
-- mixed -> partial_fence_triple. Returns {lease_id, epoch, attempt_id} or nil plus an error reply.
function Lease.resolve_fence(c, lease_id, epoch, attempt_id, source, allow_override)
  local n = 0
  for _, v in ipairs({lease_id, epoch, attempt_id}) do
    if v ~= '' then
      n = n + 1
    end
  end
  if n == 3 then
    return {lease_id = lease_id, epoch = epoch, attempt_id = attempt_id}
  elseif n > 0 then
    return nil, Reply.err('partial_fence_triple')
  elseif allow_override and Lease.source_of(source) == 'operator_override' then
    return {lease_id = c.current_lease_id or '', epoch = c.current_lease_epoch or '',
      attempt_id = c.current_attempt_id or ''}
  end
  return nil, Reply.err('fence_required')
end

function Lease.is_revoked(c)
  return c.ownership_state == 'lease_revoked' or Util.is_set(c.lease_revoked_at)
end

function Lease.is_expired(c, now)
  local exp = tonumber(c.lease_expires_at or '')
  return c.ownership_state == 'lease_expired_reclaimable' or exp == nil or exp <= now
end

function Lease.fence_matches(c, fence)
  return fence.lease_id == (c.current_lease_id or '')
    and tonumber(fence.epoch) == tonumber(c.current_lease_epoch or '')
    and fence.attempt_id == (c.current_attempt_id or '')
end

-- Replay check of a fenced owner call whose reply was lost (docs/lifecycle.md#replays): true when
-- the caller gave a full fence and it is the lease that made the current state, that is the core
-- still carries that epoch (no lease since) and attempt `idx`'s hash records that attempt id,
-- lease id and epoch. The caller checks that the state is the one its call makes.
function Lease.made_by(x, lease_id, epoch, attempt_id, idx)
  if lease_id == '' or epoch == '' or attempt_id == '' or not Util.is_set(idx) then
    return false
  end
  if tonumber(epoch) ~= tonumber(x.core.current_lease_epoch or '') then
    return false
  end
  local a = redis.call('HMGET', Keys.attempt(x.tag, x.eid, idx), 'attempt_id', 'lease_id',
    'lease_epoch')
  return a[1] == attempt_id and a[2] == lease_id and tonumber(a[3] or '') == tonumber(epoch)
end

-- mark_expired (docs/architecture.md#shared-transition-rules), idempotent. Needs x.history. Updates
-- the x.core snapshot.
function Lease.mark_expired(x, now)
  local c = x.core
  if c.ownership_state == 'lease_expired_reclaimable' then
    return false
  end
  State.write_vector(x.core_key, x.eid, {'active', 'lease_expired_reclaimable',
    c.eligibility_state or 'not_applicable', 'waiting_for_worker',
    'lease expired, awaiting reclaim', 'none', 'attempt_interrupted'}, now,
    {lease_expired_at = Util.num(now)})
  x.announced = true
  Lease.event(x.history, 'expired', Lease.fields(c, 'lease_expired'), now)
  Stream.close(x, c.current_attempt_index, 'lease_expired', now, true)
  c.ownership_state = 'lease_expired_reclaimable'
  c.attempt_state = 'attempt_interrupted'
  return true
end

-- Lease validation of an owner mutation (docs/lifecycle.md#leases-and-fencing), in order: not
-- active -> revoked ->
-- expired -> stale. With `mark` (write paths) an expired lease is first marked, and that write is
-- kept behind the lease_expired reply. Returns nil when the fence holds, else the error reply.
function Lease.check(x, fence, now, mark)
  local c = x.core
  if c.lifecycle_phase ~= 'active' then
    return Reply.not_active(c)
  end
  if Lease.is_revoked(c) then
    return Reply.err('lease_revoked')
  end
  if Lease.is_expired(c, now) then
    if mark then
      Lease.mark_expired(x, now)
    end
    return Reply.err('lease_expired')
  end
  if not Lease.fence_matches(c, fence) then
    return Reply.err('stale_lease')
  end
  return nil
end

-- The lease mirror cleared by every release (docs/lifecycle.md#lease-release); current_lease_epoch
-- always stays.
Lease.MIRROR = {
  'current_lease_id', 'current_worker_id', 'current_worker_instance_id', 'lease_expires_at',
  'lease_last_renewed_at', 'lease_renewal_deadline', 'lease_expired_at', 'lease_revoked_at',
  'lease_revoke_reason',
}

function Lease.cleared(extra)
  for _, f in ipairs(Lease.MIRROR) do
    extra[f] = ''
  end
  return extra
end

-- Lease release (docs/lifecycle.md#lease-release), after the core was written. Needs
-- x.lease_expiry, x.attempt_timeout, x.history; reads the holder from the pre-write x.core
-- snapshot. The attempt_timeout entry is removed unless the terminal transition already did
-- (x.timeout_cleared) or the core says the attempt has none (Lease.no_timeout).
function Lease.release(x, reason, now)
  local c = x.core
  redis.call('ZREM', x.lease_expiry, x.eid)
  -- The holder's lease set and the lane's active index: built from core fields on the tag of
  -- KEYS[1] (docs/architecture.md#keys-built-inside-lua); the caller may not know the holder.
  if Util.is_set(c.current_worker_instance_id) then
    redis.call('SREM', Keys.worker_leases(x.tag, c.current_worker_instance_id), x.eid)
  end
  redis.call('ZREM', Keys.lane(x.tag, c.lane_id, 'active'), x.eid)
  if not x.timeout_cleared and not Lease.no_timeout(c) then
    redis.call('ZREM', x.attempt_timeout, x.eid)
  end
  Lease.event(x.history, 'released', {'lease_id', c.current_lease_id,
    'lease_epoch', c.current_lease_epoch, 'attempt_index', c.current_attempt_index,
    'attempt_id', c.current_attempt_id, 'reason', reason}, now)
  -- Work that passed admission (a quota policy or budgets attached) gives back what admission
  -- holds for it: announced on the partition's ready channel, where every server's ReadyHints
  -- hands it to the releasers (docs/budgets.md#releasing-admissions). At most once; the quota
  -- and budget reconcilers are the backstop.
  if Util.is_set(c.quota_policy_id) or Util.is_set(c.budget_ids) then
    redis.call('SPUBLISH', 'ff:ready:' .. x.tag, cjson.encode({type = 'admission_released',
      execution_id = x.eid, quota_policy_id = c.quota_policy_id or '',
      concurrency_key = c.concurrency_key or '', budget_ids = c.budget_ids or '',
      lease_epoch = c.current_lease_epoch or ''}))
  end
end

-- The core field attempt_timeout_at: what the claim that started the current lease put in the
-- attempt_timeout index (the due time, or "0" for nothing). A core that says "0" is not in the
-- index, so paths that take it out skip the ZREM; any other value (a core written before the
-- field existed has none) removes as before. A stale entry would only cost the scanner a call:
-- ff_expire_execution drops an entry whose execution moved on.
function Lease.no_timeout(c)
  return c.attempt_timeout_at == '0'
end

-- A fresh lease on lane `lane`: out of eligible, into lease_expiry and lane active at its
-- expiry, into the claimer's lease set. Lane keys and the lease set are built on the tag of
-- the caller's KEYS[1] (docs/architecture.md#keys-built-inside-lua).
function Lease.index(x, lane, lease_expiry_key, a)
  Eligible.remove(x.tag, lane, x.eid, x.core.namespace)
  redis.call('ZADD', lease_expiry_key, Util.num(a.expires), x.eid)
  redis.call('SADD', Keys.worker_leases(x.tag, a.worker_instance_id), x.eid)
  redis.call('ZADD', Keys.lane(x.tag, lane, 'active'), Util.num(a.expires), x.eid)
end

-- Core fields of a fresh lease on attempt `a` (claimed vector extras; docs/lifecycle.md#claims).
function Lease.claimed_fields(a, lane, now)
  return {
    current_attempt_index = Util.num(a.idx), total_attempt_count = Util.num(a.idx + 1),
    current_attempt_id = a.attempt_id, current_lease_id = a.lease_id,
    current_lease_epoch = Util.num(a.epoch), current_worker_id = a.worker_id,
    current_worker_instance_id = a.worker_instance_id, current_lane = lane,
    lease_acquired_at = Util.num(now), lease_expires_at = Util.num(a.expires),
    lease_last_renewed_at = Util.num(now), lease_renewal_deadline = Util.num(a.renewal),
    lease_expired_at = '', lease_revoked_at = '', lease_revoke_reason = '',
  }
end

Lease.CLAIMED = {'active', 'leased', 'not_applicable', 'none', '', 'none', 'running_attempt'}
