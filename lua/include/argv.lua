-- argv.lua: declarative ARGV validation.
-- uses: reply
--
-- A function states the ARGV it validates as a schema, a list of fields checked in list order
-- (the order decides which error a call with several bad fields gets):
--
--   local RENEW_ARGV = {
--     {6, 'lease_ttl_ms', 'int', min = 1},
--     {7, 'lease_history_grace_ms', 'int', min = 0},
--     {5, 'lease_epoch', 'int?'},
--   }
--   local a, e = Argv.parse(argv, RENEW_ARGV)
--   if not a then return e end
--   -- a.lease_ttl_ms, a.lease_history_grace_ms, a.lease_epoch (false when unset)
--
-- A field is {position, name, type, options}. Types:
--   'int'  a decimal integer (optional leading '-'): "<name> must be a number, got: <raw>".
--   'int?' as 'int', but "" (or absent) is unset: the value is `default`, else false.
--   'str'  a non-empty string: "<name> must not be empty". The value is the string.
-- Options of the integer types, checked only on a value that was given:
--   min, max  bounds, inclusive: "<name> must <says>, got: <raw>"; `says` defaults to
--             "be positive" (min 1), "not be negative" (min 0), "be >= <min>", or
--             "be <min>..<max>" when both are set.
--   says      the wording of the bound, when the default is not the one the contract promises.
--   default   the value of an unset 'int?'.
-- Every failure is the reply {0, "invalid_input", detail}; nothing is read or written, so a
-- function parses its ARGV before its first read.

local Argv = {}

function Argv.is_int(s)
  return type(s) == 'string' and string.match(s, '^%-?%d+$') ~= nil
end

-- Private to this include (one top-level local per include).
do
  local function bound_words(f)
    if f.says then
      return f.says
    elseif f.min and f.max then
      return 'be ' .. f.min .. '..' .. f.max
    elseif f.min == 1 then
      return 'be positive'
    elseif f.min == 0 then
      return 'not be negative'
    elseif f.min then
      return 'be >= ' .. f.min
    end
    return 'be <= ' .. f.max
  end

  -- One field: its value, or nil plus the detail of the invalid_input reply.
  local function field_value(f, raw)
    local kind, name = f[3], f[2]
    if kind == 'str' then
      if raw == nil or raw == '' then
        return nil, name .. ' must not be empty'
      end
      return raw, nil
    end
    if kind == 'int?' and (raw == nil or raw == '') then
      if f.default ~= nil then
        return f.default, nil
      end
      return false, nil
    end
    if kind ~= 'int' and kind ~= 'int?' then
      error({err = 'ERR flowfabric: unknown ARGV field type ' .. tostring(kind)})
    end
    if not Argv.is_int(raw) then
      return nil, name .. ' must be a number, got: ' .. tostring(raw)
    end
    local n = tonumber(raw)
    if (f.min and n < f.min) or (f.max and n > f.max) then
      return nil, name .. ' must ' .. bound_words(f) .. ', got: ' .. raw
    end
    return n, nil
  end

  -- Checks `argv` against `schema` in list order. Returns a table of the values by field name, or
  -- nil plus the invalid_input reply of the first field that fails.
  function Argv.parse(argv, schema)
    local out = {}
    for _, f in ipairs(schema) do
      local v, detail = field_value(f, argv[f[1]])
      if v == nil then
        return nil, Reply.err('invalid_input', detail)
      end
      out[f[2]] = v
    end
    return out, nil
  end
end
