-- uses: util, keys, state, eligible

local Suspend = {}

-- Lane-suspended score of a suspension without a timeout (docs/suspension.md#limits).
Suspend.NO_TIMEOUT_SCORE = '9999999999999'

-- One JSON event on ff:signal_events:{p} (docs/suspension.md#watches). Never tokens, secrets or
-- payloads.
function Suspend.signal_event(tag, ev)
  redis.call('SPUBLISH', 'ff:signal_events:' .. tag, cjson.encode(ev))
end

-- Closes waitpoint `wpid` (state closed, or `state` when given), its condition hash when
-- present (closed=1 with `cond_reason`), and publishes waitpoint_closed. `satisfied` also
-- stamps satisfied_at.
function Suspend.close_waitpoint(x, wpid, reason, cond_reason, now, satisfied, state)
  local wp = Keys.waitpoint(x.tag, wpid)
  local args = {'HSET', wp, 'state', state or 'closed', 'closed_at', Util.num(now),
    'close_reason', reason}
  if satisfied then
    args[#args + 1] = 'satisfied_at'
    args[#args + 1] = Util.num(now)
  end
  redis.call(unpack(args))
  if redis.call('EXISTS', wp .. ':condition') == 1 then
    redis.call('HSET', wp .. ':condition', 'closed', '1', 'closed_at', Util.num(now),
      'closed_reason', cond_reason, 'updated_at', Util.num(now))
  end
  Suspend.signal_event(x.tag, {type = 'waitpoint_closed', execution_id = x.eid, waitpoint_id = wpid,
    close_reason = reason, at = now})
end

-- Resume transition of a suspended execution (docs/suspension.md#concepts): core first (current
-- suspension/waitpoint cleared, delay_until on a delayed resume), then the lane moves and the
-- suspension-timeout entry. `detail` = blocking_detail of a delayed resume. Returns
-- public_state. Lane keys built from core.lane_id on the tag of KEYS[1].
function Suspend.resume_core(x, timeout_idx, delay, detail, now)
  local c = x.core
  local public
  if delay > 0 then
    public = State.write_vector(x.core_key, x.eid, {'runnable', 'unowned', 'not_eligible_until_time',
      'waiting_for_resume_delay', detail, 'none', 'attempt_interrupted'}, now,
      {current_suspension_id = '', current_waitpoint_id = '', delay_until = Util.num(now + delay)})
  else
    public = State.write_vector(x.core_key, x.eid, {'runnable', 'unowned', 'eligible_now',
      'waiting_for_worker', '', 'none', 'attempt_interrupted'}, now,
      {current_suspension_id = '', current_waitpoint_id = '', delay_until = ''})
  end
  redis.call('ZREM', Keys.lane(x.tag, c.lane_id, 'suspended'), x.eid)
  if delay > 0 then
    redis.call('ZADD', Keys.lane(x.tag, c.lane_id, 'delayed'), Util.num(now + delay), x.eid)
  else
    local score = State.eligible_score(tonumber(c.priority or '0') or 0,
      tonumber(c.created_at or '0') or 0)
    Eligible.add(x.tag, c.lane_id, x.eid, score, c.namespace)
  end
  redis.call('ZREM', timeout_idx, x.eid)
  return public
end
