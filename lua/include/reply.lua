-- reply.lua: the reply shapes every function returns. The first include: the conventions
-- below hold for the whole library (docs/architecture.md#the-functions-library).
--
-- Conventions:
--   * Replies: {1, "OK", ...} success; {1, "ALREADY_SATISFIED", reason, ...} idempotent no-op;
--     {1, "DUPLICATE", id} dedup hit; {0, "<error_code>", detail...} failure. Lua raises only
--     for a malformed call (wrong key count), never for an expected outcome.
--   * "now" is always the Valkey clock (TIME), never an ARGV value, unless a function's header
--     says otherwise.
--   * Every key a function touches shares the hash tag of KEYS[1]. Keys a function builds at run
--     time reuse that tag (Util.tag_of(KEYS[1])), so every call stays single-slot on Cluster.
--   * No rollback: validate everything before the first write.
--   * Each include defines one table; a file names the includes it uses in its `-- uses:` line
--     (checked by tests/lua/test_includes.py).
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

-- Enriched execution_not_active (docs/architecture.md#shared-transition-rules): lets a caller whose
-- committed call lost its reply
-- recognise its own success (docs/lifecycle.md#replay-of-a-terminal-call).
function Reply.not_active(c)
  return Reply.err('execution_not_active', c.terminal_outcome or '', c.current_lease_epoch or '',
    c.lifecycle_phase or '', c.current_attempt_id or '')
end
