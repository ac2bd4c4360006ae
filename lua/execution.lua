-- execution.lua: creating executions and caller-owned metadata (spec 10 §2.1, §2.19).

-- Every exec_core field of spec 00 §5.5 that create initialises to "" (unset).
local CORE_EMPTY_FIELDS = {
  'flow_id', 'required_capabilities', 'budget_ids', 'quota_policy_id',
  'current_attempt_index', 'current_attempt_id',
  'current_lease_id', 'current_worker_id', 'current_worker_instance_id',
  'lease_acquired_at', 'lease_expires_at', 'lease_last_renewed_at', 'lease_renewal_deadline',
  'lease_expired_at', 'lease_revoked_at', 'lease_revoke_reason',
  'started_at', 'completed_at',
  'current_suspension_id', 'current_waitpoint_id',
  'pending_retry_reason', 'pending_replay_reason', 'pending_replay_requested_by',
  'pending_previous_attempt_index',
  'progress_pct', 'progress_message', 'progress_updated_at',
  'failure_reason', 'cancellation_reason', 'cancelled_by', 'result_encoding',
  'last_capability_mismatch_at', 'execution_deadline_at',
}

local DEFAULT_DEDUP_WINDOW_MS = 86400000

-- Validates the policy JSON and returns (policy table or false, required-capabilities CSV) or
-- nil plus an error reply.
local function parse_policy(policy_json)
  if policy_json == '' or policy_json == '{}' then
    return false, ''
  end
  local policy = decode_json(policy_json)
  if type(policy) ~= 'table' then
    return nil, nil, err('invalid_policy_json', 'malformed')
  end
  local routing = policy.routing_requirements
  if routing == nil or routing == cjson.null then
    return policy, ''
  end
  if type(routing) ~= 'table' then
    return nil, nil, err('invalid_policy_json', 'routing_requirements:not_object')
  end
  local caps = routing.required_capabilities
  if caps == nil or caps == cjson.null then
    return policy, ''
  end
  local csv, cerr = capabilities_csv('required', caps)
  if not csv then
    return nil, nil, cerr
  end
  return policy, csv
end

-- Tags JSON: an object of string keys (caller namespace rule) to scalar values.
local function parse_tags(tags_json)
  if tags_json == '' or tags_json == '{}' then
    return {}
  end
  local tags = decode_json(tags_json)
  if type(tags) ~= 'table' then
    return nil, err('invalid_input', 'tags_json must be a JSON object')
  end
  for k, v in pairs(tags) do
    if not valid_tag_key(k) then
      return nil, err('invalid_tag_key', tostring(k))
    end
    if type(v) == 'table' then
      return nil, err('invalid_input', 'tag values must be scalars: ' .. k)
    end
  end
  return tags
end

local function policy_number(policy, section, field)
  if not policy then
    return false
  end
  local t = policy
  if section then
    t = policy[section]
    if type(t) ~= 'table' then
      return false
    end
  end
  local v = t[field]
  if type(v) == 'number' then
    return v
  end
  return false
end

