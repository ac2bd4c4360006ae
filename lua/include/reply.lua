-- uses: (none)

local Reply = {}

function Reply.ok(...)
  return {1, 'OK', ...}
end

function Reply.err(code, ...)
  return {0, code, ...}
end

function Reply.already(reason, ...)
  return {1, 'ALREADY_SATISFIED', reason, ...}
end

-- Enriched execution_not_active (spec 00 §8.3): lets a caller whose committed call lost its reply
-- recognise its own success (spec 10 §1.4).
function Reply.not_active(c)
  return Reply.err('execution_not_active', c.terminal_outcome or '', c.current_lease_epoch or '',
    c.lifecycle_phase or '', c.current_attempt_id or '')
end
