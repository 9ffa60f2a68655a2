-- KEYS: spans, signals of each trace. ARGV: retention, then per trace its token. Per trace: 1
-- when its claim was still the trace's.
-- (sidecar/stores/redis/scripts/state.lua is prepended)
local function finish(spans, signals, token)
  local m = state(spans)
  if not m or m.st ~= '2' or m.tok ~= token then return 0 end
  m.f = '1'
  save(spans, m)
  redis.call('PEXPIRE', spans, ARGV[1])
  redis.call('PEXPIRE', signals, ARGV[1])
  return 1
end
local out = {}
for k = 1, #KEYS, 2 do out[#out + 1] = finish(KEYS[k], KEYS[k + 1], ARGV[1 + (k + 1) / 2]) end
return out
