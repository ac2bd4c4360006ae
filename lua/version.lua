-- version.lua
-- uses: (none)
--
-- ff_version
--   KEYS: none.  ARGV: none.
--   Reply: the bare library version string (FF_LIBRARY_VERSION, injected by the assembler: a
--   content hash of the assembled library, so any change to any function reloads it).
--   Errors: none.  Flags: no-writes (call with FCALL_RO or FCALL).
redis.register_function {
  function_name = 'ff_version',
  callback = function()
    return FF_LIBRARY_VERSION
  end,
  flags = {'no-writes'},
}
