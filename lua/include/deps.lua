-- uses: util, keys, state, eligible, stream, attempt

local Deps = {}

-- Dependency resolution inside the call that ends an upstream (docs/flows.md#resolution).
-- One call resolves at most MAX_RESOLVED edges, looks at most at MAX_VISITED out-edges
-- (already resolved ones are cheap) and cascades skips at most MAX_DEPTH levels; what is left
-- goes on ff:idx:{p}:deps_pending, announced on ff:ready:{p} for an immediate follow-up call;
-- the dependency reconciler is the backstop.
Deps.MAX_RESOLVED = 64
Deps.MAX_VISITED = 1024
Deps.MAX_DEPTH = 32

Deps.OUTCOMES = {success = true, failed = true, cancelled = true, expired = true, skipped = true}

do
  local function meta_key(tag, eid)
    return Keys.exec(tag, eid, 'deps:meta')
  end

  -- A child's join counters (docs/flows.md#joins-and-edge-kinds): n applied edges, s satisfied,
  -- i impossible, u unresolved, k the satisfied edges the join needs (all: every edge, any: 1,
  -- quorum: its k), and `missing` the edges still to be applied: the join's expected_edges
  -- minus n; a quorum with fewer than k edges counts k more (it is never skipped before it has
  -- k edges).
  function Deps.counts(tag, eid)
    local m = redis.call('HMGET', meta_key(tag, eid), 'total_count', 'satisfied_count',
      'impossible_required_count', 'unsatisfied_required_count', 'join_kind', 'join_quorum',
      'join_edges')
    local n = tonumber(m[1] or '0') or 0
    local d = {n = n, s = tonumber(m[2] or '0') or 0, i = tonumber(m[3] or '0') or 0,
      u = tonumber(m[4] or '0') or 0}
    local missing = math.max(0, (tonumber(m[7] or '') or 0) - n)
    if m[5] == 'any' then
      d.k = 1
    elseif m[5] == 'quorum' then
      d.k = tonumber(m[6] or '') or n
      if n < d.k then
        missing = math.max(missing, d.k)
      end
    else
      d.k = n + missing
    end
    d.missing = missing
    return d
  end

  -- release once k edges are satisfied; skip once k can no longer be reached (counting the
  -- edges still to be applied as possible); else wait.
  function Deps.verdict(d)
    if d.s >= d.k then
      return 'release'
    elseif d.s + d.u + d.missing < d.k then
      return 'skip'
    end
    return 'wait'
  end

  -- The flow's failure policy (docs/flows.md#failure-policies): under `continue` a skipped
  -- upstream satisfies its edges, so a failure skips only its own dependents.
  function Deps.policy(tag, fid)
    if not Util.is_set(fid) then
      return 'skip_dependents'
    end
    return redis.call('HGET', Keys.flow(tag, fid, 'core'), 'failure_policy') or 'skip_dependents'
  end

  -- blocked:dependencies -> eligible (docs/flows.md#release-and-skip). `c` is the core snapshot.
  function Deps.release(tag, eid, c, now)
    local attempt = c.attempt_state
    if not Util.is_set(attempt) or attempt == 'none' then
      attempt = 'pending_first_attempt'
    end
    State.write_vector(Keys.exec(tag, eid, 'core'), eid, {'runnable', 'unowned', 'eligible_now',
      'waiting_for_worker', '', 'none', attempt}, now)
    redis.call('ZREM', Keys.lane(tag, c.lane_id, 'blocked:dependencies'), eid)
    local score = State.eligible_score(tonumber(c.priority or '0') or 0,
      tonumber(c.created_at or '0') or 0)
    Eligible.add(tag, c.lane_id, eid, score, c.namespace)
  end

  -- A runnable child whose join can no longer be met ends `skipped`, recording why (`why` =
  -- {edge, upstream, outcome}); a paused attempt is ended and its stream closed. Core first,
  -- then every other index of its lane and partition, then the completion publish.
  function Deps.skip(tag, eid, c, why, now)
    local idx = c.current_attempt_index
    local open = c.attempt_state == 'attempt_interrupted' and Util.is_set(idx)
    State.write_vector(Keys.exec(tag, eid, 'core'), eid, {'terminal', 'unowned', 'not_applicable',
      'none', '', 'skipped', (open and 'attempt_terminal') or 'none'}, now, {
        completed_at = Util.num(now), failure_reason = 'dependency_impossible',
        skipped_by_edge = why.edge, skipped_by_upstream = why.upstream,
        skipped_upstream_outcome = why.outcome,
      })
    for _, which in ipairs(Keys.LANE_SETS) do
      if which == 'eligible' then
        Eligible.remove(tag, c.lane_id, eid, c.namespace)
      elseif which ~= 'terminal' then
        redis.call('ZREM', Keys.lane(tag, c.lane_id, which), eid)
      end
    end
    for _, name in ipairs(Keys.PARTITION_SETS) do
      redis.call('ZREM', Keys.partition(tag, name), eid)
    end
    redis.call('ZADD', Keys.lane(tag, c.lane_id, 'terminal'), Util.num(now), eid)
    local x = {tag = tag, eid = eid}
    if open and Attempt.finish(x, idx, 'ended_cancelled', {'failure_reason',
        'dependency_impossible'}, now) then
      Stream.close(x, idx, 'dependency_impossible', now, false)
    end
    redis.call('PUBLISH', 'ff:dag:completions', cjson.encode({
      execution_id = eid, flow_id = c.flow_id, outcome = 'skipped',
    }))
  end

  -- Decides a blocked child by its join: released, skipped (why = the edge that decided) or
  -- left waiting. Returns 'released', 'skipped' or ''.
  function Deps.decide(tag, eid, c, why, now)
    if c.lifecycle_phase ~= 'runnable' or c.eligibility_state ~= 'blocked_by_dependencies'
        or c.ownership_state ~= 'unowned' then
      return ''
    end
    local v = Deps.verdict(Deps.counts(tag, eid))
    if v == 'release' then
      Deps.release(tag, eid, c, now)
      return 'released'
    elseif v == 'skip' and why then
      Deps.skip(tag, eid, c, why, now)
      return 'skipped'
    end
    return ''
  end

  -- Resolves child `child`'s inbound edge `edge` with upstream `up`'s terminal `outcome`, then
  -- lets the child's join decide. A `success` edge is satisfied by success only (or by a skip,
  -- under `continue`), a `completion` edge by any terminal outcome; resolution is one-shot. Returns (result, effect): result
  -- missing | already | satisfied | impossible; effect released | skipped | ''.
  function Deps.resolve_edge(tag, child, edge, up, outcome, now)
    local dkey = Keys.exec(tag, child, 'dep:' .. edge)
    local dep = redis.call('HMGET', dkey, 'state', 'dependency_kind', 'data_passing_ref',
      'flow_id')
    if not dep[1] then
      return 'missing', ''
    elseif dep[1] ~= 'unsatisfied' then
      return 'already', ''
    end
    local ok = outcome == 'success' or dep[2] == 'completion'
      or (outcome == 'skipped' and Deps.policy(tag, dep[4]) == 'continue')
    local state = (ok and 'satisfied') or 'impossible'
    redis.call('HSET', dkey, 'state', state, 'last_resolved_at', Util.num(now),
      'upstream_outcome', outcome)
    redis.call('SREM', Keys.exec(tag, child, 'deps:unresolved'), edge)
    local mkey = meta_key(tag, child)
    redis.call('HINCRBY', mkey, 'unsatisfied_required_count', -1)
    redis.call('HINCRBY', mkey, (ok and 'satisfied_count') or 'impossible_required_count', 1)
    redis.call('HSET', mkey, 'last_dependency_update_at', Util.num(now))
    local c = Util.hgetall(Keys.exec(tag, child, 'core'))
    if next(c) == nil then
      return state, ''
    end
    if outcome == 'success' and Util.is_set(dep[3]) and c.terminal_outcome == 'none' then
      redis.call('COPY', Keys.exec(tag, up, 'result'), Keys.exec(tag, child, 'payload'), 'REPLACE')
    end
    return state, Deps.decide(tag, child, c, {edge = edge, upstream = up, outcome = outcome}, now)
  end

  -- Upstream `eid` of flow `fid` ended with `outcome`: resolve its outgoing edges and cascade
  -- the skips this causes, within the bounds above. An upstream whose edges were not all
  -- looked at stays on (or goes on) deps_pending; one fully walked leaves it. Returns
  -- {resolved, released, skipped, pending}.
  function Deps.upstream_done(tag, eid, fid, outcome, now)
    local stats = {resolved = 0, released = 0, skipped = 0, pending = 0}
    local queue, head, visited = {{eid, outcome, 0}}, 1, 0
    local pending_key = Keys.partition(tag, 'deps_pending')
    while head <= #queue do
      local up, up_outcome, depth = queue[head][1], queue[head][2], queue[head][3]
      head = head + 1
      local done = depth <= Deps.MAX_DEPTH
      if done then
        for _, edge in ipairs(redis.call('SMEMBERS', Keys.flow(tag, fid, 'out:' .. up))) do
          if stats.resolved >= Deps.MAX_RESOLVED or visited >= Deps.MAX_VISITED then
            done = false
            break
          end
          visited = visited + 1
          local child = redis.call('HGET', Keys.flow(tag, fid, 'edge:' .. edge),
            'downstream_execution_id')
          if child then
            local r, effect = Deps.resolve_edge(tag, child, edge, up, up_outcome, now)
            if r == 'satisfied' or r == 'impossible' then
              stats.resolved = stats.resolved + 1
            end
            if effect == 'released' then
              stats.released = stats.released + 1
            elseif effect == 'skipped' then
              stats.skipped = stats.skipped + 1
              queue[#queue + 1] = {child, 'skipped', depth + 1}
            end
          end
        end
      end
      if done then
        redis.call('ZREM', pending_key, up)
      else
        redis.call('ZADD', pending_key, Util.num(now), up)
        stats.pending = stats.pending + 1
        -- a server resolves the rest at once (docs/flows.md#wide-fan-out); the reconciler
        -- is the backstop
        redis.call('SPUBLISH', 'ff:ready:' .. tag, cjson.encode({type = 'deps_pending',
          execution_id = up}))
      end
    end
    if stats.pending > 0 then
      redis.log(redis.LOG_NOTICE, 'flowfabric: dependency resolution of ' .. eid .. ' left '
        .. stats.pending .. ' upstream(s) on deps_pending (per-call bound reached)')
    end
    return stats
  end
end
