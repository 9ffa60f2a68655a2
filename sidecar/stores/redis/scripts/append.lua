-- KEYS: spans, signals of each trace. ARGV: now, max_spans, max_bytes, ttl, retention, wait,
-- max_age, then per trace: its span count n, its flag, the n spans' sizes (stored_bytes), the n
-- spans. In order, a span is taken while the trace holds fewer than max_spans spans and it fits
-- in the bytes left under max_bytes; else it is refused, and a later, smaller one may still fit
-- (as in the memory store). The flag: '1' when the caller decided the trace on arrival, '0'
-- when not; 'i' (no spans) when the trace is known by id alone (no span of it selected), held
-- open for the rules that fire without their spans; 'b' the same but only when already held
-- (over max_trace_ids). Per trace one string "taken,refused over max_spans,refused over
-- max_bytes,late,counted,spans before,deadline,made": counted 1 when the trace (re)joins the
-- open traces, deadline '' unless it is open, made 'n' when this call created it open, 'q' when
-- it created it decided on arrival (named so, every span taken: no deadline, st 3 with its
-- would-be deadline as the time decided), 'i' when it created it open by id alone, 'u' when it
-- brought the first spans to a trace held by id alone, 'd' when a 'b' trace was not held.
-- (sidecar/stores/redis/scripts/state.lua is prepended)
local now, limit, max_bytes, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]),
                                   ARGV[4]
local retention, wait, max_age = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local function append(spans, signals, first, n, flag)
  local m = state(spans)
  local late, counted, before, made = 0, 0, 0, ''
  if m and m.st ~= '0' and now > m.dt + retention then
    redis.call('DEL', spans, signals)  -- decided long ago: forgotten, start afresh
    m = nil
  end
  local have, bytes = 0, 0
  if m then have, bytes = redis.call('LLEN', spans) - 1, m.by end
  local taken, over_count, over_bytes, size = {}, 0, 0, 0
  for i = 0, n - 1 do
    local span_bytes = tonumber(ARGV[first + i])
    if have + #taken >= limit then
      over_count = over_count + 1
    elseif bytes + size + span_bytes > max_bytes then
      over_bytes = over_bytes + 1
    else
      taken[#taken + 1] = ARGV[first + n + i]
      size = size + span_bytes
    end
  end
  local take = #taken
  local by_id = flag == 'i' or flag == 'b'
  if by_id and not m and flag == 'b' then made = 'd' end
  local due = ''
  if take > 0 or (by_id and made == '' and (not m or m.st == '0')) then
    if not m then
      counted, made = 1, 'n'
      if by_id then made = 'i' end
      m = {o = now, b = now, by = 0}
      redis.call('RPUSH', spans, '')  -- the state's place
    elseif m.st ~= '0' then  -- decided: a span re-opens it with its earlier spans; it is late
      counted, before = 1, have  -- unless decided on arrival and still inside its wait
      if m.st == '2' or now > m.dt then late = take end
      m = {o = now, b = m.b, by = m.by}
    elseif have == 0 and take > 0 then
      made = 'u'
    end
    m.st, m.l, m.by = '0', now, m.by + size
    if take > 0 then redis.call('RPUSH', spans, unpack(taken)) end
    if made == 'n' and flag == '1' and take == n then
      counted, made = 0, 'q'
      m.st, m.dt = '3', now + math.min(wait, max_age)
    end
    save(spans, m)
  end
  if m and m.st == '0' then  -- also when nothing was taken: a retry re-sends the deadline
    due = num(math.min(m.l + wait, m.o + max_age))  -- that a failed round trip left unset
  end
  if made == 'q' then  -- kept for late spans as if decided at its deadline
    redis.call('PEXPIRE', spans, m.dt - now + retention + 1000)
  elseif due ~= '' then
    redis.call('PEXPIRE', spans, ttl)
    redis.call('PEXPIRE', signals, ttl)  -- a re-opened trace keeps the memory of its signals
  end
  return table.concat({take, over_count, over_bytes, late, counted, before, due, made}, ',')
end
local out, at = {}, 8
for k = 1, #KEYS, 2 do
  local n = tonumber(ARGV[at])
  out[#out + 1] = append(KEYS[k], KEYS[k + 1], at + 2, n, ARGV[at + 1])
  at = at + 2 + 2 * n
end
return out
