-- uses: reply

local Hmac = {}

-- Hex string -> bytes; nil for an empty, odd-length or non-hex input (no coercion).
function Hmac.hex_to_bytes(hex)
  if type(hex) ~= 'string' or hex == '' or #hex % 2 ~= 0 or string.find(hex, '[^0-9a-fA-F]') then
    return nil
  end
  return (string.gsub(hex, '..', function(h)
    return string.char(tonumber(h, 16))
  end))
end

-- Every byte of `s` XOR `b`.
function Hmac.xor_bytes(s, b)
  local out = {}
  for i = 1, #s do
    out[i] = string.char(bit.bxor(string.byte(s, i), b))
  end
  return table.concat(out)
end

-- RFC 2104 HMAC-SHA1 over redis.sha1hex (docs/suspension.md#waitpoint-tokens): lowercase hex
-- digest. `key` = raw bytes.
function Hmac.sha1_hex(key, msg)
  if #key > 64 then
    key = Hmac.hex_to_bytes(redis.sha1hex(key))
  end
  key = key .. string.rep('\0', 64 - #key)
  local inner = Hmac.hex_to_bytes(redis.sha1hex(Hmac.xor_bytes(key, 0x36) .. msg))
  return redis.sha1hex(Hmac.xor_bytes(key, 0x5c) .. inner)
end

-- Constant-time equality of two 40-char digests: OR-accumulated byte XORs over all 40 bytes.
function Hmac.digest_equal(a, b)
  if #a ~= 40 or #b ~= 40 then
    return false
  end
  local acc = 0
  for i = 1, 40 do
    acc = bit.bor(acc, bit.bxor(string.byte(a, i), string.byte(b, i)))
  end
  return acc == 0
end

-- The signed message (docs/suspension.md#waitpoint-tokens).
function Hmac.token_message(wpid, wpkey, created_at)
  return wpid .. '|' .. wpkey .. '|' .. created_at
end

-- A keystore key was supplied (not absent, not the ff:noop placeholder).
function Hmac.keystore_given(key)
  return type(key) == 'string' and string.sub(key, 1, 7) == 'ff:sec:'
end

-- expires_at:<kid> as a positive integer, or nil (missing/malformed fails closed).
function Hmac.kid_expiry(v)
  if type(v) ~= 'string' or not string.match(v, '^%d+$') then
    return nil
  end
  local n = tonumber(v)
  if n <= 0 then
    return nil
  end
  return n
end

-- Mint (docs/suspension.md#waitpoint-tokens): the token for (wpid, wpkey, created_at) under the
-- current kid, or nil
-- plus the error reply.
function Hmac.mint(keystore, wpid, wpkey, created_at)
  if not Hmac.keystore_given(keystore) then
    return nil, Reply.err('invalid_keys_missing_hmac')
  end
  local kid = redis.call('HGET', keystore, 'current_kid')
  if not kid or kid == '' then
    return nil, Reply.err('hmac_secret_not_initialized')
  end
  local hex = redis.call('HGET', keystore, 'secret:' .. kid)
  if not hex or hex == '' then
    return nil, Reply.err('hmac_secret_not_initialized')
  end
  local key = Hmac.hex_to_bytes(hex)
  if not key then
    return nil, Reply.err('invalid_secret')
  end
  return kid .. ':' .. Hmac.sha1_hex(key, Hmac.token_message(wpid, wpkey, created_at)), nil
end

-- Validate (docs/suspension.md#token-validation), first failing step wins. Returns nil when valid,
-- else the error reply.
function Hmac.validate(keystore, token, wpid, wpkey, created_at, now)
  if not Hmac.keystore_given(keystore) then
    return Reply.err('invalid_keys_missing_hmac')
  end
  if type(token) ~= 'string' or token == '' then
    return Reply.err('missing_token')
  end
  local sep = string.find(token, ':', 1, true)
  if not sep or sep == 1 or sep == #token then
    return Reply.err('invalid_token')
  end
  local kid, digest = string.sub(token, 1, sep - 1), string.sub(token, sep + 1)
  if #digest ~= 40 then
    return Reply.err('invalid_token')
  end
  local current = redis.call('HGET', keystore, 'current_kid')
  if not current or current == '' then
    return Reply.err('hmac_secret_not_initialized')
  end
  local hex = redis.call('HGET', keystore, 'secret:' .. kid)
  if kid ~= current then
    if not hex then
      return Reply.err('invalid_token')
    end
    local exp = Hmac.kid_expiry(redis.call('HGET', keystore, 'expires_at:' .. kid))
    if not exp or exp < now then
      return Reply.err('token_expired')
    end
  elseif not hex then
    return Reply.err('invalid_token')
  end
  local key = Hmac.hex_to_bytes(hex)
  if not key then
    return Reply.err('invalid_secret')
  end
  if not Hmac.digest_equal(Hmac.sha1_hex(key, Hmac.token_message(wpid, wpkey, created_at)), digest) then
    return Reply.err('invalid_token')
  end
  return nil
end
