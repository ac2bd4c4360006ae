-- uses: util, keys, lease, attempt, stream, terminal

local Cancel = {}

-- The cancel of a live execution (docs/lifecycle.md#cancel), shared by ff_cancel_execution and
-- the flow functions that cancel members in bulk (docs/flows.md#cancelling-a-flow). `x` is a
-- loaded execution (State.load_exec) whose phase is not terminal; the caller has already
-- checked any fence. Terminal transition first (which resolves a flow member's edges), then
-- the open attempt and its stream, the lease or the suspension, then every other index.
-- Returns the previous lifecycle phase.
function Cancel.apply(x, suspension_key, reason, source, now)
  local c = x.core
  local phase = c.lifecycle_phase
  local idx = c.current_attempt_index
  Terminal.transition(x, 'cancelled', now, Lease.cleared({cancellation_reason = reason,
    cancelled_by = source, current_suspension_id = '', current_waitpoint_id = ''}),
    source ~= 'flow_cascade')
  if (phase ~= 'runnable' or c.attempt_state == 'attempt_interrupted')
      and Attempt.finish(x, idx, 'ended_cancelled', {'failure_reason', 'cancelled: ' .. reason},
        now) then
    Stream.close(x, idx, 'attempt_cancelled', now, false)
  end
  if phase == 'active' then
    Lease.release(x, 'cancelled', now)
  elseif phase == 'suspended' then
    Terminal.close_suspension(x, suspension_key, 'cancelled', 'cancelled', now)
  end
  Terminal.remove_from_indexes(x, 'terminal')
  return phase
end

-- Cancels member `eid` (on `tag`) by operator override, building every key from the tag
-- (docs/architecture.md#keys-built-inside-lua). Returns 'cancelled', or 'not_active' (already
-- terminal) / 'not_found'; never an error reply. `no_deps`: leave its edges unresolved (a
-- sweep that cancels the dependents too).
function Cancel.member(tag, eid, reason, source, now, no_deps)
  local core_key = Keys.exec(tag, eid, 'core')
  local core = Util.hgetall(core_key)
  if next(core) == nil then
    return 'not_found'
  elseif core.lifecycle_phase == 'terminal' then
    return 'not_active'
  end
  local x = {tag = tag, eid = eid, core_key = core_key, core = core,
    lease = Keys.exec(tag, eid, 'lease:current'), history = Keys.exec(tag, eid, 'lease:history'),
    lease_expiry = Keys.partition(tag, 'lease_expiry'), attempts = Keys.exec(tag, eid, 'attempts'),
    attempt_timeout = Keys.partition(tag, 'attempt_timeout'),
    deadline = Keys.partition(tag, 'execution_deadline'), no_deps = no_deps}
  Cancel.apply(x, Keys.exec(tag, eid, 'suspension:current'), reason, source, now)
  return 'cancelled'
end

-- Members a fail_fast failure cancels in its own call; the rest go on the flow's cancel
-- backlog, due at once (docs/flows.md#failure-policies).
Cancel.FAIL_FAST_INLINE = 1000

-- Member `eid` of flow `fid` ended `outcome` (failed, expired, or cancelled other than by the
-- flow). In a fail_fast flow not yet halted or cancelled: mark it halted, then cancel every
-- member not yet finished (source flow_cascade; running members lose their lease). Their own
-- edges are not resolved during the sweep, so each ends `cancelled`, never `skipped`.
function Cancel.fail_fast(tag, fid, eid, outcome, now)
  local fkey = Keys.flow(tag, fid, 'core')
  local f = redis.call('HMGET', fkey, 'failure_policy', 'public_flow_state', 'halted_at')
  if f[1] ~= 'fail_fast' or f[2] == 'cancelled' or Util.is_set(f[3]) then
    return
  end
  local reason = 'fail_fast: ' .. eid .. ' ' .. outcome
  redis.call('HSET', fkey, 'halted_at', Util.num(now), 'halted_by', eid, 'halted_reason', reason)
  local live = {}
  for _, m in ipairs(redis.call('SMEMBERS', Keys.flow(tag, fid, 'members'))) do
    if m ~= eid then
      local phase = redis.call('HGET', Keys.exec(tag, m, 'core'), 'lifecycle_phase')
      if phase and phase ~= 'terminal' then
        live[#live + 1] = m
      end
    end
  end
  table.sort(live)
  local pending = Keys.flow(tag, fid, 'pending_cancels')
  for i, m in ipairs(live) do
    if i <= Cancel.FAIL_FAST_INLINE then
      Cancel.member(tag, m, reason, 'flow_cascade', now, true)
    else
      redis.call('SADD', pending, m)
    end
  end
  if #live > Cancel.FAIL_FAST_INLINE then
    redis.call('ZADD', Keys.partition(tag, 'cancel_backlog'), Util.num(now), fid)
  end
end

Terminal.on_member_failure = Cancel.fail_fast
