-- uses: util, keys

local Stream = {}

-- Closes the stream meta of attempt `idx` if the meta exists (docs/streams.md#close-markers), then
-- publishes stream_closed on ff:exec_events:{p}, unless this call already published a
-- state_changed of the execution there (x.announced): a tail wakes on any event of its
-- execution and re-reads the meta, so one event per call is enough. `only_if_open`: leave an
-- existing close alone. The core's stream_attempt (the attempt whose first append created its
-- meta; "" = none since create) answers "does the meta exist" without a read when it is "" or
-- this attempt; a core without it (written before the field) or naming another attempt is
-- checked with EXISTS.
function Stream.close(x, idx, reason, now, only_if_open)
  if not Util.is_set(idx) then
    return
  end
  local meta = Keys.stream_meta(x.tag, x.eid, idx)
  local known = x.core and x.core.stream_attempt
  if known == '' then
    return
  end
  if known ~= tostring(idx) and redis.call('EXISTS', meta) == 0 then
    return
  end
  if only_if_open and Util.is_set(redis.call('HGET', meta, 'closed_at')) then
    return
  end
  redis.call('HSET', meta, 'closed_at', Util.num(now), 'closed_reason', reason)
  if x.announced then
    return
  end
  redis.call('SPUBLISH', 'ff:exec_events:' .. x.tag, cjson.encode({
    type = 'stream_closed', execution_id = x.eid, attempt_index = tonumber(idx),
    closed_reason = reason, at = now,
  }))
end
