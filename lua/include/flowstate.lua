-- uses: util, keys

local FlowState = {}

-- The flow's public state, kept current by per-state member counters on the flow core
-- (docs/flows.md#flow-state). Every member transition goes through State.write_vector, which
-- calls FlowState.moved in the same call, so the counters never lag the members.
FlowState.MEMBER_STATES = {
  'waiting', 'delayed', 'waiting_children', 'rate_limited', 'active', 'suspended',
  'completed', 'failed', 'cancelled', 'expired', 'skipped',
}
-- Failures recorded on the flow's failures list (first ones only).
FlowState.FAILURES_KEPT = 5

do
  local FAILED = {failed = true, expired = true, cancelled = true}

  -- Derivation, first match: cancelled (sticky, set by cancel_flow); no members: open; every
  -- member terminal: completed when none failed/cancelled/expired/skipped, else failed; any
  -- member active: running; any member claimable (waiting): open; else blocked.
  function FlowState.derive(stored, total, n)
    if stored == 'cancelled' then
      return 'cancelled'
    elseif total == 0 then
      return 'open'
    end
    local bad = n.failed + n.cancelled + n.expired + n.skipped
    if n.completed + bad >= total then
      return (bad == 0 and 'completed') or 'failed'
    elseif n.active > 0 then
      return 'running'
    elseif n.waiting > 0 then
      return 'open'
    end
    return 'blocked'
  end

  -- Re-derives public_flow_state from the stored counters and writes it when it changed.
  -- Returns the state.
  function FlowState.refresh(fkey, now)
    local fields = {'public_flow_state', 'node_count'}
    for _, s in ipairs(FlowState.MEMBER_STATES) do
      fields[#fields + 1] = 'members_' .. s
    end
    local v = redis.call('HMGET', fkey, unpack(fields))
    local n = {}
    for i, s in ipairs(FlowState.MEMBER_STATES) do
      n[s] = tonumber(v[i + 2] or '0') or 0
    end
    local state = FlowState.derive(v[1] or 'open', tonumber(v[2] or '0') or 0, n)
    if state ~= v[1] then
      redis.call('HSET', fkey, 'public_flow_state', state, 'state_changed_at', Util.num(now))
    end
    return state
  end

  -- Member `eid` of flow `fid` moved from public state `from` (nil: it just joined) to `to`.
  -- A flow core that does not exist is left alone (nothing is created).
  function FlowState.moved(tag, fid, eid, from, to, reason, now)
    local fkey = Keys.flow(tag, fid, 'core')
    if redis.call('EXISTS', fkey) == 0 then
      return
    end
    if from then
      redis.call('HINCRBY', fkey, 'members_' .. from, -1)
    end
    redis.call('HINCRBY', fkey, 'members_' .. to, 1)
    if FAILED[to] then
      local list = Keys.flow(tag, fid, 'failures')
      if redis.call('LLEN', list) < FlowState.FAILURES_KEPT then
        redis.call('RPUSH', list, cjson.encode({execution_id = eid, public_state = to,
          reason = reason or '', at = now}))
      end
    end
    FlowState.refresh(fkey, now)
  end
end
