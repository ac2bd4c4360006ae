-- uses: reply

local Util = {}

-- Integer to decimal string. Lua's tostring() keeps only 14 significant digits, which corrupts
-- scores like -(priority x 10^12) + created_at; always format integers through this.
function Util.num(n)
  return string.format('%.0f', n)
end

function Util.now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The first {...} of a key: the hash tag every key of one call shares.
function Util.tag_of(key)
  return string.match(key, '(%b{})')
end

-- A batched Function (docs/lifecycle.md#batched-functions): KEYS are the items' own KEYS one
-- after the other, ARGV[1] and ARGV[2] the KEYS and ARGV count of one item, then the items' own
-- ARGV one after the other. `one` runs on each item in order, each atomic on its own and
-- answering as the single call would; the reply is the list of those replies. With `stop`, the
-- first error reply ends the list (the items after it are not run).
function Util.each_item(keys, argv, one, stop)
  local nk, na = tonumber(argv[1]), tonumber(argv[2])
  if not nk or not na or nk < 1 or na < 1 or #keys % nk ~= 0
      or #argv - 2 ~= (#keys / nk) * na then
    return Reply.err('invalid_input', 'batch: KEYS and ARGV do not match the item counts')
  end
  local out = {}
  for i = 0, #keys / nk - 1 do
    local k, a = {}, {}
    for j = 1, nk do
      k[j] = keys[i * nk + j]
    end
    for j = 1, na do
      a[j] = argv[2 + i * na + j]
    end
    out[i + 1] = one(k, a)
    if stop and out[i + 1][1] == 0 then
      break
    end
  end
  return out
end

function Util.hgetall(key)
  local flat = redis.call('HGETALL', key)
  local m = {}
  for i = 1, #flat, 2 do
    m[flat[i]] = flat[i + 1]
  end
  return m
end

-- HSET of a map, in chunks of 200 pairs: `unpack` has a limit (about 8000 values) that a caller-
-- sized map must never meet half-way through a function.
function Util.hmset(key, m)
  local args = {}
  for k, v in pairs(m) do
    args[#args + 1] = k
    args[#args + 1] = tostring(v)
    if #args >= 400 then
      redis.call('HSET', key, unpack(args))
      args = {}
    end
  end
  if #args > 0 then
    redis.call('HSET', key, unpack(args))
  end
end

function Util.decode_json(s)
  local okd, v = pcall(cjson.decode, s)
  if not okd then
    return nil
  end
  return v
end

function Util.is_set(v)
  return v ~= nil and v ~= false and v ~= ''
end

function Util.split_csv(csv)
  local toks = {}
  for t in string.gmatch(csv or '', '[^,]+') do
    toks[#toks + 1] = t
  end
  return toks
end

-- A KEYS entry that must be the key built from ARGV (a waitpoint or signal id): a mismatch is a
-- malformed call and raises before anything is written.
function Util.expect_key(actual, expected, what)
  if actual ~= expected then
    error({err = 'ERR flowfabric: KEYS entry for ' .. what .. ' does not match its ARGV id'})
  end
end

-- A list of strings as a JSON array ("[]" when empty; cjson would encode {} as an object).
function Util.json_array(list)
  if #list == 0 then
    return '[]'
  end
  return cjson.encode(list)
end

