-- probe.lua: the scanners' node-wide probe (docs/architecture.md#scanners). One call answers
-- which partitions of one Valkey node hold work for one scanner, so an idle scanner cycle costs
-- one round trip per primary instead of a pipeline of reads per partition (and lane).
--
-- The one function that touches keys of many partitions (many hash tags): it reads only, and
-- every key it builds lives on the node it runs on (the caller groups partitions by node).
--
-- uses: keys

-- Does `key` hold work: any member at all (`any`), or one scored at most `upper` (`due`)?
local function has_work(key, test, upper)
  if test == 'any' then
    return redis.call('EXISTS', key) == 1
  end
  return redis.call('ZCOUNT', key, '-inf', upper) > 0
end

-- ff_probe_due
--   KEYS (1): 1 route (*) (ff:noop:{p} of a partition on the node: routes the call).
--   ARGV (5+n): 1 test (`due`: a member scored <= upper; `any`: any member), 2 upper (a score,
--     ignored for `any`), 3 index (a per-partition index name such as `lease_expiry`, or with
--     per_lane a lane set such as `delayed`), 4 per_lane ("1" or ""), 5 tag_count, then
--     tag_count partition tags, all on this node, then the configured lanes.
--   Reply: a flat array {position, lane, position, lane, ...}: the 1-based position among the
--     tags of each partition whose index holds work, and the lane ("" without per_lane), in tag
--     order. Per lane, the lanes probed are the configured lanes, then the other lanes of the
--     partition's lane registry (ff:idx:{p}:lanes).
--   Errors: none.  Flags: no-writes, allow-cross-slot-keys (call with FCALL_RO).
--   (*) every key read is built from the tags in ARGV: a key of another slot of this node, which
--   the allow-cross-slot-keys flag permits; Valkey refuses a key of another node.
redis.register_function {
  function_name = 'ff_probe_due',
  callback = function(_keys, argv)
    local test, upper, index, per_lane = argv[1], argv[2], argv[3], argv[4] == '1'
    local count = tonumber(argv[5]) or 0
    local out = {}
    local configured, is_configured = {}, {}
    for j = 6 + count, #argv do
      if not is_configured[argv[j]] then
        is_configured[argv[j]] = true
        configured[#configured + 1] = argv[j]
      end
    end
    local function probe(i, key, lane)
      if has_work(key, test, upper) then
        out[#out + 1] = i
        out[#out + 1] = lane
      end
    end
    for i = 1, count do
      local tag = argv[5 + i]
      if not per_lane then
        probe(i, Keys.partition(tag, index), '')
      else
        for _, lane in ipairs(configured) do
          probe(i, Keys.lane(tag, lane, index), lane)
        end
        for _, lane in ipairs(redis.call('SMEMBERS', Keys.partition(tag, 'lanes'))) do
          if not is_configured[lane] then
            probe(i, Keys.lane(tag, lane, index), lane)
          end
        end
      end
    end
    return out
  end,
  flags = {'no-writes', 'allow-cross-slot-keys'},
}
