-- bounds.lua: the upper bound of every duration, TTL, count and size a caller can send
-- (docs/architecture.md#limits).
-- uses: reply
--
-- The values are not written here: library.py appends one `Bounds.<NAME> = <max>` line per row of
-- the one table in server/flowfabric/valkey/bounds.py, which the API edge and the README's
-- Limits table use too. A function refuses a value above its bound with invalid_input in its
-- Argv schema (`max = Bounds.LEASE_TTL_MS`) or its first checks, before any write.

local Bounds = {}

-- An absolute time `at` (ms) more than HORIZON_MS after `now`: the invalid_input reply naming
-- `name`; nil when within the horizon (or unset). Checked before the function's first write.
function Bounds.past_horizon(name, at, now)
  if at and at > now + Bounds.HORIZON_MS then
    return Reply.err('invalid_input', name .. ' must be at most ' .. string.format('%.0f',
      Bounds.HORIZON_MS) .. ' ms after now, got: ' .. string.format('%.0f', at))
  end
  return nil
end
