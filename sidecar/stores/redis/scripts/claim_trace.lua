-- KEYS: spans of each trace. ARGV: now, wait, max_age, lease_until, then per trace its token.
-- Per trace a head "claimed,deadline,previous st,reason,span count,born" then its spans, or the head
-- alone: "later,deadline", "gone", "done" (decided, also on arrival), "leased".
-- (sidecar/stores/redis/scripts/state.lua is prepended)
local now, wait, max_age, lease = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]),
                                  tonumber(ARGV[4])
local out = {}
local function claim(spans, token)
  local m = state(spans)
  if not m or not m.l then out[#out + 1] = 'gone' return end
  if m.st == '3' or (m.st == '2' and m.f == '1') then out[#out + 1] = 'done' return end
  if m.st == '2' and m.lx > now then out[#out + 1] = 'leased' return end
  local idle, aged = m.l + wait, m.o + max_age
  local due = math.min(idle, aged)
  if m.st == '0' and due > now then out[#out + 1] = 'later,' .. num(due) return end
  local n = redis.call('LLEN', spans) - 1
  local reason = 'idle'
  if aged <= idle then reason = 'max_age' end
  out[#out + 1] = table.concat({'claimed', num(due), m.st, reason, n, num(m.b)}, ',')
  m.st, m.dt, m.lx, m.f, m.tok = '2', now, lease, nil, token
  save(spans, m)
  for _, span in ipairs(redis.call('LRANGE', spans, 1, -1)) do out[#out + 1] = span end
end
for k = 1, #KEYS do claim(KEYS[k], ARGV[4 + k]) end
return out
