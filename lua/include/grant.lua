-- uses: reply, util

local Grant = {}

-- Writes the claim grant hash (docs/architecture.md#key-schema) and expires the key at
-- grant_expires_at. `argv` is
-- the grant-issuer layout: 2 worker_id, 3 worker_instance_id, 4 lane_id, 5 capability_hash,
-- 7 route_snapshot_json, 8 admission_summary.
function Grant.write(key, argv, now, ttl)
  local expires = now + ttl
  redis.call('HSET', key, 'worker_id', argv[2], 'worker_instance_id', argv[3],
    'lane_id', argv[4], 'capability_hash', argv[5], 'route_snapshot_json', argv[7],
    'admission_summary', argv[8], 'created_at', Util.num(now), 'grant_expires_at', Util.num(expires))
  redis.call('PEXPIREAT', key, Util.num(expires))
  return expires
end

-- A grant is consumable by `worker_id` until grant_expires_at. Returns nil or the error reply.
function Grant.check(key, worker_id, now)
  local g = Util.hgetall(key)
  if g.worker_id == nil or g.worker_id ~= worker_id then
    return Reply.err('invalid_claim_grant')
  end
  local exp = tonumber(g.grant_expires_at or '')
  if exp and exp < now then
    return Reply.err('claim_grant_expired')
  end
  return nil
end
