-- uses: util, keys

local Stream = {}

-- Closes the stream meta of attempt `idx` if the meta exists (docs/streams.md#close-markers), then
-- publishes
-- stream_closed on ff:exec_events:{p}. `only_if_open`: leave an existing close alone.
function Stream.close(x, idx, reason, now, only_if_open)
  if not Util.is_set(idx) then
    return
  end
  local meta = Keys.stream_meta(x.tag, x.eid, idx)
  if redis.call('EXISTS', meta) == 0 then
    return
  end
  if only_if_open and Util.is_set(redis.call('HGET', meta, 'closed_at')) then
    return
  end
  redis.call('HSET', meta, 'closed_at', Util.num(now), 'closed_reason', reason)
  redis.call('SPUBLISH', 'ff:exec_events:' .. x.tag, cjson.encode({
    type = 'stream_closed', execution_id = x.eid, attempt_index = tonumber(idx),
    closed_reason = reason, at = now,
  }))
end
