-- scheduling.lua: claim grants, claims, delayed promotion and priority (docs/lifecycle.md#claims,
-- docs/lifecycle.md#priority-and-progress, docs/lifecycle.md#delay-and-promotion).
--
-- KEYS marked (*) are declared for routing only and never read: the function builds that key
-- from the tag of KEYS[1] and core fields or ARGV (docs/architecture.md#keys-built-inside-lua).
-- Pass the real key or the
-- placeholder ff:noop:{p}.
--
-- uses: reply, util, bounds, argv, keys, state, eligible, lease, attempt, policy, capabilities, grant, reclaim

-- ff_issue_claim_grant
--   KEYS (3): 1 core, 2 claim_grant, 3 lane eligible (*: built from core.lane_id).
--   ARGV (9): 1 execution_id, 2 worker_id, 3 worker_instance_id, 4 lane_id, 5 capability_hash,
--     6 grant_ttl_ms (> 0), 7 route_snapshot_json, 8 admission_summary,
--     9 worker_capabilities_csv (sorted, comma-joined; "" = none; stray empty tokens skipped).
--   Now: TIME.
--   Replies: {1,"OK",execution_id,grant_expires_at}
--   Errors (in order): invalid_input (grant_ttl_ms, empty worker ids), execution_not_found,
--     execution_not_eligible (not runnable + eligible_now), grant_already_exists,
--     execution_not_in_eligible_set, invalid_capabilities (required:/worker:
--     too_many_bytes|too_many_tokens), capability_mismatch (detail = sorted CSV of missing
--     tokens; writes only core last_capability_mismatch_at).
--   Writes: claim_grant hash (worker_id, worker_instance_id, lane_id, capability_hash,
--     route_snapshot_json, admission_summary, created_at, grant_expires_at), PEXPIREAT at
--     grant_expires_at. The execution stays in eligible (only the claim removes it).
-- Grant preconditions once the core is loaded (docs/lifecycle.md#claims), in order: eligible, no
-- grant
-- outstanding, in the lane's eligible set, capabilities (a mismatch stamps the core's
-- last_capability_mismatch_at, the only write). Returns nil or the error reply. Shared by
-- ff_issue_claim_grant and ff_claim_batch. `listed`: the id was read from the lane's eligible
-- set in this call (and nothing in the call takes an id out of it without moving its core off
-- eligible_now), so the set is not read again.
local function grant_denied(x, grant_key, worker_csv, now, listed)
  local c = x.core
  if c.lifecycle_phase ~= 'runnable' or c.eligibility_state ~= 'eligible_now' then
    return Reply.err('execution_not_eligible')
  end
  if redis.call('EXISTS', grant_key) == 1 then
    return Reply.err('grant_already_exists')
  end
  -- Lane index built from core.lane_id on the tag of KEYS[1]
  -- (docs/architecture.md#keys-built-inside-lua).
  if not listed and not redis.call('ZSCORE', Keys.lane(x.tag, c.lane_id, 'eligible'), x.eid) then
    return Reply.err('execution_not_in_eligible_set')
  end
  return Caps.check(x, worker_csv, now)
end

local GRANT_ARGV = {
  {6, 'grant_ttl_ms', 'int', min = 1, max = Bounds.GRANT_TTL_MS},
  {2, 'worker_id', 'str'},
  {3, 'worker_instance_id', 'str'},
}

local function issue_claim_grant(keys, argv)
  local a, e = Argv.parse(argv, GRANT_ARGV)
  if not a then
    return e
  end
  local ttl = a.grant_ttl_ms
  local x = State.load_exec(keys, argv)
  if not x then
    return Reply.err('execution_not_found')
  end
  local now = Util.now_ms()
  local gerr = grant_denied(x, keys[2], argv[9] or '', now)
  if gerr then
    return gerr
  end
  local expires = Grant.write(keys[2], argv, now, ttl)
  return Reply.ok(x.eid, Util.num(expires))
end

redis.register_function('ff_issue_claim_grant', issue_claim_grant)

-- Claim preconditions on the core (docs/lifecycle.md#claims, before the grant checks).
local function claimable(c)
  if c.lifecycle_phase ~= 'runnable' then
    return Reply.err('execution_not_leaseable')
  elseif c.ownership_state ~= 'unowned' then
    return Reply.err('lease_conflict')
  elseif c.eligibility_state ~= 'eligible_now' or (c.terminal_outcome or 'none') ~= 'none' then
    return Reply.err('execution_not_leaseable')
  elseif c.attempt_state == 'running_attempt' then
    return Reply.err('active_attempt_exists')
  elseif c.attempt_state == 'attempt_interrupted' then
    return Reply.err('use_claim_resumed_execution')
  end
  return nil
end

-- Attempt type and lineage fields of the attempt a claim creates (docs/lifecycle.md#claims).
local function new_attempt_lineage(c)
  if c.attempt_state == 'pending_retry_attempt' then
    return 'retry', {'retry_reason', c.pending_retry_reason or '',
      'previous_attempt_index', c.pending_previous_attempt_index or ''}
  elseif c.attempt_state == 'pending_replay_attempt' then
    return 'replay', {'replay_reason', c.pending_replay_reason or '',
      'replay_requested_by', c.pending_replay_requested_by or '',
      'replayed_from_attempt_index', c.pending_previous_attempt_index or ''}
  end
  return 'initial', {}
end

-- The attempt timeout of the stored policy: the core's copy made at create
-- (policy_attempt_timeout_ms, "0" = none), else (a core written before that field) the policy.
local function stored_timeout(x)
  local t = tonumber(x.core.policy_attempt_timeout_ms or '')
  if t then
    return t > 0 and t or false
  end
  return Policy.attempt_timeout_of(Policy.stored(x))
end

-- The writes of a claim that starts a new attempt (docs/lifecycle.md#claims), once every check
-- passed. k = {grant (false: the caller checked there is none), history, lease_expiry,
-- attempt_timeout, deadline} (keys);
-- p = {worker_id, worker_instance_id, lane ("" = core.lane_id; stored as current_lane),
-- lease_id, attempt_id, ttl, renew_before, timeout (false = the stored policy's), deadline
-- (false = none), policy (flat list)}. Returns the attempt table. Shared by ff_claim_execution
-- and ff_claim_batch.
local function claim_new_attempt(x, k, p, now)
  local c = x.core
  local attempt_type, lineage = new_attempt_lineage(c)
  local a = {
    idx = tonumber(c.total_attempt_count or '0') or 0, attempt_id = p.attempt_id,
    attempt_type = attempt_type, lease_id = p.lease_id,
    epoch = (tonumber(c.current_lease_epoch or '0') or 0) + 1,
    worker_id = p.worker_id, worker_instance_id = p.worker_instance_id,
    expires = now + p.ttl, renewal = now + p.renew_before, lineage = lineage, policy = p.policy,
  }
  local timeout = p.timeout
  if timeout == false then
    timeout = stored_timeout(x)
  end
  local extra = Lease.claimed_fields(a, (p.lane ~= '' and p.lane) or c.lane_id, now)
  extra.attempt_timeout_at = (timeout and timeout > 0) and Util.num(now + timeout) or '0'
  extra.pending_retry_reason = ''
  extra.pending_replay_reason = ''
  extra.pending_replay_requested_by = ''
  extra.pending_previous_attempt_index = ''
  if not Util.is_set(c.started_at) then
    extra.started_at = Util.num(now)
  end
  if p.deadline then
    extra.execution_deadline_at = Util.num(p.deadline)
  end
  State.write_vector(x.core_key, x.eid, Lease.CLAIMED, now, extra, c)
  if k.grant then
    redis.call('DEL', k.grant)
  end
  Attempt.start(x, a, now)
  Lease.index(x, c.lane_id, k.lease_expiry, a)
  if timeout and timeout > 0 then
    redis.call('ZADD', k.attempt_timeout, Util.num(now + timeout), x.eid)
  end
  if p.deadline then
    redis.call('ZADD', k.deadline, Util.num(p.deadline), x.eid)
  end
  Lease.event(k.history, 'acquired', {'lease_id', a.lease_id, 'lease_epoch', Util.num(a.epoch),
    'attempt_id', a.attempt_id, 'attempt_index', Util.num(a.idx), 'worker_id', a.worker_id}, now)
  return a
end

-- The writes of a claim that resumes the interrupted attempt
-- (docs/suspension.md#claiming-a-resumed-execution), once every check
-- passed. k as claim_new_attempt (attempts unused); p = {worker_id, worker_instance_id, lane,
-- lease_id, ttl, remaining (attempt timeout left; false or <= 0 = none)}. The renewal deadline
-- is now + floor(ttl x 2/3). Returns the attempt table. Shared by ff_claim_resumed_execution
-- and ff_claim_batch.
local function claim_same_attempt(x, k, p, now)
  local c = x.core
  local idx = tonumber(c.current_attempt_index or '0') or 0
  local a = {
    idx = idx, attempt_id = c.current_attempt_id, lease_id = p.lease_id,
    epoch = (tonumber(c.current_lease_epoch or '0') or 0) + 1,
    worker_id = p.worker_id, worker_instance_id = p.worker_instance_id,
    expires = now + p.ttl, renewal = now + math.floor(p.ttl * 2 / 3),
  }
  local extra = Lease.claimed_fields(a, (p.lane ~= '' and p.lane) or c.lane_id, now)
  extra.attempt_timeout_at = (p.remaining and p.remaining > 0) and Util.num(now + p.remaining)
    or '0'
  State.write_vector(x.core_key, x.eid, Lease.CLAIMED, now, extra, c)
  if k.grant then
    redis.call('DEL', k.grant)
  end
  redis.call('HSET', Keys.attempt(x.tag, x.eid, idx), 'attempt_state', 'started',
    'resumed_at', Util.num(now), 'lease_id', a.lease_id, 'lease_epoch', Util.num(a.epoch),
    'worker_id', a.worker_id, 'worker_instance_id', a.worker_instance_id,
    'suspended_at', '', 'suspension_id', '')
  Lease.index(x, c.lane_id, k.lease_expiry, a)
  if p.remaining and p.remaining > 0 then
    redis.call('ZADD', k.attempt_timeout, Util.num(now + p.remaining), x.eid)
  end
  Lease.event(k.history, 'acquired', {'lease_id', a.lease_id, 'lease_epoch', Util.num(a.epoch),
    'attempt_id', a.attempt_id, 'attempt_index', Util.num(idx), 'worker_id', a.worker_id,
    'reason', 'claim_resumed'}, now)
  return a
end

-- ff_claim_execution
--   KEYS (14): 1 core, 2 claim_grant, 3 lane eligible (*), 4 lease_expiry,
--     5 claimer's worker leases (*), 6 attempt hash (*), 7 attempt usage (unused),
--     8 attempt policy (*), 9 attempts (unused), 10 lease current (unused), 11 lease history,
--     12 lane active (*), 13 attempt_timeout, 14 execution_deadline.
--     (*) built from the tag of KEYS[1]: lanes from core.lane_id, the lease set from ARGV[3],
--     attempt keys from core.total_attempt_count (the caller's expected index only names them).
--   ARGV (12): 1 execution_id, 2 worker_id, 3 worker_instance_id, 4 lane (stored as
--     current_lane; "" = core.lane_id), 5 capability_hash, 6 lease_id, 7 lease_ttl_ms (> 0),
--     8 renew_before_ms (>= 0; worker passes floor(ttl*2/3)), 9 attempt_id,
--     10 attempt_policy_json ("" = none; else a JSON object), 11 attempt_timeout_ms
--     ("" = the stored policy's timeout_policy.attempt_timeout_ms; "0" = none),
--     12 execution_deadline_at ("" = none).
--   Now: TIME.
--   Replies: {1,"OK",lease_id,lease_epoch,lease_expires_at,attempt_id,attempt_index,
--     attempt_type}   attempt_type: initial | retry | replay.
--   Errors (in order): invalid_input (numeric ARGV, empty ids, attempt_policy_json),
--     execution_not_found, execution_not_leaseable (not runnable), lease_conflict (owned),
--     execution_not_leaseable (not eligible_now, or terminal_outcome set),
--     active_attempt_exists, use_claim_resumed_execution (attempt_interrupted; grant kept),
--     invalid_claim_grant (missing or another worker's), claim_grant_expired.
--   Writes: core claimed vector (one HSET), attempt pointers, total_attempt_count, lease mirror
--     (the only copy of the lease), current_lane, started_at (first claim only),
--     attempt_timeout_at (the attempt_timeout entry's due time, "0" = none), pending lineage and
--     expiry/revoke markers cleared; DEL grant; attempt hash (started, lineage), attempt policy
--     when given; ZREM eligible (and its namespace sub-index); ZADD lease_expiry, lane active
--     (both at expires); SADD claimer's lease set; ZADD attempt_timeout (now + timeout) when
--     one applies (the stored policy's comes from the core's policy_attempt_timeout_ms, not a
--     policy read); ZADD execution_deadline when given; history `acquired`.
local CLAIM_ARGV = {
  {7, 'lease_ttl_ms', 'int', min = 1, max = Bounds.LEASE_TTL_MS},
  {8, 'renew_before_ms', 'int', min = 0, max = Bounds.LEASE_TTL_MS},
  {11, 'attempt_timeout_ms', 'int?', min = 0, max = Bounds.HORIZON_MS},
  {12, 'execution_deadline_at', 'int?', min = 0, max = Bounds.TIMESTAMP_MS},
  {2, 'worker_id', 'str'},
  {3, 'worker_instance_id', 'str'},
  {6, 'lease_id', 'str'},
  {9, 'attempt_id', 'str'},
}

local function claim_execution(keys, argv)
  local args, e = Argv.parse(argv, CLAIM_ARGV)
  if not args then
    return e
  end
  local ttl, renew_before = args.lease_ttl_ms, args.renew_before_ms
  local timeout, deadline = args.attempt_timeout_ms, args.execution_deadline_at
  local policy_flat, perr = Policy.flatten(argv[10])
  if not policy_flat then
    return perr
  end
  local x = State.load_exec(keys, argv)
  if not x then
    return Reply.err('execution_not_found')
  end
  local cerr = claimable(x.core)
  if cerr then
    return cerr
  end
  local now = Util.now_ms()
  local gerr = Grant.check(keys[2], argv[2], now)
  if gerr then
    return gerr
  end
  local a = claim_new_attempt(x, {grant = keys[2], history = keys[11], lease_expiry = keys[4], attempt_timeout = keys[13],
    deadline = keys[14]}, {worker_id = argv[2], worker_instance_id = argv[3], lane = argv[4],
    lease_id = argv[6], attempt_id = argv[9], ttl = ttl, renew_before = renew_before,
    timeout = timeout, deadline = deadline, policy = policy_flat}, now)
  return Reply.ok(a.lease_id, Util.num(a.epoch), Util.num(a.expires), a.attempt_id, Util.num(a.idx), a.attempt_type)
end

redis.register_function('ff_claim_execution', claim_execution)

-- ff_claim_resumed_execution (docs/suspension.md#claiming-a-resumed-execution): lease a runnable,
-- attempt_interrupted execution
-- (resumed suspension, worker self-delay, waiting-children) reusing its attempt.
--   KEYS (11): 1 core, 2 claim_grant, 3 lane eligible (*), 4 lease_expiry, 5 claimer's worker
--     leases (*), 6 attempt hash (*), 7 lease current, 8 lease history, 9 lane active (*),
--     10 attempt_timeout, 11 execution_deadline (unused); 7 lease current is unused.
--     (*) built from the tag of KEYS[1] (docs/architecture.md#keys-built-inside-lua): lanes from
--     core.lane_id, the lease
--     set from ARGV[3], the attempt from core.current_attempt_index.
--   ARGV (8): 1 execution_id, 2 worker_id, 3 worker_instance_id, 4 lane (stored as current_lane;
--     "" = core.lane_id), 5 lease_id, 6 lease_ttl_ms (> 0), 7 current_attempt_index (informational),
--     8 remaining_attempt_timeout_ms ("" or "0" = none).
--   Now: TIME.
--   Replies: {1,"OK",lease_id,lease_epoch,lease_expires_at,attempt_id,attempt_index,"resumed"}
--   Errors (in order): invalid_input (numeric ARGV, empty ids), execution_not_found,
--     execution_not_leaseable (not runnable, or not eligible_now), not_a_resumed_execution
--     (attempt_state not attempt_interrupted), invalid_claim_grant (missing or another worker's),
--     claim_grant_expired (grant deleted).
--   Writes: core claimed vector with the same attempt and a new lease (epoch + 1),
--     attempt_timeout_at; DEL grant; attempt started, resumed_at, lease and worker ids,
--     suspended_at/suspension_id cleared; ZREM eligible; ZADD lease_expiry and lane active at expires; SADD
--     claimer's lease set; ZADD attempt_timeout at now + remaining when > 0; history `acquired`
--     (reason claim_resumed).
local CLAIM_RESUMED_ARGV = {
  {6, 'lease_ttl_ms', 'int', min = 1, max = Bounds.LEASE_TTL_MS},
  {8, 'remaining_attempt_timeout_ms', 'int?', max = Bounds.HORIZON_MS},
  {2, 'worker_id', 'str'},
  {3, 'worker_instance_id', 'str'},
  {5, 'lease_id', 'str'},
}

local function claim_resumed_execution(keys, argv)
  local args, e = Argv.parse(argv, CLAIM_RESUMED_ARGV)
  if not args then
    return e
  end
  local ttl, remaining = args.lease_ttl_ms, args.remaining_attempt_timeout_ms
  local x = State.load_exec(keys, argv)
  if not x then
    return Reply.err('execution_not_found')
  end
  local c = x.core
  if c.lifecycle_phase ~= 'runnable' or c.eligibility_state ~= 'eligible_now' then
    return Reply.err('execution_not_leaseable')
  end
  if c.attempt_state ~= 'attempt_interrupted' then
    return Reply.err('not_a_resumed_execution')
  end
  local now = Util.now_ms()
  local gerr = Grant.check(keys[2], argv[2], now)
  if gerr then
    if gerr[2] == 'claim_grant_expired' then
      redis.call('DEL', keys[2])
    end
    return gerr
  end
  local a = claim_same_attempt(x, {grant = keys[2], history = keys[8],
    lease_expiry = keys[4], attempt_timeout = keys[10]}, {worker_id = argv[2],
    worker_instance_id = argv[3], lane = argv[4], lease_id = argv[5], ttl = ttl,
    remaining = remaining}, now)
  return Reply.ok(a.lease_id, Util.num(a.epoch), Util.num(a.expires), a.attempt_id, Util.num(a.idx), 'resumed')
end

redis.register_function('ff_claim_resumed_execution', claim_resumed_execution)

-- The batch claim: one claimer leases up to max_tasks executions of one lane on one partition
-- in one call (docs/lifecycle.md#the-claim-cycle). First the lane's due leases: every
-- execution of the lane active set scored at or before now whose lease is expired (marked
-- here if the scanner has not yet) or revoked is reclaimed, as ff_reclaim_execution does
-- (docs/lifecycle.md#lease-expiry-and-reclaim), so a backlog of new work cannot starve a
-- crashed worker's executions. Then the eligible heads, each through what
-- ff_issue_claim_grant then ff_claim_execution (or ff_claim_resumed_execution, for an
-- attempt_interrupted execution) do: the grant checks (a grant held by anyone skips the head;
-- a capability mismatch reports it), then the claim checks, then the claim writes with the
-- server's defaults (no attempt policy, the stored attempt timeout, no deadline; a resumed
-- claim sets no attempt timeout). The grant itself is never written: it would be consumed by
-- the same call. With max_reply_bytes set, a head whose row would take the reply past it is
-- not leased and the call stops there (docs/lifecycle.md#claim-reply-size).
--
-- The order of the eligible heads (docs/lifecycle.md#tenant-fairness): with at most one
-- namespace in the lane's namespace set, eligible order (priority, then age). With more, the
-- call takes the namespace of lowest virtual time (of the first Claim.FAIR_NAMESPACES in the
-- set; ties in set order), examines the next head of its sub-index, in eligible order, and
-- advances the namespace's virtual time by floor(Eligible.UNIT / weight) whatever the head's
-- outcome (leased, reported for admission, mismatched or skipped: a namespace is charged for
-- the heads it is offered, so one whose heads this claimer cannot take neither holds the call
-- nor builds up a lead); then repeats, within max_scanned heads.
--
-- ff_claim_batch
--   KEYS (4): 1 lane eligible (ARGV[3]'s), 2 lease_expiry, 3 attempt_timeout,
--     4 execution_deadline, all on one partition's tag. Every other key (cores, grants,
--     attempts, leases, histories, lane active, the lane's namespace set and namespace
--     sub-indexes, the claimer's lease set) is built from the tag of KEYS[1] and the members
--     (docs/architecture.md#keys-built-inside-lua).
--   ARGV (11 + 2 x max_tasks): 1 worker_id, 2 worker_instance_id, 3 lane_id, 4 capability_hash
--     (unused, as in the claim), 5 worker_capabilities_csv, 6 lease_ttl_ms (> 0),
--     7 renew_before_ms (>= 0), 8 max_tasks (> 0), 9 max_scanned (>= max_tasks: due leases and
--     heads examined at most, each), 10 max_reply_bytes (0 = no cap; else the most the rows
--     may cost, a row costing Claim.ROW_BYTES + the bytes of its payload, tags, kind,
--     namespace, flow id, encoding and trace context), 11 tenant_weights (a JSON object namespace -> weight,
--     an integer 1..Bounds.TENANT_WEIGHT; "" = every namespace 1), then max_tasks pairs
--     lease_id, attempt_id (the i-th lease takes the i-th pair).
--   Now: TIME, once.
--   Replies: {1,"OK",claimed,mismatched,reply_bytes,needs_admission}
--     claimed: one array per lease, reclaims first, then in claim order: {execution_id,
--       lease_id, lease_epoch, lease_expires_at, attempt_id, attempt_index, attempt_type
--       (initial | retry | replay | reclaim; a resumed claim gives its attempt's stored type),
--       resumed ("1" | "0"), payload, payload_encoding, execution_kind, namespace, priority,
--       flow_id, tags (flat name/value), trace_context (core trace_context, "" = none:
--       docs/observability.md#traces), claim_wait_ms (now - last_transition_at of an
--       eligible head; "" for a reclaim)}.
--     mismatched: eligible ids that failed the capability check (only core
--       last_capability_mismatch_at written, as by the grant; the caller blocks them for
--       route).
--     reply_bytes: what the claimed rows cost (as counted for max_reply_bytes).
--     needs_admission: eligible, leaseable ids that passed the capability check but carry
--       budget_ids or a quota_policy_id: not leased (nothing written; they do not count
--       against max_tasks), for the caller to take through the cross-slot admission checks
--       (docs/lifecycle.md#admission).
--   Errors (before any write): invalid_input (numeric ARGV, empty ids, pair count,
--     tenant_weights, KEYS not the lane's eligible set and the indexes of its tag),
--     invalid_capabilities (worker side).
--   Skipped, nothing written: heads whose core is missing, that are not eligible, hold a grant,
--     are not leaseable (claim checks), or have invalid required capabilities. Due-lease
--     entries the claimer cannot take are skipped too: a grant outstanding, a capability
--     mismatch (core last_capability_mismatch_at written), or not due after all (a leased
--     entry is re-scored at its lease expiry; an entry whose core is gone, not active or of
--     another lane is removed from the set).
--   Writes per lease: those of ff_claim_execution (or ff_claim_resumed_execution; no DEL of a
--     grant, there is none), or of ff_reclaim_execution for a due lease, including its
--     reclaim-limit path (terminal failed; nothing leased). Each head's payload and tags are
--     read once, for its reply-size cost and its row. With several namespaces: ZADD XX of each namespace examined,
--     at its new virtual time (one whose last head was leased has left the set); a namespace
--     whose sub-index is found empty leaves the set.
local CLAIM_BATCH_ARGV = {
  {6, 'lease_ttl_ms', 'int', min = 1, max = Bounds.LEASE_TTL_MS},
  {7, 'renew_before_ms', 'int', min = 0, max = Bounds.LEASE_TTL_MS},
  {8, 'max_tasks', 'int', min = 1},
  {9, 'max_scanned', 'int'},
  {10, 'max_reply_bytes', 'int', min = 0, max = Bounds.REPLY_BYTES},
}

local FIRST_PAIR = 12

local function claim_batch_args(keys, argv)
  local a, e = Argv.parse(argv, CLAIM_BATCH_ARGV)
  if not a then
    return nil, e
  end
  local ttl, renew_before, max, scan = a.lease_ttl_ms, a.renew_before_ms, a.max_tasks,
    a.max_scanned
  if scan < max then
    return nil, Reply.err('invalid_input', 'max_scanned must be at least max_tasks')
  elseif #argv ~= FIRST_PAIR - 1 + 2 * max then
    return nil, Reply.err('invalid_input', 'expected max_tasks pairs of lease_id, attempt_id')
  end
  -- The ids: the claimer's, then one lease_id, attempt_id pair per task.
  local ids = {{1, 'worker_id', 'str'}, {2, 'worker_instance_id', 'str'}, {3, 'lane_id', 'str'}}
  for i = FIRST_PAIR, #argv do
    ids[#ids + 1] = {i, ((i - FIRST_PAIR) % 2 == 0) and 'lease_id' or 'attempt_id', 'str'}
  end
  local _, serr = Argv.parse(argv, ids)
  if serr then
    return nil, serr
  end
  local tag = Util.tag_of(keys[1] or '')
  if not tag or keys[1] ~= Keys.lane(tag, argv[3], 'eligible')
      or keys[2] ~= Keys.partition(tag, 'lease_expiry')
      or keys[3] ~= Keys.partition(tag, 'attempt_timeout')
      or keys[4] ~= Keys.partition(tag, 'execution_deadline') then
    return nil, Reply.err('invalid_input', 'KEYS must be the lane eligible set and the partition '
      .. 'lease_expiry, attempt_timeout, execution_deadline of one tag')
  end
  -- The worker side of the capability check once, before any write (no required tokens here).
  local cerr = Caps.check({core = {}}, argv[5] or '', 0)
  if cerr then
    return nil, cerr
  end
  local weights, werr = Eligible.weights(argv[11])
  if not weights then
    return nil, Reply.err('invalid_input', werr)
  end
  local room = a.max_reply_bytes
  if room == 0 then
    room = math.huge
  end
  return {tag = tag, ttl = ttl, renew_before = renew_before, max = max, scan = scan,
    room = room, weights = weights}
end

-- What the worker needs of one lease (the ff_claim_batch `claimed` row); the payload and tags
-- as row_cost read them. `waited` is how long the head had been eligible ('' for a reclaim):
-- the claim-wait metric (docs/observability.md).
local function claimed_row(x, a, attempt_type, resumed, waited)
  local c = x.core
  return {x.eid, a.lease_id, Util.num(a.epoch), Util.num(a.expires), a.attempt_id, Util.num(a.idx),
    attempt_type, resumed and '1' or '0', x.row_payload, c.payload_encoding or '',
    c.execution_kind or '', c.namespace or '', c.priority or '0', c.flow_id or '', x.row_tags,
    c.trace_context or '', waited or ''}
end

-- Fixed cost of one claimed row on top of its variable fields: ids, numbers and the framing
-- of the row and of the task message the server makes of it (docs/lifecycle.md#claim-reply-size).
local ROW_BYTES = 512

-- What the row of execution x would cost, read before any write: reads the payload and tags
-- once, for the row too (x.row_payload, x.row_tags).
local function row_cost(x)
  local c = x.core
  x.row_payload = redis.call('GET', Keys.exec(x.tag, x.eid, 'payload')) or ''
  x.row_tags = redis.call('HGETALL', Keys.exec(x.tag, x.eid, 'tags'))
  local n = ROW_BYTES + #x.row_payload
    + #(c.payload_encoding or '') + #(c.execution_kind or '') + #(c.namespace or '')
    + #(c.flow_id or '') + #(c.trace_context or '')
  for _, v in ipairs(x.row_tags) do
    n = n + #v
  end
  return n
end

local function load_head(tag, eid)
  local x = {tag = tag, eid = eid, core_key = Keys.exec(tag, eid, 'core')}
  x.core = Util.hgetall(x.core_key)
  return x
end

-- One due-lease entry of ff_claim_batch: the claimed row and its cost, 'full' (would not fit
-- in `room`), or nil (skipped).
local function reclaim_head(eid, b, argv, pair, room, now)
  local tag, active = b.tag, b.active
  local x = load_head(tag, eid)
  local c = x.core
  if next(c) == nil or c.lifecycle_phase ~= 'active' or c.lane_id ~= argv[3] then
    redis.call('ZREM', active, eid)
    return nil
  end
  x.history = Keys.exec(tag, eid, 'lease:history')
  if not Reclaim.due(x, now) then
    local exp = tonumber(c.lease_expires_at or '')
    if c.ownership_state == 'leased' and exp then
      redis.call('ZADD', active, Util.num(exp), eid)
    end
    return nil
  end
  local grant = Keys.exec(tag, eid, 'claim_grant')
  if redis.call('EXISTS', grant) == 1 or Caps.check(x, argv[5] or '', now) then
    return nil
  end
  x.lease_expiry, x.attempt_timeout, x.deadline = b.keys[2], b.keys[3], b.keys[4]
  local policy = Policy.stored(x)
  if Reclaim.at_limit(x, policy) then
    Reclaim.fail_at_limit(x, now)
    return nil
  end
  local cost = row_cost(x)
  if cost > room then
    return 'full'
  end
  local a = Reclaim.take(x, {worker_id = argv[1], worker_instance_id = argv[2], lane = argv[3],
    lease_id = argv[pair], attempt_id = argv[pair + 1], ttl = b.ttl, policy = {}}, policy, grant,
    now)
  return claimed_row(x, a, 'reclaim', false), cost
end

-- One eligible head of ff_claim_batch: the claimed row and its cost, 'mismatch', 'admission'
-- (budgets or a quota attached: the caller admits it, unless `admitted`: ff_claim_admitted),
-- 'full' (would not fit in `room`), or nil (skipped).
local function claim_head(eid, b, argv, pair, room, now, admitted)
  local tag = b.tag
  local x = load_head(tag, eid)
  if next(x.core) == nil then
    return nil
  end
  -- eligible since its last transition (create, promote, unblock, resume): read before the claim
  local waited = Util.num(math.max(now - (tonumber(x.core.last_transition_at or '') or now), 0))
  local k = {grant = Keys.exec(tag, eid, 'claim_grant'),
    history = Keys.exec(tag, eid, 'lease:history'), lease_expiry = b.keys[2],
    attempt_timeout = b.keys[3], deadline = b.keys[4]}
  local gerr = grant_denied(x, k.grant, argv[5] or '', now,
    b.listed and not admitted and x.core.lane_id == argv[3])
  if gerr then
    return gerr[2] == 'capability_mismatch' and 'mismatch' or nil
  end
  k.grant = false  -- none outstanding (grant_denied): nothing to delete
  local p = {worker_id = argv[1], worker_instance_id = argv[2], lane = argv[3],
    lease_id = argv[pair], attempt_id = argv[pair + 1], ttl = b.ttl,
    renew_before = b.renew_before, timeout = false, deadline = false, policy = {},
    remaining = false}
  local cerr = claimable(x.core)
  if cerr ~= nil and cerr[2] ~= 'use_claim_resumed_execution' then
    return nil
  end
  if not admitted and (Util.is_set(x.core.budget_ids) or Util.is_set(x.core.quota_policy_id)) then
    return 'admission'
  end
  local cost = row_cost(x)
  if cost > room then
    return 'full'
  end
  if cerr == nil then
    local a = claim_new_attempt(x, k, p, now)
    return claimed_row(x, a, a.attempt_type, false, waited), cost
  end
  local a = claim_same_attempt(x, k, p, now)
  local stored = redis.call('HGET', Keys.attempt(tag, eid, a.idx), 'attempt_type')
  return claimed_row(x, a, stored or 'initial', true, waited), cost
end

-- Examines one head (a due lease or an eligible head) with `take` and files the outcome in
-- `st` (claimed, mismatched, admit, used, full). Returns true when it leased.
local function examine(st, take, eid, b, argv, now)
  local got, cost = take(eid, b, argv, FIRST_PAIR + 2 * #st.claimed, b.room - st.used, now)
  if got == 'full' then
    st.full = true
  elseif got == 'mismatch' then
    st.mismatched[#st.mismatched + 1] = eid
  elseif got == 'admission' then
    st.admit[#st.admit + 1] = eid
  elseif got then
    st.claimed[#st.claimed + 1] = got
    st.used = st.used + cost
    return true
  end
  return false
end

-- Each of `ids` in order, until max_tasks leases or a row that does not fit.
local function examine_all(st, take, ids, b, argv, now)
  for _, eid in ipairs(ids) do
    if #st.claimed >= b.max or st.full then
      return
    end
    examine(st, take, eid, b, argv, now)
  end
end

-- Namespaces a claim call weighs at most, and sub-index heads read per fetch.
local FAIR_NAMESPACES = 64
local FAIR_CHUNK = 8

-- The next unexamined head of namespace t, or nil. Leased heads leave the sub-index and every
-- other examined head stays, so the next one sits at offset t.kept.
local function next_head(b, lane, t)
  if t.pos > #t.heads then
    t.heads = redis.call('ZRANGE', Eligible.ns_key(b.tag, lane, t.name), t.kept,
      t.kept + FAIR_CHUNK - 1)
    t.pos = 1
    if #t.heads == 0 then
      return nil
    end
  end
  t.pos = t.pos + 1
  return t.heads[t.pos - 1]
end

-- The not yet exhausted namespace of lowest virtual time (the first on ties), or nil.
local function lowest(nss)
  local best
  for _, t in ipairs(nss) do
    if not t.done and (best == nil or t.vt < best.vt) then
      best = t
    end
  end
  return best
end

-- The eligible heads across namespaces (docs/lifecycle.md#tenant-fairness), `raw` being the
-- namespace set's first entries with their virtual times.
local function examine_fair(st, raw, b, argv, now)
  local lane, set = argv[3], Eligible.namespaces_key(b.tag, argv[3])
  local nss = {}
  for i = 1, #raw, 2 do
    local vt = tonumber(raw[i + 1]) or 0
    nss[#nss + 1] = {name = raw[i], vt = vt, start = vt, step = Eligible.step(b.weights, raw[i]),
      kept = 0, heads = {}, pos = 1}
  end
  local examined = 0
  while examined < b.scan and #st.claimed < b.max and not st.full do
    local t = lowest(nss)
    if not t then
      break
    end
    local eid = next_head(b, lane, t)
    if not eid then
      t.done = true
      if t.vt == t.start then
        redis.call('ZREM', set, t.name)  -- listed with no eligible work: out of step, dropped
      end
    else
      local leased = examine(st, claim_head, eid, b, argv, now)
      if not st.full then  -- a head that did not fit ends the call and is not charged
        examined = examined + 1
        t.vt = t.vt + t.step
        t.kept = t.kept + (leased and 0 or 1)
      end
    end
  end
  for _, t in ipairs(nss) do
    if t.vt ~= t.start then
      -- XX: a namespace whose last eligible head was leased has left the set
      redis.call('ZADD', set, 'XX', Util.num(t.vt), t.name)
    end
  end
end

local function claim_batch(keys, argv)
  local b, aerr = claim_batch_args(keys, argv)
  if not b then
    return aerr
  end
  b.keys = keys
  b.active = Keys.lane(b.tag, argv[3], 'active')
  local now = Util.now_ms()
  local st = {claimed = {}, mismatched = {}, admit = {}, used = 0, full = false}
  -- Due leases first, then the eligible heads; each stops at max_tasks or a row that does
  -- not fit.
  examine_all(st, reclaim_head,
    redis.call('ZRANGEBYSCORE', b.active, '-inf', now, 'LIMIT', 0, b.scan), b, argv, now)
  if #st.claimed < b.max and not st.full then
    local raw = redis.call('ZRANGE', Eligible.namespaces_key(b.tag, argv[3]), 0,
      FAIR_NAMESPACES - 1, 'WITHSCORES')
    if #raw > 2 then
      examine_fair(st, raw, b, argv, now)
    else
      b.listed = true  -- the heads come from the eligible set itself
      examine_all(st, claim_head, redis.call('ZRANGE', keys[1], 0, b.scan - 1), b, argv, now)
    end
  end
  return Reply.ok(st.claimed, st.mismatched, Util.num(st.used), st.admit)
end

redis.register_function('ff_claim_batch', claim_batch)

-- The second half of an admitted claim (docs/lifecycle.md#admission): the heads ff_claim_batch
-- reported as needs_admission that the server's checks then admitted, leased in one call, each
-- exactly as ff_claim_batch leases a head (the grant checks, the claim checks, the claim
-- writes), in the order given.
--
-- ff_claim_admitted
--   KEYS (4): as ff_claim_batch.
--   ARGV (8 + 3 x n): 1 worker_id, 2 worker_instance_id, 3 lane_id, 4 capability_hash (unused),
--     5 worker_capabilities_csv, 6 lease_ttl_ms (> 0), 7 renew_before_ms (>= 0),
--     8 max_reply_bytes (0 = no cap), then n >= 1 triples execution_id, lease_id, attempt_id.
--   Now: TIME, once.
--   Replies: {1,"OK",claimed,refused,reply_bytes}
--     claimed: ff_claim_batch rows, in the order given.
--     refused: flat execution_id, why pairs for every id not leased: 'mismatch' (a capability
--       mismatch; core last_capability_mismatch_at written), 'full' (its row, or an earlier
--       one, did not fit max_reply_bytes: the call leases nothing after it) or 'skipped'
--       (core missing, not eligible, a grant outstanding, not leaseable).
--   Errors (before any write): invalid_input (as ff_claim_batch; the triple count),
--     invalid_capabilities (worker side).
--   Writes per lease: those of ff_claim_execution (or ff_claim_resumed_execution).
local CLAIM_ADMITTED_ARGV = {
  {6, 'lease_ttl_ms', 'int', min = 1, max = Bounds.LEASE_TTL_MS},
  {7, 'renew_before_ms', 'int', min = 0, max = Bounds.LEASE_TTL_MS},
  {8, 'max_reply_bytes', 'int', min = 0, max = Bounds.REPLY_BYTES},
}
local FIRST_TRIPLE = 9

local function claim_admitted(keys, argv)
  local a, e = Argv.parse(argv, CLAIM_ADMITTED_ARGV)
  if not a then
    return e
  end
  local n = (#argv - FIRST_TRIPLE + 1) / 3
  if n < 1 or n ~= math.floor(n) then
    return Reply.err('invalid_input', 'expected triples of execution_id, lease_id, attempt_id')
  end
  local ids = {{1, 'worker_id', 'str'}, {2, 'worker_instance_id', 'str'}, {3, 'lane_id', 'str'}}
  for i = FIRST_TRIPLE, #argv do
    ids[#ids + 1] = {i, ({'execution_id', 'lease_id', 'attempt_id'})[(i - FIRST_TRIPLE) % 3 + 1],
      'str'}
  end
  local _, serr = Argv.parse(argv, ids)
  if serr then
    return serr
  end
  local tag = Util.tag_of(keys[1] or '')
  if not tag or keys[1] ~= Keys.lane(tag, argv[3], 'eligible')
      or keys[2] ~= Keys.partition(tag, 'lease_expiry')
      or keys[3] ~= Keys.partition(tag, 'attempt_timeout')
      or keys[4] ~= Keys.partition(tag, 'execution_deadline') then
    return Reply.err('invalid_input', 'KEYS must be the lane eligible set and the partition '
      .. 'lease_expiry, attempt_timeout, execution_deadline of one tag')
  end
  local cerr = Caps.check({core = {}}, argv[5] or '', 0)
  if cerr then
    return cerr
  end
  local room = a.max_reply_bytes
  if room == 0 then
    room = math.huge
  end
  local b = {tag = tag, ttl = a.lease_ttl_ms, renew_before = a.renew_before_ms, keys = keys}
  local now = Util.now_ms()
  local claimed, refused, used, full = {}, {}, 0, false
  for t = FIRST_TRIPLE, #argv, 3 do
    local eid = argv[t]
    local got, cost
    if not full then
      got, cost = claim_head(eid, b, argv, t + 1, room - used, now, true)
      full = got == 'full'
    end
    if full then
      refused[#refused + 1], refused[#refused + 2] = eid, 'full'
    elseif got == 'mismatch' then
      refused[#refused + 1], refused[#refused + 2] = eid, 'mismatch'
    elseif got then
      claimed[#claimed + 1] = got
      used = used + cost
    else
      refused[#refused + 1], refused[#refused + 2] = eid, 'skipped'
    end
  end
  return Reply.ok(claimed, refused, Util.num(used))
end

redis.register_function('ff_claim_admitted', claim_admitted)

-- ff_promote_delayed (delayed promoter)
--   KEYS (3): 1 core, 2 lane delayed (the set being scanned; cleaned when the core says the
--     entry is stale), 3 lane eligible (*: built from core.lane_id).
--   ARGV (2): 1 execution_id, 2 now_ms (the scanner's server-time reading; used as "now").
--   Now: ARGV[2].
--   Replies: {1,"OK",status}, status: promoted | not_yet_due | not_found_cleaned |
--     not_runnable_cleaned | not_delayed_cleaned (the *_cleaned ones ZREM KEYS[2]).
--   Errors: invalid_input (now_ms).
--   Writes (promoted): core promoted vector (eligible_now / waiting_for_worker, attempt_state
--     kept), delay_until=""; ZREM lane delayed; ZADD lane eligible at
--     -(priority x 10^12) + created_at.
local PROMOTE_ARGV = {{2, 'now_ms', 'int'}}

local function promote_delayed(keys, argv)
  local a, e1 = Argv.parse(argv, PROMOTE_ARGV)
  if not a then
    return e1
  end
  local now = a.now_ms
  local x = State.load_exec(keys, argv)
  if not x then
    redis.call('ZREM', keys[2], argv[1])
    return Reply.ok('not_found_cleaned')
  end
  local c = x.core
  if c.lifecycle_phase ~= 'runnable' then
    redis.call('ZREM', keys[2], x.eid)
    return Reply.ok('not_runnable_cleaned')
  elseif c.eligibility_state ~= 'not_eligible_until_time' then
    redis.call('ZREM', keys[2], x.eid)
    return Reply.ok('not_delayed_cleaned')
  end
  local due = tonumber(c.delay_until or '')
  if due and due > now then
    return Reply.ok('not_yet_due')
  end
  State.write_vector(keys[1], x.eid, {'runnable', 'unowned', 'eligible_now', 'waiting_for_worker', '',
    'none', c.attempt_state or 'pending_first_attempt'}, now, {delay_until = ''})
  -- Lane indexes built from core.lane_id on the tag of KEYS[1]
  -- (docs/architecture.md#keys-built-inside-lua).
  redis.call('ZREM', Keys.lane(x.tag, c.lane_id, 'delayed'), x.eid)
  local score = State.eligible_score(tonumber(c.priority or '0') or 0, tonumber(c.created_at or '0') or 0)
  Eligible.add(x.tag, c.lane_id, x.eid, score, c.namespace)
  return Reply.ok('promoted')
end

redis.register_function('ff_promote_delayed', promote_delayed)

-- ff_change_priority
--   KEYS (2): 1 core, 2 lane eligible (*: built from core.lane_id).
--   ARGV (2): 1 execution_id, 2 new_priority (clamped to 0..9000).
--   Now: TIME.
--   Replies: {1,"OK",old_priority,new_priority}
--   Errors: invalid_input (new_priority), execution_not_found, execution_not_eligible (only a
--     runnable eligible_now execution can be re-prioritised in v1).
--   Writes: core priority, last_mutation_at; ZADD lane eligible at -(p x 10^12) + created_at.
local PRIORITY_ARGV = {{2, 'new_priority', 'int'}}

local function change_priority(keys, argv)
  local a, e1 = Argv.parse(argv, PRIORITY_ARGV)
  if not a then
    return e1
  end
  local p = a.new_priority
  local x = State.load_exec(keys, argv)
  if not x then
    return Reply.err('execution_not_found')
  end
  local c = x.core
  if c.lifecycle_phase ~= 'runnable' or c.eligibility_state ~= 'eligible_now' then
    return Reply.err('execution_not_eligible')
  end
  p = State.clamp_priority(p)
  redis.call('HSET', keys[1], 'priority', Util.num(p), 'last_mutation_at', Util.num(Util.now_ms()))
  -- Lane index built from core.lane_id on the tag of KEYS[1]
  -- (docs/architecture.md#keys-built-inside-lua).
  local score = State.eligible_score(p, tonumber(c.created_at or '0') or 0)
  Eligible.add(x.tag, c.lane_id, x.eid, score, c.namespace)
  return Reply.ok(c.priority or '0', Util.num(p))
end

redis.register_function('ff_change_priority', change_priority)
