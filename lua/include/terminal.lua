-- uses: util, keys, state, eligible, deps

local Terminal = {}

-- What a flow member's failure does to its flow beyond its own edges: set by the cancel include
-- (the fail_fast policy, docs/flows.md#failure-policies), which comes after this one.
Terminal.on_member_failure = nil
Terminal.FAILURE = {failed = true, expired = true, cancelled = true}

-- Terminal transition common effects (docs/lifecycle.md#terminal-transitions). Writes the core
-- first (vector, completed_at
-- and `extra`), then ZREM attempt_timeout/execution_deadline, ZADD lane terminal, and PUBLISH
-- ff:dag:completions for a flow member when `publish`. A flow member's outgoing edges are
-- resolved here, in the same call (docs/flows.md#resolution), whatever `publish` says, unless
-- x.no_deps (a fail_fast sweep cancelling every member at once).
-- Needs x.attempt_timeout, x.deadline. With x.fresh the core snapshot stands in for the previous
-- state (State.write_vector's snap); the index removals skip the indexes the core says the
-- execution is not in (no execution_deadline_at; attempt_timeout_at "0").
function Terminal.transition(x, outcome, now, extra, publish)
  local c = x.core
  local attempt = 'attempt_terminal'
  if (tonumber(c.total_attempt_count or '0') or 0) == 0 then
    attempt = 'none'
  end
  extra.completed_at = Util.num(now)
  local public = State.write_vector(x.core_key, x.eid,
    {'terminal', 'unowned', 'not_applicable', 'none', '', outcome, attempt}, now, extra,
    x.fresh and c or nil)
  x.announced = true
  if c.attempt_timeout_at ~= '0' then
    redis.call('ZREM', x.attempt_timeout, x.eid)
  end
  x.timeout_cleared = true
  if Util.is_set(c.execution_deadline_at) then
    redis.call('ZREM', x.deadline, x.eid)
  end
  -- Lane index built from core.lane_id on the tag of KEYS[1]
  -- (docs/architecture.md#keys-built-inside-lua).
  redis.call('ZADD', Keys.lane(x.tag, c.lane_id, 'terminal'), Util.num(now), x.eid)
  if publish and Util.is_set(c.flow_id) then
    redis.call('PUBLISH', 'ff:dag:completions', cjson.encode({
      execution_id = x.eid, flow_id = c.flow_id, outcome = outcome,
    }))
  end
  if Util.is_set(c.flow_id) then
    if Terminal.FAILURE[outcome] and extra.cancelled_by ~= 'flow_cascade' and Terminal.on_member_failure then
      Terminal.on_member_failure(x.tag, c.flow_id, x.eid, outcome, now)
    end
    if not x.no_deps then
      Deps.upstream_done(x.tag, x.eid, c.flow_id, outcome, now)
    end
  end
  return public
end

-- Defensive index removal (docs/architecture.md#shared-transition-rules; cancel, expire): the id
-- leaves every index of its lane
-- and partition except `keep` (a lane set name), and the holder's lease set. All keys built on
-- the tag of KEYS[1] (docs/architecture.md#keys-built-inside-lua).
function Terminal.remove_from_indexes(x, keep)
  local c = x.core
  for _, which in ipairs(Keys.LANE_SETS) do
    if which == 'eligible' and which ~= keep then
      Eligible.remove(x.tag, c.lane_id, x.eid, c.namespace)
    elseif which ~= keep then
      redis.call('ZREM', Keys.lane(x.tag, c.lane_id, which), x.eid)
    end
  end
  for _, name in ipairs(Keys.PARTITION_SETS) do
    redis.call('ZREM', Keys.partition(x.tag, name), x.eid)
  end
  if Util.is_set(c.current_worker_instance_id) then
    redis.call('SREM', Keys.worker_leases(x.tag, c.current_worker_instance_id), x.eid)
  end
end

-- Closes the current suspension, its waitpoint and the waitpoint's condition (cancel, expire of
-- a suspended execution) and publishes waitpoint_closed on ff:signal_events:{p}. Only hashes
-- that exist are written. Waitpoint keys are built from core.current_waitpoint_id on the tag of
-- KEYS[1] (docs/architecture.md#keys-built-inside-lua).
function Terminal.close_suspension(x, suspension_key, reason, wp_reason, now)
  local c = x.core
  if redis.call('EXISTS', suspension_key) == 1 then
    redis.call('HSET', suspension_key, 'closed_at', Util.num(now), 'close_reason', reason)
  end
  if Util.is_set(c.current_waitpoint_id) then
    local wp = Keys.waitpoint(x.tag, c.current_waitpoint_id)
    if redis.call('EXISTS', wp) == 1 then
      redis.call('HSET', wp, 'state', 'closed', 'closed_at', Util.num(now), 'close_reason', wp_reason)
    end
    if redis.call('EXISTS', wp .. ':condition') == 1 then
      redis.call('HSET', wp .. ':condition', 'closed', '1', 'closed_at', Util.num(now),
        'closed_reason', wp_reason)
    end
    -- Watchers of the waitpoint learn it closed (docs/suspension.md#watches; no token or payload).
    redis.call('SPUBLISH', 'ff:signal_events:' .. x.tag, cjson.encode({
      type = 'waitpoint_closed', execution_id = x.eid, waitpoint_id = c.current_waitpoint_id,
      close_reason = wp_reason, at = now,
    }))
  end
end
