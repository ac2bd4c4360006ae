-- uses: reply

local Argv = {}

function Argv.is_int(s)
  return type(s) == 'string' and string.match(s, '^%-?%d+$') ~= nil
end

-- Required integer ARGV: nil plus an invalid_input reply when malformed.
function Argv.req_int(name, v)
  if not Argv.is_int(v) then
    return nil, Reply.err('invalid_input', name .. ' must be a number, got: ' .. tostring(v))
  end
  return tonumber(v), nil
end

-- Optional integer ARGV ("" = unset): returns false when unset.
function Argv.opt_int(name, v)
  if v == nil or v == '' then
    return false, nil
  end
  return Argv.req_int(name, v)
end

-- Required non-empty string ARGV, as {{index, name}, ...} checked in order. Returns nil or the
-- invalid_input reply.
function Argv.require_strings(argv, specs)
  for _, s in ipairs(specs) do
    local v = argv[s[1]]
    if v == nil or v == '' then
      return Reply.err('invalid_input', s[2] .. ' must not be empty')
    end
  end
  return nil
end

-- Required positive integer ARGV.
function Argv.req_pos(name, v)
  local n, e = Argv.req_int(name, v)
  if not n then
    return nil, e
  end
  if n <= 0 then
    return nil, Reply.err('invalid_input', name .. ' must be positive, got: ' .. v)
  end
  return n, nil
end
