-- KEYS: due of each shard. ARGV: now, limit, lease_until. Per shard: its due trace ids joined by
-- ',' (at most `limit` in all), moved to their lease expiry.
local left, out = tonumber(ARGV[2]), {}
for k = 1, #KEYS do
  local ids = {}
  if left > 0 then
    ids = redis.call('ZRANGEBYSCORE', KEYS[k], '-inf', ARGV[1], 'LIMIT', 0, left)
    for _, id in ipairs(ids) do redis.call('ZADD', KEYS[k], ARGV[3], id) end
    left = left - #ids
  end
  out[k] = table.concat(ids, ',')
end
return out
