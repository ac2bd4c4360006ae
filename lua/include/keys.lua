-- uses: (none)

local Keys = {}

-- Per-execution and per-lane key builders, all on the tag of the caller's first key.
function Keys.exec(tag, eid, suffix)
  return 'ff:exec:' .. tag .. ':' .. eid .. ':' .. suffix
end

function Keys.lane(tag, lane, which)
  return 'ff:idx:' .. tag .. ':lane:' .. lane .. ':' .. which
end

function Keys.attempt(tag, eid, idx)
  return 'ff:attempt:' .. tag .. ':' .. eid .. ':' .. idx
end

function Keys.stream_meta(tag, eid, idx)
  return 'ff:stream:' .. tag .. ':' .. eid .. ':' .. idx .. ':meta'
end

function Keys.partition(tag, name)
  return 'ff:idx:' .. tag .. ':' .. name
end

function Keys.worker_leases(tag, wiid)
  return 'ff:idx:' .. tag .. ':worker:' .. wiid .. ':leases'
end

function Keys.waitpoint(tag, wpid)
  return 'ff:wp:' .. tag .. ':' .. wpid
end

-- Flow keys (docs/flows.md#keys): ff:flow:{p}:<fid>:<suffix>, on the flow's partition tag.
function Keys.flow(tag, fid, suffix)
  return 'ff:flow:' .. tag .. ':' .. fid .. ':' .. suffix
end

-- Every scheduling set of a lane and every per-partition timeout/lease index
-- (docs/architecture.md#key-schema).
Keys.LANE_SETS = {
  'eligible', 'delayed', 'active', 'suspended', 'terminal', 'blocked:dependencies',
  'blocked:budget', 'blocked:quota', 'blocked:route', 'blocked:operator',
}
Keys.PARTITION_SETS = {'lease_expiry', 'attempt_timeout', 'execution_deadline',
  'suspension_timeout'}