-- ff_create_execution
--   KEYS (10): 1 core, 2 payload, 3 policy, 4 tags, 5 lane eligible, 6 lane delayed,
--     7 idempotency key (ff:idem:{p}:<ns>:<key>) or the ff:noop:{p} placeholder,
--     8 execution_deadline index, 9 all_executions, 10 lanes registry (ff:idx:{p}:lanes).
--   ARGV (15): 1 execution_id, 2 namespace, 3 lane_id, 4 execution_kind, 5 priority,
--     6 creator_identity, 7 policy_json ("" or "{}" = none), 8 input_payload (raw bytes),
--     9 delay_until ("" = none), 10 dedup_ttl_ms ("" = policy.dedup_window_ms or 24 h),
--     11 tags_json, 12 execution_deadline_at ("" = policy.timeout_policy.execution_deadline_ms
--     after now, or none), 13 partition_id, 14 payload_encoding ("" = json), 15 quota_policy_id.
--   Now: TIME.
--   Replies: {1,"OK",execution_id,public_state} | {1,"DUPLICATE",existing_execution_id}
--   Errors: invalid_input (numeric ARGV, tags_json), invalid_policy_json (malformed,
--     routing_requirements:not_object), invalid_capabilities (required:<why>), invalid_tag_key.
--   Writes: core, payload, policy, tags, eligible|delayed, execution_deadline, all_executions,
--     lanes, idempotency key (PX ttl); SPUBLISH ff:exec_events:{p} state_changed.
local function create_execution(keys, argv)
  local priority, e1 = req_int('priority', argv[5])
  if not priority then
    return e1
  end
  local delay_until, e2 = opt_int('delay_until', argv[9])
  if e2 then
    return e2
  end
  local dedup_ttl, e3 = opt_int('dedup_ttl_ms', argv[10])
  if e3 then
    return e3
  end
  local deadline, e4 = opt_int('execution_deadline_at', argv[12])
  if e4 then
    return e4
  end
  local partition, e5 = req_int('partition_id', argv[13])
  if not partition then
    return e5
  end

  local eid = argv[1]
  if string.sub(keys[7], 1, 8) == 'ff:idem:' then
    local existing = redis.call('GET', keys[7])
    if existing then
      return {1, 'DUPLICATE', existing}
    end
  end
  if redis.call('EXISTS', keys[1]) == 1 then
    return {1, 'DUPLICATE', eid}
  end

  local policy, caps_csv, perr = parse_policy(argv[7])
  if policy == nil then
    return perr
  end
  local tags, terr = parse_tags(argv[11])
  if not tags then
    return terr
  end

  local now = now_ms()
  priority = clamp_priority(priority)
  if not deadline then
    local rel = policy_number(policy, 'timeout_policy', 'execution_deadline_ms')
    if rel and rel > 0 then
      deadline = now + math.floor(rel)
    end
  end
  local delayed = delay_until and delay_until > now
  local budget_ids = ''
  if policy and type(policy.budget_ids) == 'table' then
    budget_ids = table.concat(policy.budget_ids, ',')
  end

  local extra = {
    execution_id = eid, namespace = argv[2], lane_id = argv[3], execution_kind = argv[4],
    partition_id = partition, priority = priority, creator_identity = argv[6],
    payload_encoding = (argv[14] ~= '' and argv[14]) or 'json',
    total_attempt_count = 0, current_lease_epoch = 0, retry_count = 0, replay_count = 0,
    lease_reclaim_count = 0, current_lane = argv[3], created_at = num(now),
    delay_until = delay_until and num(delay_until) or '',
  }
  for _, f in ipairs(CORE_EMPTY_FIELDS) do
    extra[f] = ''
  end
  extra.required_capabilities = caps_csv
  extra.budget_ids = budget_ids
  extra.quota_policy_id = argv[15]
  extra.execution_deadline_at = deadline and num(deadline) or ''

  local vector
  if delayed then
    vector = {'runnable', 'unowned', 'not_eligible_until_time', 'waiting_for_delay',
      'delayed until ' .. num(delay_until), 'none', 'pending_first_attempt'}
  else
    vector = {'runnable', 'unowned', 'eligible_now', 'waiting_for_worker', '', 'none',
      'pending_first_attempt'}
  end
  local public = write_vector(keys[1], eid, vector, now, extra)

  redis.call('SET', keys[2], argv[8])
  if argv[7] ~= '' then
    redis.call('SET', keys[3], argv[7])
  else
    redis.call('SET', keys[3], '{}')
  end
  if next(tags) ~= nil then
    hmset(keys[4], tags)
  end
  if delayed then
    redis.call('ZADD', keys[6], num(delay_until), eid)
  else
    redis.call('ZADD', keys[5], num(eligible_score(priority, now)), eid)
  end
  redis.call('SADD', keys[9], eid)
  redis.call('SADD', keys[10], argv[3])
  if deadline then
    redis.call('ZADD', keys[8], num(deadline), eid)
  end
  if string.sub(keys[7], 1, 8) == 'ff:idem:' then
    local ttl = dedup_ttl or policy_number(policy, nil, 'dedup_window_ms') or DEFAULT_DEDUP_WINDOW_MS
    if ttl > 0 then
      redis.call('SET', keys[7], eid, 'PX', num(ttl))
    end
  end
  return ok(eid, public)
end

redis.register_function('ff_create_execution', create_execution)

-- ff_set_execution_tags
--   KEYS (2): 1 core, 2 tags.
--   ARGV: k1, v1, k2, v2, ... (non-empty, even length).
--   Now: TIME.
--   Replies: {1,"OK","<pairs written>"}
--   Errors: invalid_input (empty or odd ARGV), execution_not_found, invalid_tag_key (detail = key;
--     nothing written).
--   Writes: tags (HSET), core last_mutation_at.
local function set_execution_tags(keys, argv)
  if #argv == 0 or #argv % 2 == 1 then
    return err('invalid_input', 'tags must be non-empty even-length key/value pairs')
  end
  if redis.call('EXISTS', keys[1]) == 0 then
    return err('execution_not_found')
  end
  for i = 1, #argv, 2 do
    if not valid_tag_key(argv[i]) then
      return err('invalid_tag_key', argv[i])
    end
  end
  redis.call('HSET', keys[2], unpack(argv))
  redis.call('HSET', keys[1], 'last_mutation_at', num(now_ms()))
  return ok(tostring(#argv / 2))
end

redis.register_function('ff_set_execution_tags', set_execution_tags)
