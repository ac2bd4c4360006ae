-- uses: reply, util, keys, state, eligible, lease, policy

local Replay = {}

-- Replay of one terminal execution (docs/lifecycle.md#replays), shared by ff_replay_execution
-- and ff_replay_flow (docs/flows.md#replaying-a-flow).

-- Whether `x` (a loaded terminal execution) may be replayed once more: nil, or the
-- max_replays_exhausted error reply.
function Replay.refused(x)
  local count = tonumber(x.core.replay_count or '0') or 0
  if count >= Policy.int(Policy.stored(x), 'max_replay_count', 10) then
    return Reply.err('max_replays_exhausted')
  end
  return nil
end

-- Returns `x` to run: waiting (eligible) or, with `unsatisfied` > 0, waiting for its
-- dependencies. Core replayed vector (pending_replay_attempt), replay_count+1, outcome fields
-- and skip provenance cleared, retry and reclaim counts reset; result deleted; lane terminal ->
-- eligible or blocked:dependencies; history `replay_initiated` (with `reason` when given).
-- Returns the public state.
function Replay.reset(x, unsatisfied, replay_type, now, reason)
  local c = x.core
  local count = tonumber(c.replay_count or '0') or 0
  local extra = {
    replay_count = Util.num(count + 1), completed_at = '',
    pending_previous_attempt_index = c.current_attempt_index or '',
    pending_retry_reason = '', pending_replay_reason = '', pending_replay_requested_by = '',
    failure_reason = '', cancellation_reason = '', cancelled_by = '', result_encoding = '',
    retry_count = '0', lease_reclaim_count = '0',
    skipped_by_edge = '', skipped_by_upstream = '', skipped_upstream_outcome = '',
  }
  local created = tonumber(c.created_at or '0') or 0
  local vector, target, score
  if unsatisfied > 0 then
    vector = {'runnable', 'unowned', 'blocked_by_dependencies', 'waiting_for_children',
      unsatisfied .. ' dep(s) unsatisfied after replay', 'none', 'pending_replay_attempt'}
    target, score = 'blocked:dependencies', created
  else
    vector = {'runnable', 'unowned', 'eligible_now', 'waiting_for_worker', '', 'none',
      'pending_replay_attempt'}
    target = 'eligible'
    score = State.eligible_score(tonumber(c.priority or '0') or 0, created)
  end
  local public = State.write_vector(x.core_key, x.eid, vector, now, extra)
  -- Lane indexes built from core.lane_id on the tag of KEYS[1]
  -- (docs/architecture.md#keys-built-inside-lua).
  redis.call('ZREM', Keys.lane(x.tag, c.lane_id, 'terminal'), x.eid)
  if target == 'eligible' then
    Eligible.add(x.tag, c.lane_id, x.eid, score, c.namespace)
  else
    redis.call('ZADD', Keys.lane(x.tag, c.lane_id, target), Util.num(score), x.eid)
  end
  redis.call('DEL', Keys.exec(x.tag, x.eid, 'result'))
  local fields = {'replay_count', Util.num(count + 1), 'replay_type', replay_type}
  if Util.is_set(reason) then
    fields[#fields + 1], fields[#fields + 2] = 'reason', reason
  end
  Lease.event(Keys.exec(x.tag, x.eid, 'lease:history'), 'replay_initiated', fields, now)
  return public
end
