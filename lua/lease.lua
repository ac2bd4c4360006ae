-- lease.lua: renew, expiry marking, revoke and reclaim of execution leases
-- (docs/lifecycle.md#renew, docs/lifecycle.md#lease-expiry-and-reclaim, docs/lifecycle.md#revoke,
-- docs/lifecycle.md#lease-expiry-and-reclaim).
--
-- KEYS marked (*) are declared for routing only and never read: the function builds that key
-- from the tag of KEYS[1] and core fields (docs/architecture.md#keys-built-inside-lua), because the
-- holder, lane or attempt
-- index the caller pre-read may be stale. Pass the real key or the placeholder ff:noop:{p}.
--
-- uses: reply, util, bounds, argv, keys, state, lease, policy, capabilities, grant, reclaim

-- ff_renew_lease
--   KEYS (4): 1 core, 2 lease current (unused: the lease lives on the core mirror), 3 lease
--     history, 4 lease_expiry.
--   ARGV (7): 1 execution_id, 2 attempt_index, 3 attempt_id, 4 lease_id, 5 lease_epoch,
--     6 lease_ttl_ms (> 0), 7 lease_history_grace_ms (>= 0).
--   Now: TIME.
--   Replies: {1,"OK",expires_at}
--   Errors (in order): invalid_input (numeric ARGV), execution_not_found, partial_fence_triple,
--     fence_required (no unfenced renew), execution_not_active (enriched), lease_revoked,
--     lease_expired (after mark_expired, whose writes are kept), stale_lease (attempt_index,
--     attempt_id, lease_id or lease_epoch differ from the core).
--   Writes: core lease_expires_at, lease_renewal_deadline, lease_last_renewed_at,
--     last_mutation_at (one HSET); ZADD lease_expiry and lane active (built from core.lane_id)
--     at the new expiry. No history event; epoch unchanged. lease_history_grace_ms is checked
--     and otherwise unused (it was the expiry of the lease:current copy, no longer written). On lease_expired: mark_expired
--     (history `expired`, stream meta closed lease_expired + stream_closed event).
local RENEW_ARGV = {
  {6, 'lease_ttl_ms', 'int', min = 1, max = Bounds.LEASE_TTL_MS},
  {7, 'lease_history_grace_ms', 'int', min = 0, max = Bounds.LEASE_HISTORY_GRACE_MS},
  {2, 'attempt_index', 'int'},
  {5, 'lease_epoch', 'int?'},
}

local function renew_lease(keys, argv)
  local a, e = Argv.parse(argv, RENEW_ARGV)
  if not a then
    return e
  end
  local ttl, idx = a.lease_ttl_ms, a.attempt_index
  local x = State.load_exec(keys, argv)
  if not x then
    return Reply.err('execution_not_found')
  end
  local fence, ferr = Lease.resolve_fence(x.core, argv[4], argv[5], argv[3], 'lease_holder', false)
  if not fence then
    return ferr
  end
  x.history = keys[3]
  local now = Util.now_ms()
  local lerr = Lease.check(x, fence, now, true)
  if lerr then
    return lerr
  end
  local c = x.core
  if tonumber(c.current_attempt_index or '') ~= idx then
    return Reply.err('stale_lease')
  end

  local expires = now + ttl
  local renewal = now + math.floor(ttl * 2 / 3)
  redis.call('HSET', keys[1], 'lease_expires_at', Util.num(expires),
    'lease_renewal_deadline', Util.num(renewal), 'lease_last_renewed_at', Util.num(now),
    'last_mutation_at', Util.num(now))
  redis.call('ZADD', keys[4], Util.num(expires), x.eid)
  -- Lane index built from core.lane_id on the tag of KEYS[1]
  -- (docs/architecture.md#keys-built-inside-lua): scored at the lease expiry, it is what a
  -- claim of the lane reads to find due leases (docs/lifecycle.md#lease-expiry-and-reclaim).
  redis.call('ZADD', Keys.lane(x.tag, c.lane_id, 'active'), Util.num(expires), x.eid)
  return Reply.ok(Util.num(expires))
end

redis.register_function('ff_renew_lease', renew_lease)

-- ff_renew_leases (docs/lifecycle.md#batched-functions)
--   KEYS (4n), ARGV (2+7n): ARGV 1 = 4, 2 = 7, then n items each with the KEYS and ARGV of
--     ff_renew_lease, all on one partition.
--   Replies: the list of the items' ff_renew_lease replies, in order, each item renewed on its
--     own (errors included); invalid_input when the counts do not match.
redis.register_function('ff_renew_leases', function(keys, argv)
  return Util.each_item(keys, argv, renew_lease)
end)

-- ff_mark_lease_expired_if_due (lease-expiry scanner)
--   KEYS (4): 1 core, 2 lease current, 3 lease_expiry, 4 lease history.
--   ARGV (1): 1 execution_id.
--   Now: TIME.
--   Replies: {1,"OK","marked_expired"}
--     | {1,"ALREADY_SATISFIED",reason}, reason: execution_not_found (entry removed),
--       not_active (entry removed), already_expired, already_revoked, unowned (entry removed),
--       not_yet_expired.
--   Errors: none.
--   Writes: mark_expired (docs/architecture.md#shared-transition-rules): core
--   lease_expired_reclaimable vector +
--     lease_expired_at; history `expired`; open stream meta of the current attempt closed
--     lease_expired + stream_closed event. The lease_expiry entry stays for reclaim discovery.
local function mark_lease_expired_if_due(keys, argv)
  local x = State.load_exec(keys, argv)
  if not x then
    redis.call('ZREM', keys[3], argv[1])
    return Reply.already('execution_not_found')
  end
  local c = x.core
  if c.lifecycle_phase ~= 'active' then
    redis.call('ZREM', keys[3], x.eid)
    return Reply.already('not_active')
  elseif c.ownership_state == 'lease_expired_reclaimable' then
    return Reply.already('already_expired')
  elseif c.ownership_state == 'lease_revoked' then
    return Reply.already('already_revoked')
  elseif c.ownership_state ~= 'leased' then
    redis.call('ZREM', keys[3], x.eid)
    return Reply.already('unowned')
  end
  local now = Util.now_ms()
  local exp = tonumber(c.lease_expires_at or '')
  if exp and exp > now then
    return Reply.already('not_yet_expired')
  end
  x.history = keys[4]
  Lease.mark_expired(x, now)
  return Reply.ok('marked_expired')
end

redis.register_function('ff_mark_lease_expired_if_due', mark_lease_expired_if_due)

-- ff_revoke_lease (operator)
--   KEYS (5): 1 core, 2 lease current, 3 lease history, 4 lease_expiry,
--     5 holder's worker leases (*: built from core.current_worker_instance_id).
--   ARGV (3): 1 execution_id, 2 expected_lease_id ("" skips the check),
--     3 revoke_reason ("" = operator_revoke).
--   Now: TIME.
--   Replies: {1,"OK","revoked",lease_id,lease_epoch}
--     | {1,"ALREADY_SATISFIED","already_revoked"} | {1,"ALREADY_SATISFIED","already_expired"}
--   Errors: execution_not_found, execution_not_active (enriched), no_active_lease,
--     stale_lease ("expected <x> but current is <y>").
--   Writes: core lease_revoked vector, blocking_detail "lease revoked: <reason>",
--     lease_revoked_at, lease_revoke_reason (lease identity kept so the old owner is answered
--     lease_revoked); DEL lease current; SREM holder's lease set; history `revoked`;
--     ZADD lease_expiry and lane active (built from core.lane_id) at now, so the next claim of
--     the lane reclaims it. Attempt untouched.
local function revoke_lease(keys, argv)
  local x = State.load_exec(keys, argv)
  if not x then
    return Reply.err('execution_not_found')
  end
  local c = x.core
  if c.lifecycle_phase ~= 'active' then
    return Reply.not_active(c)
  elseif c.ownership_state == 'lease_revoked' then
    return Reply.already('already_revoked')
  elseif c.ownership_state == 'lease_expired_reclaimable' then
    return Reply.already('already_expired')
  elseif c.ownership_state ~= 'leased' then
    return Reply.err('no_active_lease')
  end
  local current = c.current_lease_id or ''
  if argv[2] ~= '' and argv[2] ~= current then
    return Reply.err('stale_lease', 'expected ' .. argv[2] .. ' but current is ' .. current)
  end
  local reason = (argv[3] ~= '' and argv[3]) or 'operator_revoke'
  local now = Util.now_ms()
  State.write_vector(keys[1], x.eid, {'active', 'lease_revoked', c.eligibility_state or 'not_applicable',
    'waiting_for_worker', 'lease revoked: ' .. reason, 'none', 'attempt_interrupted'}, now,
    {lease_revoked_at = Util.num(now), lease_revoke_reason = reason})
  redis.call('DEL', keys[2])
  -- Holder's lease set built on the tag of KEYS[1] (docs/architecture.md#keys-built-inside-lua).
  if Util.is_set(c.current_worker_instance_id) then
    redis.call('SREM', Keys.worker_leases(x.tag, c.current_worker_instance_id), x.eid)
  end
  Lease.event(keys[3], 'revoked', Lease.fields(c, reason), now)
  redis.call('ZADD', keys[4], Util.num(now), x.eid)
  redis.call('ZADD', Keys.lane(x.tag, c.lane_id, 'active'), Util.num(now), x.eid)
  return Reply.ok('revoked', current, c.current_lease_epoch or '')
end

redis.register_function('ff_revoke_lease', revoke_lease)

-- ff_revoke_for_budget (a hard breach of a cancel_running budget, docs/budgets.md#hard-limit-actions)
--   KEYS (5): 1 core, 2 lease current, 3 lease history, 4 lease_expiry, 5 attempt_timeout.
--   ARGV (3): 1 execution_id, 2 budget_id (must be among core.budget_ids: the fence that the
--     lease holds admission on this budget), 3 blocking detail.
--   Now: TIME.
--   Replies: {1,"OK","revoked",lease_epoch}; {1,"ALREADY_SATISFIED","not_active"} (no lease
--     to take: not active any more); {1,"ALREADY_SATISFIED","not_attached"} (the execution is
--     not on this budget).
--   Errors: invalid_input (empty budget_id), execution_not_found.
--   Writes: core runnable / unowned / blocked_by_budget / waiting_for_budget vector with the
--     detail, lease mirror cleared (attempt id and epoch kept), lease_revoked_at and
--     lease_revoke_reason "budget_cancel_running"; current attempt paused (suspended,
--     suspension_id budget_cancel_running) so the next claim resumes it; history `revoked`;
--     Lease.release (lease key, lease_expiry, lane active, attempt_timeout, holder's lease set,
--     history `released`, admission_released announcement); ZADD lane blocked:budget now.
local REVOKE_BUDGET_ARGV = {{2, 'budget_id', 'str'}}

local function revoke_for_budget(keys, argv)
  local a, e = Argv.parse(argv, REVOKE_BUDGET_ARGV)
  if not a then
    return e
  end
  local x = State.load_exec(keys, argv)
  if not x then
    return Reply.err('execution_not_found')
  end
  local c = x.core
  if c.lifecycle_phase ~= 'active' then
    return Reply.already('not_active')
  end
  local attached = false
  for _, b in ipairs(Util.split_csv(c.budget_ids or '')) do
    attached = attached or b == a.budget_id
  end
  if not attached then
    return Reply.already('not_attached')
  end
  local now = Util.now_ms()
  local reason = 'budget_cancel_running'
  local detail = (argv[3] ~= '' and argv[3]) or ('budget ' .. a.budget_id .. ': hard limit breached')
  Lease.event(keys[3], 'revoked', Lease.fields(c, reason), now)
  State.write_vector(keys[1], x.eid, {'runnable', 'unowned', 'blocked_by_budget',
    'waiting_for_budget', detail, 'none', 'attempt_interrupted'}, now,
    Lease.cleared({lease_revoked_at = Util.num(now), lease_revoke_reason = reason}))
  local idx = c.current_attempt_index
  if Util.is_set(idx) then
    local attempt = Keys.attempt(x.tag, x.eid, idx)
    if redis.call('HGET', attempt, 'attempt_state') == 'started' then
      redis.call('HSET', attempt, 'attempt_state', 'suspended', 'suspended_at', Util.num(now),
        'suspension_id', reason)
    end
  end
  x.lease, x.history, x.lease_expiry, x.attempt_timeout = keys[2], keys[3], keys[4], keys[5]
  Lease.release(x, reason, now)
  -- Lane index built from core.lane_id on the tag of KEYS[1]
  -- (docs/architecture.md#keys-built-inside-lua).
  redis.call('ZADD', Keys.lane(x.tag, c.lane_id, 'blocked:budget'), Util.num(now), x.eid)
  return Reply.ok('revoked', c.current_lease_epoch or '')
end

redis.register_function('ff_revoke_for_budget', revoke_for_budget)

-- ff_issue_reclaim_grant
--   KEYS (3): 1 core, 2 claim_grant, 3 lease_expiry (declared, unused).
--   ARGV (9): 1 execution_id, 2 worker_id, 3 worker_instance_id, 4 lane_id, 5 capability_hash,
--     6 grant_ttl_ms (> 0), 7 route_snapshot_json, 8 admission_summary,
--     9 worker_capabilities_csv (sorted, comma-joined; "" = none).
--   Now: TIME.
--   Replies: {1,"OK",execution_id,grant_expires_at}
--   Errors: invalid_input (grant_ttl_ms, empty worker ids), execution_not_found,
--     execution_not_reclaimable (not active, or ownership not lease_expired_reclaimable /
--     lease_revoked), grant_already_exists, invalid_capabilities (required:/worker:
--     too_many_bytes|too_many_tokens), capability_mismatch (detail = sorted missing CSV; writes
--     only core last_capability_mismatch_at).
--   Writes: claim_grant hash (worker_id, worker_instance_id, lane_id, capability_hash,
--     route_snapshot_json, admission_summary, created_at, grant_expires_at), PEXPIREAT at
--     grant_expires_at. The execution stays in lease_expiry.
local GRANT_ARGV = {
  {6, 'grant_ttl_ms', 'int', min = 1, max = Bounds.GRANT_TTL_MS},
  {2, 'worker_id', 'str'},
  {3, 'worker_instance_id', 'str'},
}

local function issue_reclaim_grant(keys, argv)
  local a, e = Argv.parse(argv, GRANT_ARGV)
  if not a then
    return e
  end
  local ttl = a.grant_ttl_ms
  local x = State.load_exec(keys, argv)
  if not x then
    return Reply.err('execution_not_found')
  end
  local c = x.core
  if c.lifecycle_phase ~= 'active' or (c.ownership_state ~= 'lease_expired_reclaimable'
      and c.ownership_state ~= 'lease_revoked') then
    return Reply.err('execution_not_reclaimable')
  end
  if redis.call('EXISTS', keys[2]) == 1 then
    return Reply.err('grant_already_exists')
  end
  local now = Util.now_ms()
  local cerr = Caps.check(x, argv[9] or '', now)
  if cerr then
    return cerr
  end
  local expires = Grant.write(keys[2], argv, now, ttl)
  return Reply.ok(x.eid, Util.num(expires))
end

redis.register_function('ff_issue_reclaim_grant', issue_reclaim_grant)

-- ff_reclaim_execution
--   KEYS (14): 1 core, 2 claim_grant, 3 old attempt hash (*), 4 old stream meta (*),
--     5 new attempt hash (*), 6 new attempt usage (unused), 7 attempts (unused), 8 lease
--     current (unused), 9 lease history, 10 lease_expiry, 11 new worker's leases (*), 12 lane active (*),
--     13 attempt_timeout, 14 execution_deadline.
--     (*) built from the tag of KEYS[1]: attempt keys from core.current_attempt_index and
--     core.total_attempt_count, the lease set from ARGV[3], the lane from core.lane_id.
--   ARGV (8): 1 execution_id, 2 worker_id, 3 worker_instance_id, 4 lane (stored as
--     current_lane; "" = core.lane_id), 5 lease_id, 6 lease_ttl_ms (> 0), 7 attempt_id,
--     8 attempt_policy_json ("" = none; else a JSON object, flattened into the attempt policy).
--   Reads: the stored policy (ff:exec:{p}:<eid>:policy, built from the tag) for
--     max_reclaim_count (default 100) and timeout_policy.attempt_timeout_ms; for the reply, the
--     payload and tags (built from the tag).
--   Now: TIME.
--   Replies: {1,"OK",lease_id,lease_epoch,lease_expires_at,attempt_id,attempt_index,"reclaim",
--     payload,payload_encoding,execution_kind,namespace,priority,flow_id,tags (flat name/value),
--     trace_context} (after the lease, what the worker needs, as in an ff_claim_batch `claimed` row)
--     | {1,"OK","max_reclaims_exceeded"} (execution is now terminal failed).
--   Errors (in order): invalid_input, execution_not_found, execution_not_reclaimable; then the
--     reclaim limit (reply above); invalid_claim_grant (missing or another worker's),
--     claim_grant_expired.
--   Writes: core claimed vector with the new attempt and lease mirror, current_lane,
--     lease_reclaim_count+1, expiry/revoke markers cleared; DEL grant; old attempt
--     interrupted_reclaimed (ended_at, failure_reason = lease_expired|lease_revoked); old stream
--     meta closed `reclaimed` + stream_closed event; new attempt (type reclaim, reclaim_reason,
--     previous_attempt_index), policy snapshot (attempts, usage and lease current are no longer
--     written: docs/lifecycle.md#leases-and-fencing); core attempt_timeout_at;
--     ZADD lease_expiry, lane active; SREM the previous holder's lease set, SADD the new one;
--     attempt_timeout re-armed from the policy (or removed); history `reclaimed`.
--     Limit path: terminal failed (failure_reason max_reclaims_exceeded), old attempt
--     interrupted_reclaimed, stream closed `reclaimed`, lease released, ff:dag:completions.
local RECLAIM_ARGV = {
  {6, 'lease_ttl_ms', 'int', min = 1, max = Bounds.LEASE_TTL_MS},
  {2, 'worker_id', 'str'},
  {3, 'worker_instance_id', 'str'},
  {5, 'lease_id', 'str'},
  {7, 'attempt_id', 'str'},
}

local function reclaim_execution(keys, argv)
  local args, e = Argv.parse(argv, RECLAIM_ARGV)
  if not args then
    return e
  end
  local ttl = args.lease_ttl_ms
  local policy_flat, perr = Policy.flatten(argv[8])
  if not policy_flat then
    return perr
  end
  local x = State.load_exec(keys, argv)
  if not x then
    return Reply.err('execution_not_found')
  end
  local c = x.core
  if c.lifecycle_phase ~= 'active' or (c.ownership_state ~= 'lease_expired_reclaimable'
      and c.ownership_state ~= 'lease_revoked') then
    return Reply.err('execution_not_reclaimable')
  end
  x.attempts, x.lease, x.history, x.lease_expiry = keys[7], keys[8], keys[9], keys[10]
  x.attempt_timeout, x.deadline = keys[13], keys[14]
  local policy = Policy.stored(x)
  local now = Util.now_ms()
  if Reclaim.at_limit(x, policy) then
    Reclaim.fail_at_limit(x, now)
    return Reply.ok('max_reclaims_exceeded')
  end
  local gerr = Grant.check(keys[2], argv[2], now)
  if gerr then
    return gerr
  end
  local a = Reclaim.take(x, {worker_id = argv[2], worker_instance_id = argv[3], lane = argv[4],
    lease_id = argv[5], attempt_id = argv[7], ttl = ttl, policy = policy_flat}, policy, keys[2], now)
  return Reply.ok(a.lease_id, Util.num(a.epoch), Util.num(a.expires), a.attempt_id, Util.num(a.idx),
    'reclaim', redis.call('GET', Keys.exec(x.tag, x.eid, 'payload')) or '',
    c.payload_encoding or '', c.execution_kind or '', c.namespace or '', c.priority or '0',
    c.flow_id or '', redis.call('HGETALL', Keys.exec(x.tag, x.eid, 'tags')), c.trace_context or '')
end

redis.register_function('ff_reclaim_execution', reclaim_execution)
