-- KEYS: due, counts of each shard. ARGV per shard: open traces delta, spans delta, delta of the
-- open traces held by id alone, how many (op, id, score) triples follow, the triples: 'a' sets
-- the deadline; 'r' drops it unless something moved it since (a late span re-opened the trace).
local at = 1
for k = 1, #KEYS, 2 do
  local due, counts, n = KEYS[k], KEYS[k + 1], tonumber(ARGV[at + 3])
  if ARGV[at] ~= '0' then redis.call('HINCRBY', counts, 'traces', ARGV[at]) end
  if ARGV[at + 1] ~= '0' then redis.call('HINCRBY', counts, 'spans', ARGV[at + 1]) end
  if ARGV[at + 2] ~= '0' then redis.call('HINCRBY', counts, 'ids', ARGV[at + 2]) end
  for i = at + 4, at + 3 + 3 * n, 3 do
    if ARGV[i] == 'a' then
      redis.call('ZADD', due, ARGV[i + 2], ARGV[i + 1])
    else
      local score = redis.call('ZSCORE', due, ARGV[i + 1])
      if score and tonumber(score) == tonumber(ARGV[i + 2]) then
        redis.call('ZREM', due, ARGV[i + 1])
      end
    end
  end
  at = at + 4 + 3 * n
end
return 0
