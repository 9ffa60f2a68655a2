-- The trace state at the head of its list, read and written by every trace script:
-- "st,opened,last,decided_at,lease_until,finished,born,bytes,token" (born: when its first span
-- came, kept when a late span re-opens it; bytes: the sizes of its spans, for max_trace_bytes).
local function state(key)
  local raw = redis.call('LINDEX', key, 0)
  if not raw then return nil end
  local st, o, l, dt, lx, f, b, by, tok =
    string.match(raw, '^(%d),(%d*),(%d*),(%d*),(%d*),(%d?),(%d*),(%d*),(.*)$')
  return {st = st, o = tonumber(o), l = tonumber(l), dt = tonumber(dt), lx = tonumber(lx),
          f = f, b = tonumber(b), by = tonumber(by) or 0, tok = tok}
end
local function num(x) if x then return string.format('%d', x) end return '' end
local function save(key, m)
  redis.call('LSET', key, 0, table.concat({m.st, num(m.o), num(m.l), num(m.dt), num(m.lx),
                                          m.f or '', num(m.b), num(m.by), m.tok or ''}, ','))
end
