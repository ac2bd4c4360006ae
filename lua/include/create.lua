-- uses: reply, util, bounds, keys, state, eligible, policy, capabilities

local Create = {}

-- Creating one execution (docs/lifecycle.md#create): shared by ff_create_execution and
-- ff_submit_flow, which creates a whole DAG's members in one call (docs/flows.md#submitflow).

-- Every exec_core field of docs/architecture.md#key-schema that create initialises to "" (unset).
Create.CORE_EMPTY_FIELDS = {
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

Create.DEFAULT_DEDUP_WINDOW_MS = 86400000

-- Validates the policy JSON against its schema (include/policy.lua) and returns (policy table or
-- false, required-capabilities CSV) or nil plus an error reply.
function Create.parse_policy(policy_json)
  if policy_json == '' or policy_json == '{}' then
    return false, ''
  end
  local policy = Util.decode_json(policy_json)
  if type(policy) ~= 'table' then
    return nil, nil, Reply.err('invalid_policy_json', 'malformed')
  end
  local serr = Policy.check(policy, Policy.EXECUTION_SCHEMA)
  if serr then
    return nil, nil, serr
  end
  local routing = policy.routing_requirements
  if routing == nil or routing == cjson.null then
    return policy, ''
  end
  local caps = routing.required_capabilities
  if caps == nil or caps == cjson.null then
    return policy, ''
  end
  local csv, cerr = Caps.csv('required', caps)
  if not csv then
    return nil, nil, cerr
  end
  return policy, csv
end

-- One tag (key rule, sizes); nil or the error reply.
function Create.tag_error(k, v)
  if type(k) ~= 'string' or not State.valid_tag_key(k) then
    return Reply.err('invalid_tag_key', tostring(k))
  elseif #k > Bounds.TAG_KEY_BYTES then
    return Reply.err('invalid_input', 'tag keys must be at most ' .. Bounds.TAG_KEY_BYTES
      .. ' bytes, got: ' .. #k)
  elseif type(v) == 'table' then
    return Reply.err('invalid_input', 'tag values must be scalars: ' .. k)
  elseif #tostring(v) > Bounds.TAG_VALUE_BYTES then
    return Reply.err('invalid_input', 'tag values must be at most ' .. Bounds.TAG_VALUE_BYTES
      .. ' bytes: ' .. k)
  end
  return nil
end

function Create.too_many_tags(n)
  return Reply.err('invalid_input', 'an execution has at most ' .. Bounds.TAGS
    .. ' tags, got: ' .. n)
end

-- Tags: a JSON object (or a decoded table) of string keys (caller namespace rule) to scalar
-- values, at most Bounds.TAGS.
function Create.parse_tags(tags_json)
  if tags_json == '' or tags_json == '{}' then
    return {}
  end
  local tags = tags_json
  if type(tags) == 'string' then
    tags = Util.decode_json(tags_json)
  end
  if type(tags) ~= 'table' then
    return nil, Reply.err('invalid_input', 'tags_json must be a JSON object')
  end
  local n = 0
  for k, v in pairs(tags) do
    n = n + 1
    local terr = Create.tag_error(k, v)
    if terr then
      return nil, terr
    end
  end
  if n > Bounds.TAGS then
    return nil, Create.too_many_tags(n)
  end
  return tags
end

-- A concurrency key (docs/budgets.md#per-key-limits): nil when valid (or unset), else the
-- invalid_input reply. At most Bounds.LABEL_BYTES bytes, no whitespace or control bytes, and
-- only with a quota policy. `who` prefixes the detail (a flow member's key).
function Create.check_concurrency_key(key, quota_policy_id, who)
  if key == nil or key == '' then
    return nil
  end
  local why
  if type(key) ~= 'string' then
    why = 'concurrency_key must be a string'
  elseif #key > Bounds.LABEL_BYTES then
    why = 'concurrency_key must be at most ' .. string.format('%.0f', Bounds.LABEL_BYTES)
      .. ' bytes'
  elseif string.find(key, '[%z\1-\32\127]') then
    why = 'concurrency_key must not contain whitespace or control bytes'
  elseif not Util.is_set(quota_policy_id) then
    why = 'concurrency_key needs a quota_policy_id'
  end
  return why and Reply.err('invalid_input', (who or '') .. why) or nil
end

-- A stored trace context (docs/observability.md#traces): `parent|link <traceparent>[ <tracestate>]`,
-- checked in full at the API edge; here only its size and bytes, so a direct FCALL caller cannot
-- store a huge or binary one. nil when valid (or unset), else the invalid_input reply.
function Create.check_trace_context(v, who)
  if v == nil or v == '' then
    return nil
  end
  if type(v) ~= 'string' or #v > Bounds.TRACE_STATE_BYTES + 64
      or string.find(v, '[%z\1-\31\127-\255]') then
    return Reply.err('invalid_input', (who or '') .. 'trace_context must be at most '
      .. string.format('%.0f', Bounds.TRACE_STATE_BYTES + 64) .. ' printable ASCII bytes')
  end
  return nil
end

function Create.policy_number(policy, section, field)
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

-- Writes one new execution on `tag` (every key built from the tag and the id,
-- docs/architecture.md#keys-built-inside-lua): core, payload, policy, tags, its lane set, the
-- execution_deadline entry, all_executions and the lanes registry. `m` = {eid, namespace,
-- lane, kind, priority, creator, policy (table or false), policy_json, caps_csv, payload,
-- encoding, tags (table), delay_until, deadline (numbers or false), partition,
-- quota_policy_id, concurrency_key, trace_context, flow_id, blocked (start blocked_by_dependencies), quiet (the caller says
-- where work is ready: State.ready)}. Returns public_state.
function Create.write(tag, m, now)
  local eid = m.eid
  local priority = State.clamp_priority(m.priority)
  local deadline = m.deadline
  if not deadline then
    local rel = Create.policy_number(m.policy, 'timeout_policy', 'execution_deadline_ms')
    if rel and rel > 0 then
      deadline = now + math.floor(rel)
    end
  end
  local delayed = not m.blocked and m.delay_until and m.delay_until > now
  local budget_ids = ''
  if m.policy and type(m.policy.budget_ids) == 'table' then
    budget_ids = table.concat(m.policy.budget_ids, ',')
  end
  local extra = {
    execution_id = eid, namespace = m.namespace, lane_id = m.lane, execution_kind = m.kind,
    partition_id = m.partition, priority = priority, creator_identity = m.creator,
    payload_encoding = (Util.is_set(m.encoding) and m.encoding) or 'json',
    total_attempt_count = 0, current_lease_epoch = 0, retry_count = 0, replay_count = 0,
    lease_reclaim_count = 0, current_lane = m.lane, created_at = Util.num(now),
    delay_until = m.delay_until and Util.num(m.delay_until) or '',
  }
  for _, f in ipairs(Create.CORE_EMPTY_FIELDS) do
    extra[f] = ''
  end
  extra.required_capabilities = m.caps_csv
  extra.budget_ids = budget_ids
  extra.quota_policy_id = m.quota_policy_id or ''
  extra.concurrency_key = m.concurrency_key or ''
  extra.trace_context = m.trace_context or ''
  extra.execution_deadline_at = deadline and Util.num(deadline) or ''
  extra.flow_id = m.flow_id or ''
  -- The policy's attempt timeout ("0" = none), so a claim need not read the policy key; the
  -- attempt that last created a stream meta ("" = none yet: include/stream.lua).
  extra.stream_attempt = ''
  extra.policy_attempt_timeout_ms = Util.num(Policy.attempt_timeout_of(m.policy or {}) or 0)

  local vector, set, score
  if m.blocked then
    vector = {'runnable', 'unowned', 'blocked_by_dependencies', 'waiting_for_children',
      'waiting for flow dependencies', 'none', 'pending_first_attempt'}
    set, score = 'blocked:dependencies', now
  elseif delayed then
    vector = {'runnable', 'unowned', 'not_eligible_until_time', 'waiting_for_delay',
      'delayed until ' .. Util.num(m.delay_until), 'none', 'pending_first_attempt'}
    set, score = 'delayed', m.delay_until
  else
    vector = {'runnable', 'unowned', 'eligible_now', 'waiting_for_worker', '', 'none',
      'pending_first_attempt'}
    set, score = 'eligible', State.eligible_score(priority, now)
  end
  -- m.fresh: the caller checked the core does not exist, so there is no previous state to read.
  local snap = nil
  if m.fresh then
    snap = false
  end
  local public = State.write_vector(Keys.exec(tag, eid, 'core'), eid, vector, now, extra, snap)

  -- An empty payload and an empty policy are no key: every reader takes a missing one as
  -- empty (GET nil = '', Policy.stored = {}).
  if m.payload ~= '' then
    redis.call('SET', Keys.exec(tag, eid, 'payload'), m.payload)
  end
  if m.policy_json ~= '' and m.policy_json ~= '{}' then
    redis.call('SET', Keys.exec(tag, eid, 'policy'), m.policy_json)
  end
  if next(m.tags) ~= nil then
    Util.hmset(Keys.exec(tag, eid, 'tags'), m.tags)
  end
  if set == 'eligible' then
    Eligible.add(tag, m.lane, eid, score, m.namespace)
  else
    redis.call('ZADD', Keys.lane(tag, m.lane, set), Util.num(score), eid)
  end
  redis.call('SADD', Keys.partition(tag, 'all_executions'), eid)
  redis.call('SADD', Keys.partition(tag, 'lanes'), m.lane)
  if deadline then
    redis.call('ZADD', Keys.partition(tag, 'execution_deadline'), Util.num(deadline), eid)
  end
  if set == 'eligible' and Util.is_set(m.flow_id) and not m.quiet then
    State.ready(tag, m.lane)
  end
  return public
end
