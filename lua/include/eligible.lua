-- uses: util, bounds, keys

local Eligible = {}

-- A lane's eligible set on one partition and its namespace side indexes, kept in step by these
-- helpers only (docs/lifecycle.md#tenant-fairness):
--   ff:idx:{p}:lane:<lane>:eligible                 every eligible id (what probes and counts read)
--   ff:idx:{p}:lane:<lane>:eligible:ns:<namespace>  the namespace's eligible ids, same scores
--   ff:idx:{p}:lane:<lane>:eligible:namespaces      the namespaces with eligible work, each
--                                                   scored by its virtual time
-- Every key is built on the tag of the caller's KEYS[1] (docs/architecture.md#keys-built-inside-lua).

-- One claim of a namespace of weight w advances its virtual time by floor(UNIT / w).
Eligible.UNIT = 1000000

function Eligible.ns_key(tag, lane, ns)
  return Keys.lane(tag, lane, 'eligible:ns:' .. (ns or ''))
end

function Eligible.namespaces_key(tag, lane)
  return Keys.lane(tag, lane, 'eligible:namespaces')
end

-- A namespace that had no eligible work joins at the lowest virtual time of those that have
-- (0 when none): it neither catches up on a share it did not use nor waits behind the others.
function Eligible.join(tag, lane, ns)
  local set = Eligible.namespaces_key(tag, lane)
  if not redis.call('ZSCORE', set, ns) then
    local low = redis.call('ZRANGE', set, 0, 0, 'WITHSCORES')
    redis.call('ZADD', set, low[2] or '0', ns)
  end
end

-- eid into the lane's eligible set and its namespace's sub-index at `score` (a re-score when
-- already there: priority changes).
function Eligible.add(tag, lane, eid, score, ns)
  ns = ns or ''
  local s = Util.num(score)
  redis.call('ZADD', Keys.lane(tag, lane, 'eligible'), s, eid)
  redis.call('ZADD', Eligible.ns_key(tag, lane, ns), s, eid)
  Eligible.join(tag, lane, ns)
end

-- eid out of the lane's eligible set and its namespace's sub-index; the namespace leaves the
-- namespace set with its last eligible id. A no-op for an id that is not eligible.
function Eligible.remove(tag, lane, eid, ns)
  ns = ns or ''
  redis.call('ZREM', Keys.lane(tag, lane, 'eligible'), eid)
  local sub = Eligible.ns_key(tag, lane, ns)
  if redis.call('ZREM', sub, eid) == 1 and redis.call('EXISTS', sub) == 0 then
    redis.call('ZREM', Eligible.namespaces_key(tag, lane), ns)
  end
end

-- Brings the namespace side of one execution in step with the eligible set (the index
-- reconciler and the repair sweep): in the sub-index at the eligible set's score and its
-- namespace in the namespace set exactly when it is in the eligible set. Returns true when it
-- wrote something.
function Eligible.reconcile(tag, lane, eid, ns)
  ns = ns or ''
  local score = redis.call('ZSCORE', Keys.lane(tag, lane, 'eligible'), eid)
  local sub = Eligible.ns_key(tag, lane, ns)
  local have = redis.call('ZSCORE', sub, eid)
  if score then
    local joined = redis.call('ZSCORE', Eligible.namespaces_key(tag, lane), ns)
    if have == score and joined then
      return false
    end
    redis.call('ZADD', sub, score, eid)
    Eligible.join(tag, lane, ns)
    return true
  elseif have then
    Eligible.remove(tag, lane, eid, ns)
    return true
  end
  return false
end

-- The weight of each namespace from the claim's ARGV: a JSON object namespace -> integer
-- 1..Bounds.TENANT_WEIGHT ("" = every namespace 1). Returns the table or nil, reason.
function Eligible.weights(raw)
  if not Util.is_set(raw) then
    return {}
  end
  local w = Util.decode_json(raw)
  if type(w) ~= 'table' then
    return nil, 'tenant_weights must be a JSON object'
  end
  for k, v in pairs(w) do
    if type(k) ~= 'string' or type(v) ~= 'number' or v ~= math.floor(v) or v < 1
        or v > Bounds.TENANT_WEIGHT then
      return nil, 'tenant_weights: each weight must be an integer 1..'
        .. Util.num(Bounds.TENANT_WEIGHT)
    end
  end
  return w
end

-- How far one claim advances namespace `ns`'s virtual time.
function Eligible.step(weights, ns)
  return math.floor(Eligible.UNIT / (weights[ns] or 1))
end
