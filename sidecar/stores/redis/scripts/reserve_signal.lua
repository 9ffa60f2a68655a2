-- KEYS: signals of each (rule, trace). ARGV: now, stale_after, ttl (ms), then per pair its rule.
-- Per pair: 1 when this caller may signal.
local now, stale, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local function reserve(signals, rule)
  local state = redis.call('HGET', signals, rule)
  if state == 'sent' then return 0 end
  if state and now - tonumber(state) < stale then return 0 end
  redis.call('HSET', signals, rule, ARGV[1])
  redis.call('PEXPIRE', signals, ttl)
  return 1
end
local out = {}
for k = 1, #KEYS do out[k] = reserve(KEYS[k], ARGV[3 + k]) end
return out
