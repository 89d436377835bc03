#!lua name=tollgate_@V@
-- tollgate: apply one batch atomically (see src/store/redis/mod.rs for the
-- layout of keys and arguments, and src/store/mod.rs for the contract).
--
-- A Redis Functions library (FUNCTION LOAD once, FCALL per batch): the
-- helpers are made once, when the library loads, instead of on every call
-- as a script's would be (that cost ~1.5 µs per admit, BENCHMARKS.md).
-- The library's and the function's names end in its version (a digest of
-- this file, filled in by the store), so stores of different versions
-- sharing a Redis each call their own.
--
-- Amounts are u64. A counter below 2^53 is kept packed ('#' and doubles,
-- struct.pack), one at or past it as decimal text. Lua numbers are doubles,
-- exact below 2^53, so an amount is a Lua number below 2^53 and a table of
-- four 16-bit limbs (least significant first) above it: every sum,
-- difference, comparison and settlement share is exact over the whole u64
-- range. norm() keeps one form per value: a number is always below 2^53
-- and a table always at or above it, so mixed comparisons need no limbs.
-- Times are Unix milliseconds (exact as doubles).

-- Loading a library sees no globals (not even type or math): what the
-- helpers take from them is set by apply's first call (module-level
-- locals live as long as the library).
local function globals()
  return redis.call, type, tonumber, math.floor, string.format, string.byte, struct.pack,
    struct.unpack
end
local call, type, tonumber, floor, fmt, byte, spack, sunpack
-- What costs here is allocation (the garbage collector is paid per byte)
-- and calls into C (type, tonumber, math.floor, string.format...): the hot
-- path parses with arithmetic ('12' + 0, x - x % 1), keeps tables small
-- and asks type() only once a value at or past 2^53 exists (big).
-- Per call, set by apply (the helpers read them): big (a value at or past
-- 2^53 exists), now, srv (the server's clock), the scope hashes.
-- depth: closed calendar periods kept per counter (contract rule 11).
local big, now, srv, hashes, hlist, depth = false, 0, false, nil, nil, 0
local TWO53 = 9007199254740992
local B = 65536

local function tolimbs(v)
  big = true
  if type(v) == 'table' then return v end
  local l = {}
  for i = 1, 4 do
    l[i] = v % B
    v = (v - l[i]) / B
  end
  return l
end

local function norm(l)
  if l[4] < 32 then
    return l[1] + B * (l[2] + B * (l[3] + B * l[4]))
  end
  return l
end

-- Parse a decimal string (nil reads as zero); nil past u64. Up to 15 digits
-- it is tonumber; longer, a high part and the last 8 digits, so a value
-- that fits 2^53 stays a number and a larger one takes a few limb steps.
local E8 = 100000000
local function P(s)
  if not s then return 0 end
  local n = #s
  if n <= 15 then return s + 0 end
  if n > 20 then return nil end
  big = true
  local hi, lo = tonumber(string.sub(s, 1, n - 8)), tonumber(string.sub(s, n - 7))
  -- hi < 2^53 / 10^8: hi * 10^8 + lo < 2^53, exact.
  if hi < 90071992 then return hi * E8 + lo end
  -- hi < 10^12 < 2^48: its limbs times 10^8, plus lo (every step < 2^44).
  local l, carry = {}, lo
  for i = 1, 4 do
    local h = hi % B
    hi = (hi - h) / B
    local x = h * E8 + carry
    l[i] = x % B
    carry = (x - l[i]) / B
  end
  if carry > 0 then return nil end
  return norm(l)
end

-- Format an amount: a table is divided by 10^8 limb by limb (every step
-- < 2^44), so it prints as two exact numbers.
-- (%d prints a C long: exact for every integer below 2^53, and twice as
-- fast as %.0f.)
local function S(v)
  if not big or type(v) == 'number' then return fmt('%d', v) end
  local q, rem = 0, 0
  for i = 4, 1, -1 do
    local x = rem * B + v[i]
    local d = floor(x / E8)
    rem = x - d * E8
    q = q * B + d
  end
  return fmt('%d%08d', q, rem)
end

-- a + b, or nil past u64.
local function add(a, b)
  if not big then
    local s = a + b
    if s < TWO53 then return s end
  elseif type(a) == 'number' and type(b) == 'number' and a + b < TWO53 then
    return a + b
  end
  local x, y, r, carry = tolimbs(a), tolimbs(b), {}, 0
  for i = 1, 4 do
    local s = x[i] + y[i] + carry
    r[i] = s % B
    carry = floor(s / B)
  end
  if carry > 0 then return nil end
  return norm(r)
end

-- a - b, for a >= b.
local function sub(a, b)
  if not big or (type(a) == 'number' and type(b) == 'number') then return a - b end
  local x, y, r, borrow = tolimbs(a), tolimbs(b), {}, 0
  for i = 1, 4 do
    local s = x[i] - y[i] - borrow
    if s < 0 then
      s = s + B
      borrow = 1
    else
      borrow = 0
    end
    r[i] = s
  end
  return norm(r)
end

local function cmp(a, b)
  if not big then
    if a < b then return -1 elseif a > b then return 1 else return 0 end
  end
  local na, nb = type(a) == 'number', type(b) == 'number'
  if na and nb then
    if a < b then return -1 elseif a > b then return 1 else return 0 end
  end
  -- A number is below 2^53 and a table at or above it.
  if na then return -1 end
  if nb then return 1 end
  local x, y = tolimbs(a), tolimbs(b)
  for i = 4, 1, -1 do
    if x[i] < y[i] then return -1 elseif x[i] > y[i] then return 1 end
  end
  return 0
end

-- Calendar bounds: made in fill the first time a calendar counter rolls,
-- then kept with the library.
local bounds

-- ceil(h * num / den) for num <= den, exact.
local function share(h, num, den)
  if num == 0 or h == 0 then return 0 end
  if cmp(num, den) == 0 then return h end
  if type(h) == 'number' and type(num) == 'number' and type(den) == 'number'
      and h <= floor((TWO53 - 1) / num) then
    local p = h * num
    local q = floor(p / den)
    local r = p - q * den
    while r < 0 do q = q - 1; r = r + den end
    while r >= den do q = q + 1; r = r - den end
    if r > 0 then q = q + 1 end
    return q
  end
  local a, b = tolimbs(h), tolimbs(num)
  local p = {0, 0, 0, 0, 0, 0, 0, 0}
  for i = 1, 4 do
    local carry = 0
    for j = 1, 4 do
      local x = p[i + j - 1] + a[i] * b[j] + carry
      p[i + j - 1] = x % B
      carry = floor(x / B)
    end
    p[i + 4] = carry
  end
  local d = tolimbs(den)
  d = {d[1], d[2], d[3], d[4], 0}
  local r = {0, 0, 0, 0, 0}
  local q = {0, 0, 0, 0, 0, 0, 0, 0}
  for k = 127, 0, -1 do
    local limb = floor(k / 16) + 1
    local bit = floor(p[limb] / 2 ^ (k % 16)) % 2
    local carry = bit
    for i = 1, 5 do
      local x = r[i] * 2 + carry
      r[i] = x % B
      carry = floor(x / B)
    end
    local ge = true
    for i = 5, 1, -1 do
      if r[i] ~= d[i] then ge = r[i] > d[i]; break end
    end
    if ge then
      local borrow = 0
      for i = 1, 5 do
        local s = r[i] - d[i] - borrow
        if s < 0 then s = s + B; borrow = 1 else borrow = 0 end
        r[i] = s
      end
      q[limb] = q[limb] + 2 ^ (k % 16)
    end
  end
  local res = norm({q[1], q[2], q[3], q[4]})
  if r[1] + r[2] + r[3] + r[4] + r[5] > 0 then res = add(res, 1) end
  return res
end

local function count(s)
  if s == '0' then return 0 elseif s == '1' then return 1 elseif s == '2' then return 2 end
  return s + 0
end
local function maxu()
  big = true
  return {B - 1, B - 1, B - 1, B - 1}
end

-- An amount for a reply: a number below 2^53 goes out as an integer reply
-- (no formatting here), anything larger as a decimal string.
local function N(v)
  if not big or type(v) == 'number' then return v end
  return S(v)
end

local function hashof(hk)
  local h = hashes[hk]
  if not h then
    h = {key = hk, cs = {}, list = {}, read = false, x = false, delx = false}
    hashes[hk] = h
    hlist[#hlist + 1] = h
  end
  return h
end
-- The hash's expiry field x: '#' and a double, as counters are packed
-- (decimal text before; still read). A store of an earlier version,
-- which reads x as a number, fails on a hash this one wrote instead of
-- reading its packed counters as empty.
local function readhash(h, x)
  h.read = true
  if x then
    if not srv then
      h.delx = true
    elseif byte(x, 1) == 35 then
      h.x = sunpack('<xd', x)
    else
      h.x = x + 0
    end
  end
end



local function newc(h, cid, w, c)
  c.h, c.p, c.w = h, cid, w
  h.cs[cid] = c
  local l = h.list
  l[#l + 1] = c
  return c
end


-- Fill a counter from its packed field (v, nil for none) and roll it to
-- now (rule 2), dropping expired holds. Reads only: what leaves is deleted
-- at write-back, which only a batch that applies reaches, so a Check, a
-- refused batch and one that ends in an error change nothing (a clock that
-- then steps back finds the usage where it was). Rolling never moves a
-- counter back: a calendar counter holding usage keeps its later period,
-- a rolling one its later newest bucket. A field
-- of an ended window is never read as live: a calendar counter carries its
-- period (s, e), a rolling one its newest and oldest bucket (hd, tl).
local function fill(c, v)
  local w, hk, p = c.w, c.h.key, c.p
  local kind = w.kind
  local a, b, d
  if v then
    if byte(v, 1) == 35 then
      -- '#' and doubles (pack): every value below 2^53, read exactly.
      if kind == 'R' then
        c.used, c.held, a, b, d = sunpack('<xddddd', v)
      elseif kind == 'C' then
        c.used, c.held, a, b = sunpack('<xdddd', v)
      else
        c.used, c.held = sunpack('<xdd', v)
      end
    else
      -- Decimal text: an amount at or past 2^53, or a field written
      -- before this format (read alike, written back in the new form).
      local u, hl
      if kind == 'R' then
        u, hl, c.raw, a, b, d = string.match(v, '^(%d+) (%d+) ((%-?%d+) (%-?%d+)) (%d+)$')
      elseif kind == 'C' then
        u, hl, c.raw, a, b = string.match(v, '^(%d+) (%d+) ((%-?%d+) (%-?%d+))$')
      else
        u, hl = string.match(v, '^(%d+) (%d+)$')
      end
      c.used = P(u)
      if hl ~= '0' then c.held = P(hl) end
      if d then d = P(d) end
    end
  end
  if kind == 'C' then
    -- The start stays the string read unless the counter rolls (pack and
    -- the reply take either).
    local s, e = a, b and b + 0
    if not e or now >= e or (c.used == 0 and now < s + 0) then
      if e then c.dirty = true end
      c.raw = false
      if not bounds then
        -- Calendar bounds, as Window::calendar_bounds (Howard Hinnant's civil
        -- algorithms on days since the epoch).
        local DAY = 86400000
        bounds = function(period, off, now)
          local function civil(z)
            z = z + 719468
            local era = floor(z / 146097)
            local doe = z - era * 146097
            local yoe = floor((doe - floor(doe / 1460) + floor(doe / 36524) - floor(doe / 146096)) / 365)
            local y = yoe + era * 400
            local doy = doe - (365 * yoe + floor(yoe / 4) - floor(yoe / 100))
            local mp = floor((5 * doy + 2) / 153)
            local d = doy - floor((153 * mp + 2) / 5) + 1
            local m = mp < 10 and mp + 3 or mp - 9
            if m <= 2 then y = y + 1 end
            return y, m, d
          end
          local function days(y, m, d)
            if m <= 2 then y = y - 1 end
            local era = floor(y / 400)
            local yoe = y - era * 400
            local mp = m > 2 and m - 3 or m + 9
            local doy = floor((153 * mp + 2) / 5) + d - 1
            local doe = yoe * 365 + floor(yoe / 4) - floor(yoe / 100) + doy
            return era * 146097 + doe - 719468
          end
          local offms = off * 1000
          local day = floor((now + offms) / DAY)
          local s, e
          if period == 'd' then
            s, e = day, day + 1
          elseif period == 'w' then
            s = day - (day + 3) % 7
            e = s + 7
          else
            local y, m, d = civil(day)
            s = day - (d - 1)
            if m == 12 then e = days(y + 1, 1, 1) else e = days(y, m + 1, 1) end
          end
          return s * DAY - offms, e * DAY - offms
        end
      end
      -- A period that ended with usage is kept at write-back (rule 11).
      if e and now >= e and c.used ~= 0 then c.closed = {s + 0, e, c.used} end
      s, e = bounds(w.period, w.off + 0, now)
      c.used = 0
    end
    c.s, c.e = s, e
  elseif kind == 'R' then
    local hd, tl, bv = a and a + 0, b and b + 0, d or 0
    local cur = now / w.width
    cur = cur - cur % 1
    if not hd then
      hd, tl = cur, cur
    elseif cur > hd then
      c.dirty = true
      c.raw = false
      local oldest = cur - w.n + 1
      if c.used ~= 0 then
        for k = tl, math.min(hd, oldest - 1) do
          if k == hd then
            c.used = sub(c.used, bv)
            bv = 0
          else
            local x = call('HGET', hk, p .. '|b' .. k)
            if x then
              c.used = sub(c.used, P(x))
              local dl = c.hdel
              if dl then dl[#dl + 1] = p .. '|b' .. k else c.hdel = {p .. '|b' .. k} end
            end
          end
        end
      end
      -- The newest bucket, if still counted, moves to its own field.
      if bv ~= 0 then c.bset = {hd, p .. '|b' .. hd, bv} end
      local old = hd
      hd, bv = cur, 0
      if c.used == 0 then
        tl = cur
      elseif tl < oldest then
        tl = oldest
        while tl ~= old and not call('HGET', hk, p .. '|b' .. tl) do tl = tl + 1 end
      end
    end
    c.hd, c.tl, c.bv = hd, tl, bv
  end
  -- Holds that expired at or before now are gone (rule 7). Every member
  -- of the scope's expiry set (cid|lease) has a positive amount in its
  -- counter's held, so held = 0 means no holds.
  if c.held == 0 then return c end
  local gone = call('ZRANGEBYSCORE', hk .. ':x', '-inf', now)
  local pre = p .. '|'
  local np = #pre
  for _, m in ipairs(gone) do
    if string.sub(m, 1, np) == pre then
      local f2 = p .. '|h' .. string.sub(m, np + 1)
      local x = call('HGET', hk, f2)
      if x then
        c.held = sub(c.held, P(x))
        local dl = c.hdel
        if dl then dl[#dl + 1] = f2 else c.hdel = {f2} end
      end
      if c.zrem then c.zrem[#c.zrem + 1] = m else c.zrem = {m} end
      c.dirty = true
    end
  end
  return c
end

-- A rolling counter adds to its newest bucket (packed with it); an empty
-- one first moves that bucket to now's (after a clock step back it may be
-- later: usage there must stay, but an empty counter keeps nothing).
local function addusage(c, delta)
  if delta == 0 then return end
  if c.w.kind == 'X' then return end
  if c.w.kind == 'R' then
    if c.used == 0 then
      local cur = now / c.w.width
      cur = cur - cur % 1
      c.hd, c.tl = cur, cur
      c.raw = false
    end
    c.bv = add(c.bv, delta)
  end
  c.used = add(c.used, delta)
  c.dirty = true
end

-- An op's max stays a string until a comparison needs its value: one of
-- 17 digits or more is at least 10^16, above any number (< 2^53).
local function maxof(op)
  if not op.maxv then op.maxv = P(op.max) end
  return op.maxv
end
local function within(s, op)
  if (not big or type(s) == 'number') and #op.max >= 17 then return true end
  return cmp(s, maxof(op)) <= 0
end

-- The longest period of a calendar window ('d', 'w', else a month).
local function periodlen(period)
  if period == 'd' then return 86400000 elseif period == 'w' then return 604800000 end
  return 2678400000
end

-- A counter's closed periods (rule 11): field cid|p, 'd<depth>|start:used;...',
-- the depth the deepest replica writing it keeps. Returns that depth (0
-- for none) and the totals; an entry that is not a time and a u64 (a
-- field someone else wrote) is skipped, so nothing here can fail a batch.
local function parsekept(v)
  local list, d = {}, 0
  if v then
    local sd, rest = string.match(v, '^d(%d+)|(.*)$')
    if sd then
      v = rest
      if #sd <= 3 then d = sd + 0 end
      if d > 366 then d = 366 end
    end
    for st, u in string.gmatch(v, '(%-?%d+):(%d+)') do
      if #st <= 16 and P(u) then list[#list + 1] = {st + 0, u} end
    end
  end
  return d, list
end

-- Keep the period counter c closed (c.closed: start, end, usage) in its
-- history field, adding to a total kept for the same period. The depth
-- kept is the larger of this store's and the field's (a replica keeping
-- fewer periods never trims what a deeper one keeps). When the field then
-- holds more than that, those outside that many periods before now go
-- first (the oldest, else the latest: a clock that stepped back), then
-- the oldest; none older than that stays. Returns the field, its value and
-- how long the hash must live for it; nothing when no depth keeps any.
local function keepclosed(hk, c)
  local cl, w = c.closed, c.w
  local f = c.p .. '|p'
  local kept, list = parsekept(call('HGET', hk, f))
  local depth = depth > kept and depth or kept
  if depth == 0 then return nil end
  local found = false
  for _, x in ipairs(list) do
    if x[1] == cl[1] then
      x[2] = S(add(P(x[2]), cl[3]) or maxu())
      found = true
    end
  end
  if not found then list[#list + 1] = {cl[1], S(cl[3])} end
  table.sort(list, function(x, y) return x[1] < y[1] end)
  local off = w.off + 0
  local cur = bounds(w.period, off, now)
  local oldest = cur
  for _ = 1, depth do oldest = bounds(w.period, off, oldest - 1) end
  while #list > depth do
    if list[1][1] < oldest or list[#list][1] < cur then
      table.remove(list, 1)
    else
      table.remove(list)
    end
  end
  while #list > 0 and list[1][1] < oldest do table.remove(list, 1) end
  local out = {}
  for i, x in ipairs(list) do out[i] = fmt('%d:%s', x[1], x[2]) end
  return f, 'd' .. depth .. '|' .. table.concat(out, ';'), cl[2] + depth * periodlen(w.period)
end

local function pack(c)
  local kind, u, hl = c.w.kind, c.used, c.held
  if not big or (type(u) == 'number' and type(hl) == 'number'
      and (kind ~= 'R' or type(c.bv) == 'number')) then
    -- Every value below 2^53: '#' and doubles, one C call each way
    -- (decimal text cost ~1 µs per counter, BENCHMARKS.md).
    if kind == 'C' then
      return spack('<Bdddd', 35, u, hl, c.s, c.e)
    elseif kind == 'R' then
      return spack('<Bddddd', 35, u, hl, c.hd, c.tl, c.bv)
    end
    return spack('<Bdd', 35, u, hl)
  end
  local head = S(u) .. (hl == 0 and ' 0' or ' ' .. S(hl))
  if kind == 'C' then
    return head .. ' ' .. (c.raw or fmt('%d %d', c.s, c.e))
  elseif kind == 'R' then
    return head .. ' ' .. (c.raw or fmt('%d %d', c.hd, c.tl)) .. ' ' .. S(c.bv)
  end
  return head
end

local function apply(ARGV)
  if not call then
    call, type, tonumber, floor, fmt, byte, spack, sunpack = globals()
  end
  big = false
  -- Arguments.
  -- (Every tonumber on a string costs a strtod: a value is parsed only when
  -- something needs it, and a small count is matched first.)
  srv = ARGV[2] == '1'
  if srv then
    local t = call('TIME')
    local ms = t[2] / 1000
    now = t[1] * 1000 + (ms - ms % 1)
  else
    now = ARGV[1] + 0
  end
  local mode = ARGV[3]
  local horizon
  local margin = ARGV[5] + 0
  local nops = count(ARGV[7])
  local ncool = count(ARGV[8])
  local action = ARGV[9]
  local ekey = ARGV[10]
  depth = ARGV[11] + 0
  if ekey ~= '-' or action ~= '-' then horizon = ARGV[4] + 0 end
  -- What only an event or a lease needs comes only with one, and so does an
  -- op's hold descriptor.
  local base = 11
  local efp
  -- An event key starting with '?' is consulted, never written (the first
  -- phase of a batch spanning cluster slots); one starting with '!' is an
  -- id the engine made for this very call (no earlier try of it exists):
  -- written, never consulted (the GET cost ~1 µs an admit, BENCHMARKS.md).
  local ewrite, eread = true, true
  if ekey ~= '-' then
    efp = ARGV[12]
    base = 12
    local b1 = string.byte(ekey, 1)
    if b1 == 63 then
      ekey = string.sub(ekey, 2)
      ewrite = false
    elseif b1 == 33 then
      ekey = string.sub(ekey, 2)
      eread = false
    end
  end
  local lkey, owner, ownerdesc, lp1, lp2, lid, odkey
  local OPF = 7
  if action ~= '-' then
    lkey, owner, ownerdesc = ARGV[base + 1], ARGV[base + 2], ARGV[base + 3]
    lp1, lp2, lid, odkey = ARGV[base + 4], ARGV[base + 5], ARGV[base + 6], ARGV[base + 7]
    base = base + 7
    OPF = 8
  end
  -- A prepaid balance (rule 10), after the cooldowns (sent with a balance or
  -- a lease): its key ('-': the one the lease holds on, if any), the action
  -- ('d' debit: amount, overdraft; 'g' grant: id digest, amount, effective,
  -- expiry or '-', priority, sealed id, the order of tied grants or '-';
  -- '-' none). Only a balance the batch names is reported.
  local bkey, bact, bargs, breport = nil, '-', 0, false
  do
    local k = base + nops * OPF + ncool * 2
    if ARGV[k + 1] then
      bkey, bact, bargs = ARGV[k + 1], ARGV[k + 2], k + 2
      if bkey == '-' then bkey = nil else breport = true end
    end
  end

  -- The ledger first (rule 8).
  -- An entry is one string: the fingerprint, the time it applied and the
  -- answer, packed by cmsgpack (one C call: formatting the answer's numbers
  -- as text cost ~3 µs per admit, BENCHMARKS.md). An entry written before
  -- (text: "<fingerprint> <time> <answer words>", starting with a hex digit,
  -- where msgpack starts at 0x80 or above) is still read.
  if ekey ~= '-' and eread then
    local e = call('GET', ekey)
    if e then
      if string.byte(e, 1) >= 128 then
        local f, at, ans = cmsgpack.unpack(e)
        if type(f) == 'string' and type(at) == 'number' and type(ans) == 'table'
            and now - at < horizon then
          if f ~= efp then return 'ERR conflict' end
          local r = {'RE', at}
          for i = 1, #ans do r[i + 2] = ans[i] end
          return r
        end
      else
        local f, at = string.match(e, '^(%S+) (%d+)')
        if f and now - at < horizon then
          if f ~= efp then return 'ERR conflict' end
          return 'RE ' .. string.sub(e, #f + 2)
        end
      end
    end
  end

  -- Then the lease (rule 7).
  local lease = nil
  local lexp = 0
  if action ~= '-' then
    local rec = call('HMGET', lkey, 'o', 'ex', 'st', 'n', 'bk')
    if action == 'o' then
      if rec[1] then return 'ERR open' end
    else
      if not rec[1] or rec[1] ~= owner then return 'ERR unknown' end
      if rec[3] == '1' then return 'ERR settled' end
      lexp = tonumber(rec[2])
      if now >= lexp then return 'ERR expired' end
      lease = {n = tonumber(rec[4]), holds = {}, bk = rec[5]}
      -- A lease holds on one balance: the batch may name only that one.
      if rec[5] then
        if bkey and bkey ~= rec[5] then return 'ERR balance' end
        bkey = rec[5]
      end
      for i = 1, lease.n do
        local h = call('HMGET', lkey, 'k' .. i, 'c' .. i, 'w' .. i, 'd' .. i)
        lease.holds[i] = {hk = h[1], cid = h[2], w = h[3], desc = h[4]}
      end
    end
  end

  -- Counters. A window spec is "C:<d|w|m>:<offset secs>", "R:<width ms>:<n>"
  -- (n = buckets + 1), "L" or "X".
  local parsew
  if action ~= '-' then
    -- (Only lease holds need it: defined only with a lease.)
    parsew = function(spec, w)
      local kind = string.sub(spec, 1, 1)
      w.kind = kind
      if kind == 'C' or kind == 'R' then
        local a, b = string.match(spec, '^.:([^:]+):([^:]+)$')
        if kind == 'C' then
          w.period = a
          w.off = tonumber(b)
        else
          w.width = tonumber(a)
          w.n = tonumber(b)
        end
      end
      return w
    end
  end

  -- One hash per scope (hk) holds all of that scope's counters, one field
  -- per counter (its cid) packing "used held s e" (calendar), "used held hd
  -- tl bv" (rolling: newest and oldest bucket, and the newest bucket's
  -- amount) or "used held" (lifetime, concurrent); a rolling counter's older
  -- buckets are fields cid|b<n>, hold amounts cid|h<lease>. Field x: the
  -- hash's expiry (server clock). hashes[hk] = {key, cs = counters by cid,
  -- list = the same in order, read = x known}; hlist keeps their order.
  hashes, hlist = {}, {}

  -- Load one counter (a lease's hold) with its own HMGET.
  local load
  if action ~= '-' then
    load = function(hk, cid, w)
      local h = hashof(hk)
      local c = h.cs[cid]
      if c then return c end
      c = newc(h, cid, w, {h = false, p = false, w = false, dirty = false, used = 0, held = 0,
        raw = false})
      if h.read then return fill(c, call('HGET', hk, cid)) end
      local f = call('HMGET', hk, 'x', cid)
      readhash(h, f[1])
      return fill(c, f[2])
    end
  end

  local addhold
  if action ~= '-' then
    addhold = function(c, exp, delta)
      if delta == 0 then return end
      local f = c.p .. '|h' .. lid
      local cur = P(call('HGET', c.h.key, f))
      call('HSET', c.h.key, f, S(add(cur, delta)))
      call('ZADD', c.h.key .. ':x', exp, c.p .. '|' .. lid)
      c.held = add(c.held, delta)
      c.zchg = true
      c.dirty = true
    end
  end

  local removehold
  if action ~= '-' then
    removehold = function(c)
      local f = c.p .. '|h' .. lid
      local v = P(call('HGET', c.h.key, f))
      if v ~= 0 then
        call('HDEL', c.h.key, f)
        c.held = sub(c.held, v)
      end
      call('ZREM', c.h.key .. ':x', c.p .. '|' .. lid)
      c.dirty = true
      return v
    end
  end

  -- Phase 1: decide.
  -- Op i's window as a spec, for a lease record (parsew reads it back).
  local specof
  if action ~= '-' then
    specof = function(i)
      local k = base + (i - 1) * OPF
      local kind = ARGV[k + 3]
      if kind == 'C' or kind == 'R' then return kind .. ':' .. ARGV[k + 4] .. ':' .. ARGV[k + 5] end
      return kind
    end
  end
  -- An op: scope hash key, counter field, window (kind, then period and
  -- offset (C) or bucket width and count (R)), delta, max, [descriptor].
  local ops = {}
  for i = 1, nops do
    local k = base + (i - 1) * OPF
    local kind = ARGV[k + 3]
    local hk, cid = ARGV[k + 1], ARGV[k + 2]
    -- The op and (when it is the first on its counter) the counter: one
    -- record, made with the fields its kind uses (at most 16: every byte
    -- allocated costs the garbage collector; rare fields come later).
    local max = ARGV[k + 7]
    if max == '-' then max = false end
    local op
    if kind == 'C' then
      op = {kind = kind, delta = P(ARGV[k + 6]), period = ARGV[k + 4], off = ARGV[k + 5],
        max = max, c = false, used = 0, held = 0, s = false, e = false, dirty = false,
        p = false, h = false, w = false, raw = false}
    elseif kind == 'R' then
      op = {kind = kind, delta = P(ARGV[k + 6]), width = ARGV[k + 4] + 0,
        n = ARGV[k + 5] + 0, max = max, c = false, used = 0, held = 0, hd = false,
        tl = false, bv = false, dirty = false, p = false, h = false, w = false, raw = false}
    else
      op = {kind = kind, delta = P(ARGV[k + 6]), max = max, c = false, used = 0, held = 0,
        dirty = false, p = false, h = false, w = false}
    end
    if lkey then op.desc = ARGV[k + 8] end
    local h = hashof(hk)
    op.c = h.cs[cid] or newc(h, cid, op, op)
    ops[i] = op
  end
  -- Every new counter of the batch is read with one HMGET per scope.
  -- (Numeric loops: ipairs and pairs call into C at every step.)
  for i = 1, #hlist do
    local h = hlist[i]
    local l = h.list
    local n = #l
    local f
    if n == 1 then
      f = call('HMGET', h.key, 'x', l[1].p)
    elseif n == 2 then
      f = call('HMGET', h.key, 'x', l[1].p, l[2].p)
    else
      local t = {'x'}
      for j = 1, n do t[j + 1] = l[j].p end
      f = call('HMGET', h.key, unpack(t))
    end
    readhash(h, f[1])
    for j = 1, n do fill(l[j], f[j + 1]) end
  end

  local charges
  if action == 's' then
    charges = {}
    local num, den = P(lp1), P(lp2)
    for i = 1, lease.n do
      local h = lease.holds[i]
      local c = load(h.hk, h.cid, parsew(h.w, {}))
      local held = P(call('HGET', h.hk, h.cid .. '|h' .. lid))
      local charged = 0
      if c.w.kind ~= 'X' then charged = share(held, num, den) end
      charges[i] = {c = c, held = held, charged = charged, desc = h.desc}
      local also = 0
      for _, op in ipairs(ops) do
        if op.c == c then also = op.delta end
      end
      local u = add(c.used, charged)
      if not u or not add(u, also) then return 'ERR overflow hold ' .. h.desc end
    end
  end

  local holding = action == 'o' or action == 'g'
  local allfit = true
  for i = 1, nops do
    local op = ops[i]
    local c = op.c
    local d = op.delta
    -- Every value below 2^53 and so their sum: plain numbers, inline (the
    -- calls to add and within cost ~0.1 µs per op). A sum at or past 2^53
    -- compares as one (doubles round monotonically), and takes the exact path.
    -- (A max of 15 digits or fewer is a number; of 17 or more, above 2^53;
    -- of 16, either.)
    local s = not big and c.used + c.held + d
    if s and s < TWO53 then
      local m = op.max
      if d ~= 0 and m and #m < 17 and (#m < 16 and s > maxof(op) or #m == 16
          and not within(s, op)) then
        allfit = false
      end
    else
      local target = holding and c.held or c.used
      if not add(target, d) and (mode == 'f' or not op.max) then
        return 'ERR overflow ' .. i
      end
      if d ~= 0 and op.max then
        s = add(c.used, c.held)
        s = s and add(s, d)
        if not s or not within(s, op) then allfit = false end
      end
    end
  end

  local cooling, ckeys = nil, nil
  if ncool > 0 then cooling, ckeys = {}, {} end
  for i = 1, ncool do
    local k = base + nops * OPF + (i - 1) * 2
    ckeys[i] = {key = ARGV[k + 1], start = ARGV[k + 2]}
    local u = tonumber(call('GET', ARGV[k + 1]))
    if u and u > now then
      cooling[i] = u
      allfit = false
    else
      cooling[i] = false
    end
  end

  -- The balance (rule 10): read whole (its debt 'd', the latest time a batch
  -- applied to it 't', grants 'g<id digest>' = "amount spent effective
  -- expiry priority granted rank sealed-id", holds 'h<lease>' = "amount
  -- expiry"), then decided like an op.
  local bal, bfits, bunc = nil, true, 0
  local bamount, bod = 0, 0
  local bt, bheld, bremaining, blive, bsort
  if bkey then
    bal = {debt = 0, seen = false, grants = {}, byd = {}, holds = {}, htotal = 0,
      del = {}, ddirty = false, tdirty = false}
    local all = call('HGETALL', bkey)
    for i = 1, #all, 2 do
      local f, v = all[i], all[i + 1]
      local c = string.byte(f, 1)
      if f == 'd' then
        bal.debt = P(v)
      elseif f == 't' then
        bal.seen = v + 0
      elseif c == 103 then
        local a, sp, ef, ex, pr, ga, r, ct = string.match(v,
          '^(%d+) (%d+) (%-?%d+) (%S+) (%d+) (%-?%d+) (%d+) (%x+)$')
        if a then
          local g = {d = string.sub(f, 2), amt = a, amount = P(a), spent = P(sp), effs = ef,
            eff = ef + 0, exs = ex, exp = ex ~= '-' and ex + 0 or false, prs = pr, prio = pr + 0,
            granted = ga, r = r + 0, ct = ct, dirty = false}
          bal.grants[#bal.grants + 1] = g
          bal.byd[g.d] = g
        end
      elseif c == 104 then
        local a, ex = string.match(v, '^(%d+) (%-?%d+)$')
        if a then
          local h = {amount = P(a), exp = ex + 0, dirty = false}
          bal.holds[string.sub(f, 2)] = h
          bal.htotal = add(bal.htotal, h.amount) or maxu()
        end
      end
    end
    -- Consumption order: priority, expiry (none last), start, then the ids'
    -- bytes, kept as each grant's rank among grants tied on the rest.
    bsort = function()
      table.sort(bal.grants, function(x, y)
        if x.prio ~= y.prio then return x.prio < y.prio end
        if (not x.exp) ~= (not y.exp) then return not y.exp end
        if x.exp and x.exp ~= y.exp then return x.exp < y.exp end
        if x.eff ~= y.eff then return x.eff < y.eff end
        if x.r ~= y.r then return x.r < y.r end
        return x.d < y.d
      end)
    end
    bsort()
    -- Grants are read at the later of now and the latest time a batch
    -- applied (a clock stepping back never revives an expired grant); holds
    -- at now.
    bt = function()
      if bal.seen and bal.seen > now then return bal.seen end
      return now
    end
    blive = function(g, t)
      return g.eff <= t and (not g.exp or t < g.exp)
    end
    bheld = function()
      local s = 0
      for _, h in pairs(bal.holds) do
        if h.exp > now then s = add(s, h.amount) or maxu() end
      end
      return s
    end
    bremaining = function()
      local t, s = bt(), 0
      for _, g in ipairs(bal.grants) do
        if blive(g, t) then s = add(s, sub(g.amount, g.spent)) or maxu() end
      end
      return s
    end
    if bact == 'g' then
      local gd = ARGV[bargs + 1]
      local old = bal.byd[gd]
      if old then
        if old.amt ~= ARGV[bargs + 2] or old.effs ~= ARGV[bargs + 3]
            or old.exs ~= ARGV[bargs + 4] or old.prs ~= ARGV[bargs + 5] then
          return 'ERR grant'
        end
        bal.replay = old.granted
      else
        local tot = P(ARGV[bargs + 2])
        for _, g in ipairs(bal.grants) do
          if tot then tot = add(tot, g.amount) end
        end
        if not tot then return 'ERR overflow balance' end
        local eff, ex, pr = ARGV[bargs + 3] + 0, ARGV[bargs + 4], ARGV[bargs + 5] + 0
        ex = ex ~= '-' and ex + 0 or false
        local tied = {}
        for _, g in ipairs(bal.grants) do
          if g.prio == pr and g.exp == ex and g.eff == eff then tied[#tied + 1] = g end
        end
        if #tied > 0 then
          -- Only the caller reads ids: it names the order of every tied
          -- grant and this one, checked to be of exactly these grants.
          local order, rank, n = ARGV[bargs + 7], {}, 0
          local ok = order ~= '-'
          if ok then
            for d in string.gmatch(order, '[^,]+') do
              n = n + 1
              rank[d] = n
            end
            ok = n == #tied + 1 and rank[gd] ~= nil
            for _, g in ipairs(tied) do ok = ok and rank[g.d] ~= nil end
          end
          if not ok then
            local w = {'TIE'}
            for _, g in ipairs(tied) do
              w[#w + 1] = g.d
              w[#w + 1] = g.ct
            end
            return table.concat(w, ' ')
          end
          bal.rank, bal.tied = rank, tied
        end
      end
    elseif bact == 'd' then
      bamount, bod = P(ARGV[bargs + 1]), P(ARGV[bargs + 2])
      if not bamount or not bod then return 'ERR overflow balance' end
      if (action == 'o' or action == 'g') and not add(bal.htotal, bamount) then
        return 'ERR overflow balance'
      end
      if mode ~= 'f' and bamount ~= 0 then
        local need = add(bamount, bheld())
        need = need and add(need, bal.debt)
        bfits = need and cmp(need, bremaining()) <= 0 or false
      end
    end
    allfit = allfit and bfits
  end

  -- The balance's part of an answer: 'B', remaining, held, debt, whether
  -- the debit fit, what was uncovered, then every grant not expired with
  -- something left, in order (sealed id, amount, spent, effective, expiry,
  -- priority, granted), then the time a replayed grant was first made or '-'.
  local bstate
  if bal then
    -- (Made only with a balance: a closure made in apply costs every call.)
    bstate = function(out, fits, unc, replay)
      local o = #out
      out[o + 1], out[o + 2], out[o + 3] = 'B', N(bremaining()), N(bheld())
      out[o + 4], out[o + 5], out[o + 6] = N(bal.debt), fits and 1 or 0, N(unc)
      local t, list = bt(), {}
      for _, g in ipairs(bal.grants) do
        if cmp(g.spent, g.amount) < 0 and (not g.exp or t < g.exp) then list[#list + 1] = g end
      end
      o = o + 7
      out[o] = #list
      for _, g in ipairs(list) do
        out[o + 1], out[o + 2], out[o + 3], out[o + 4] = g.ct, N(g.amount), N(g.spent), g.effs
        out[o + 5], out[o + 6], out[o + 7] = g.exs, g.prs, g.granted
        o = o + 7
      end
      out[o + 1] = replay or '-'
      return out
    end
  end

  if bal and bal.replay then
    -- A grant already made: nothing changes.
    return bstate({'OK', 1, now, 0, 0, 0}, true, 0, bal.replay)
  end

  local applied
  if mode == 'c' then applied = false
  elseif mode == 'w' then applied = allfit
  else applied = true end

  -- Phase 2: apply the whole batch, or nothing.
  local settled
  local leaseexp = nil
  if applied then
    if action == 'o' then
      local exp = tonumber(lp1)
      leaseexp = exp
      local n = 0
      local fields = {'o', owner, 'od', ownerdesc, 'op', S(now), 'ex', lp1, 'st', '0'}
      for i, op in ipairs(ops) do
        if op.delta ~= 0 then
          addhold(op.c, exp, op.delta)
          n = n + 1
          for _, x in ipairs({'k' .. n, op.c.h.key, 'c' .. n, op.c.p, 'w' .. n, specof(i),
            'd' .. n, op.desc}) do fields[#fields + 1] = x end
        end
      end
      fields[#fields + 1] = 'n'
      fields[#fields + 1] = tostring(n)
      if lp2 ~= '-' then
        fields[#fields + 1] = 'dl'
        fields[#fields + 1] = lp2
        call('ZADD', odkey, tonumber(lp2), lid)
      end
      call('HSET', lkey, unpack(fields))
    elseif action == 'r' then
      local exp = tonumber(lp1)
      leaseexp = exp
      for i = 1, lease.n do
        local h = lease.holds[i]
        local c = load(h.hk, h.cid, parsew(h.w, {}))
        if call('HEXISTS', h.hk, h.cid .. '|h' .. lid) == 1 then
          call('ZADD', h.hk .. ':x', exp, h.cid .. '|' .. lid)
          c.zchg = true
          c.dirty = true
        end
      end
      call('HSET', lkey, 'ex', lp1)
    elseif action == 'g' then
      leaseexp = lexp
      local n = lease.n
      for i, op in ipairs(ops) do
        if op.delta ~= 0 then
          addhold(op.c, lexp, op.delta)
          local known = false
          for j = 1, n do
            local h = lease.holds[j]
            if h and h.hk == op.c.h.key and h.cid == op.c.p then known = true end
          end
          if not known then
            n = n + 1
            lease.holds[n] = {hk = op.c.h.key, cid = op.c.p}
            call('HSET', lkey, 'k' .. n, op.c.h.key, 'c' .. n, op.c.p, 'w' .. n, specof(i),
              'd' .. n, op.desc)
          end
        end
      end
      call('HSET', lkey, 'n', tostring(n))
    elseif action == 's' then
      leaseexp = lexp
      settled = {}
      for i = 1, lease.n do
        local ch = charges[i]
        removehold(ch.c)
        addusage(ch.c, ch.charged)
        settled[#settled + 1] = ch.desc .. ' ' .. S(ch.held) .. ' ' .. S(ch.charged)
      end
      for _, op in ipairs(ops) do addusage(op.c, op.delta) end
      call('HSET', lkey, 'st', '1')
      call('ZREM', odkey, lid)
    else
      for i = 1, nops do
        local op = ops[i]
        addusage(op.c, op.delta)
      end
    end
    if bal then
      -- Expired holds go; the balance's time moves on.
      for l, h in pairs(bal.holds) do
        if h.exp <= now then
          bal.del[#bal.del + 1] = 'h' .. l
          bal.holds[l] = nil
        end
      end
      if not bal.seen or now > bal.seen then
        bal.seen = now
        bal.tdirty = true
      end
      -- Consume n: live grants in order, then debt up to od; returns what
      -- was left uncovered.
      local function consume(n, od)
        local left, t = n, bt()
        for _, g in ipairs(bal.grants) do
          if left == 0 then break end
          if blive(g, t) then
            local l = sub(g.amount, g.spent)
            local take = cmp(left, l) <= 0 and left or l
            if take ~= 0 then
              g.spent = add(g.spent, take)
              g.dirty = true
              left = sub(left, take)
            end
          end
        end
        local room = 0
        if cmp(od, bal.debt) > 0 then room = sub(od, bal.debt) end
        local owed = cmp(left, room) <= 0 and left or room
        if owed ~= 0 then
          bal.debt = add(bal.debt, owed)
          bal.ddirty = true
        end
        return sub(left, owed)
      end
      local function hold(exp, n)
        if n == 0 then return end
        local h = bal.holds[lid]
        if h and h.exp == exp then
          h.amount = add(h.amount, n)
        else
          h = {amount = n, exp = exp}
          bal.holds[lid] = h
        end
        h.dirty = true
      end
      if bact == 'g' then
        local amt = ARGV[bargs + 2]
        local a = P(amt)
        local ex = ARGV[bargs + 4]
        -- Only a live grant pays the debt off (one not yet effective or
        -- already expired leaves it).
        local t = bt()
        local glive = ARGV[bargs + 3] + 0 <= t and (ex == '-' or t < ex + 0)
        local repaid = 0
        if glive then repaid = cmp(a, bal.debt) <= 0 and a or bal.debt end
        if repaid ~= 0 then
          bal.debt = sub(bal.debt, repaid)
          bal.ddirty = true
        end
        local g = {d = ARGV[bargs + 1], amt = amt, amount = a, spent = repaid,
          effs = ARGV[bargs + 3], eff = ARGV[bargs + 3] + 0, exs = ex,
          exp = ex ~= '-' and ex + 0 or false, prs = ARGV[bargs + 5], prio = ARGV[bargs + 5] + 0,
          granted = S(now), r = 0, ct = ARGV[bargs + 6], dirty = true}
        if bal.rank then
          g.r = bal.rank[g.d]
          for _, o in ipairs(bal.tied) do
            o.r = bal.rank[o.d]
            o.dirty = true
          end
        end
        bal.grants[#bal.grants + 1] = g
        bsort()
      elseif action == '-' then
        bunc = consume(bamount, bod)
      elseif action == 'o' then
        hold(tonumber(lp1), bamount)
        if bamount ~= 0 then call('HSET', lkey, 'bk', bkey) end
      elseif action == 'g' then
        hold(lexp, bamount)
        if bamount ~= 0 and not lease.bk then call('HSET', lkey, 'bk', bkey) end
      elseif action == 'r' then
        local h = bal.holds[lid]
        if h then
          h.exp = tonumber(lp1)
          h.dirty = true
        end
      elseif action == 's' then
        local h = bal.holds[lid]
        local held = h and h.amount or 0
        if h then
          bal.holds[lid] = nil
          bal.del[#bal.del + 1] = 'h' .. lid
        end
        local kept = share(held, P(lp1), P(lp2))
        bunc = add(consume(kept, bod), consume(bamount, bod)) or maxu()
      end
      -- Write back what changed; the hash lives the lifetime TTL past this
      -- write, or past its last hold if later (only ever raised).
      local fields = {}
      if bal.ddirty or bal.tdirty then
        fields[#fields + 1] = 'd'
        fields[#fields + 1] = S(bal.debt)
        fields[#fields + 1] = 't'
        fields[#fields + 1] = S(bal.seen)
      end
      for _, g in ipairs(bal.grants) do
        if g.dirty then
          fields[#fields + 1] = 'g' .. g.d
          fields[#fields + 1] = g.amt .. ' ' .. S(g.spent) .. ' ' .. g.effs .. ' ' .. g.exs .. ' '
            .. g.prs .. ' ' .. g.granted .. ' ' .. fmt('%d', g.r) .. ' ' .. g.ct
        end
      end
      local ttl = ARGV[6] + margin
      for l, h in pairs(bal.holds) do
        if h.dirty then
          fields[#fields + 1] = 'h' .. l
          fields[#fields + 1] = S(h.amount) .. ' ' .. fmt('%d', h.exp)
        end
        if h.exp - now + margin > ttl then ttl = h.exp - now + margin end
      end
      if #bal.del > 0 then call('HDEL', bkey, unpack(bal.del)) end
      if #fields > 0 then
        call('HSET', bkey, unpack(fields))
        local cur = call('PTTL', bkey)
        if cur < ttl then call('PEXPIRE', bkey, ttl) end
      end
    end
    for i = 1, ncool do
      local ck = ckeys[i]
      if ck.start ~= '-' then
        local t = tonumber(ck.start)
        local u = tonumber(call('GET', ck.key))
        if not u or u < t then u = t end
        call('SET', ck.key, S(u), 'PX', math.max(1, u - now + margin))
        if u > now then cooling[i] = u end
      end
    end
    if leaseexp then
      -- The lease record lives a horizon past its expiry (rule 7).
      local ttl = math.max(1, leaseexp + horizon - now + margin)
      call('PEXPIRE', lkey, ttl)
      if call('EXISTS', odkey) == 1 and call('PTTL', odkey) < ttl then
        call('PEXPIRE', odkey, ttl)
      end
    end
  end

  -- Write back, one scope hash at a time: one HDEL (what left), one HSET
  -- (every counter that changed, packed), and PEXPIRE unless the hash
  -- already lives long enough. A hash lives as long as its longest-lived
  -- counter needs (a calendar counter until its period ends, a rolling one
  -- until its newest bucket leaves, a lifetime one the lifetime TTL past its
  -- write, each hold until it expires; plus the margin): its TTL is only
  -- ever raised, never lowered, so a write of a short-lived counter never
  -- cuts a long-lived one's life. On the server's clock the hash records the
  -- expiry it set last (field x, written with every PEXPIRE; Redis's own
  -- clock only moves on after TIME, so the key lives at least that long) and
  -- a write that would not move it later sends no PEXPIRE; on the batch's
  -- clock the script reads PTTL instead. The scope's hold-expiry set (hk:x)
  -- gets the hash's TTL with every PEXPIRE. A batch that does not apply
  -- writes nothing back (rule 2).
  for i = 1, applied and #hlist or 0 do
    local h = hlist[i]
    local hk = h.key
    -- (Sized for two or four counters and x: a table that grows is
    -- reallocated.)
    local fields, n, del = nil, 0, nil
    if #h.list > 2 then
      fields = {false, false, false, false, false, false, false, false, false, false}
    else
      fields = {false, false, false, false, false, false}
    end
    local ends, zchg, any, zrem, grow = nil, false, false, nil, nil
    local l = h.list
    for j = 1, #l do
      local c = l[j]
      if c.dirty then
        any = true
        local w = c.w
        if c.hdel then
          if del then
            for _, f in ipairs(c.hdel) do del[#del + 1] = f end
          else
            del = c.hdel
          end
        end
        if c.zrem then
          if zrem then
            for _, m in ipairs(c.zrem) do zrem[#zrem + 1] = m end
          else
            zrem = c.zrem
          end
        end
        if c.zchg then zchg = true end
        if c.used == 0 and c.held == 0 then
          -- Nothing left to count: reclaim the counter's field.
          del = del or {}
          del[#del + 1] = c.p
        else
          fields[n + 1], fields[n + 2], n = c.p, pack(c), n + 2
          local bs = c.bset
          if bs then fields[n + 1], fields[n + 2], n = bs[2], S(bs[3]), n + 2 end
          local e = now
          if w.kind == 'C' then
            -- An ended period stays readable, unrolled, for `depth`
            -- periods (rule 11).
            e = c.e + depth * periodlen(w.period)
          elseif w.kind == 'R' then
            e = (c.hd + w.n) * w.width
          elseif w.kind == 'L' then
            e = now + ARGV[6]
            -- Moved, it moves a little further (a day, or a sixteenth of the
            -- lifetime TTL if less): the admits until then need no PEXPIRE
            -- (one every admit cost ~1.5 µs, BENCHMARKS.md).
            local g = e + math.min(86400000, floor(ARGV[6] / 16))
            if not grow or g > grow then grow = g end
          end
          if not ends or e > ends then ends = e end
        end
        if c.closed then
          local f, v, e = keepclosed(hk, c)
          if f then
            fields[n + 1], fields[n + 2], n = f, v, n + 2
            if not ends or e > ends then ends = e end
          end
        end
      end
    end
    if any then
      if h.delx then
        del = del or {}
        del[#del + 1] = 'x'
      end
      if del then call('HDEL', hk, unpack(del)) end
      local zkey = nil
      if zrem then
        zkey = hk .. ':x'
        call('ZREM', zkey, unpack(zrem))
      end
      if ends then
        if zchg then
          -- Holds were added or moved: the hash outlives the last of them.
          zkey = zkey or hk .. ':x'
          local last = tonumber(call('ZRANGE', zkey, -1, -1, 'WITHSCORES')[2])
          if last and last > ends then ends = last end
        end
        local ttl = ends - now + margin
        if ttl < 1 then ttl = 1 end
        local keep = false
        if srv then
          local x = h.x
          keep = not zchg and x and now + ttl <= x
          if not keep then
            if grow and grow - ends > 0 then ttl = ttl + (grow - ends) end
            if x and x - now > ttl then ttl = x - now end
            fields[n + 1], fields[n + 2], n = 'x', spack('<Bd', 35, now + ttl), n + 2
          end
        end
        call('HSET', hk, unpack(fields, 1, n))
        if not keep then
          if not srv then
            local cur = call('PTTL', hk)
            if cur > ttl then ttl = cur end
          end
          call('PEXPIRE', hk, ttl)
          call('PEXPIRE', zkey or hk .. ':x', ttl)
        end
      end
    end
  end

  -- Phase 3: report, as an array: a number below 2^53 goes out as an
  -- integer reply (no formatting here), anything larger as a decimal string.
  local out
  if ncool == 0 and not settled and nops == 2 then
    -- (The common shapes, 16 and 26 words, made at their size: every word is
    -- set; a table that grows is reallocated.)
    out = {'OK', applied and 1 or 0, now, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}
  elseif ncool == 0 and not settled and nops == 4 then
    out = {'OK', applied and 1 or 0, now, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
      0, 0, 0, 0, 0, 0}
  else
    out = {'OK', applied and 1 or 0, now, nops}
  end
  local o = 4
  for i = 1, nops do
    local op = ops[i]
    local c = op.c
    local delta = applied and 0 or op.delta
    local over = false
    if op.max then
      -- (Inline below 2^53, as in phase 1.)
      local s = not big and c.used + c.held + delta
      if s and s < TWO53 then
        local m = op.max
        over = #m < 17 and (#m < 16 and s > maxof(op) or #m == 16 and not within(s, op))
      else
        s = add(c.used, c.held)
        s = s and add(s, delta)
        over = (not s) or not within(s, op)
      end
    end
    local ps, ra, av = '-', '-', '-'
    if op.kind == 'C' then
      ps, ra = c.s, c.e
      if over and within(add(c.held, delta) or maxu(), op) then av = c.e end
    elseif op.kind == 'R' then
      ps = now - (op.n - 1) * op.width
      -- A counter not in Redis reads used = 0 here, and then over implies
      -- pending > max: both branches need the key.
      if c.used ~= 0 then ra = (c.tl + op.n) * op.width end
      local pending = over and (add(c.held, delta) or maxu())
      if over and within(pending, op) then
        -- pending <= max: what must leave is used - (max - pending).
        local room = sub(maxof(op), pending)
        local need = 0
        if cmp(c.used, room) > 0 then need = sub(c.used, room) end
        local freed = 0
        -- A rolling counter's bucket b: the newest is packed with the counter, a
        -- newest one that just moved to its field is still pending (bset).
        local function bucket(c, b)
          if b == c.hd then return c.bv end
          local bs = c.bset
          if bs and bs[1] == b then return bs[3] end
          return P(call('HGET', c.h.key, c.p .. '|b' .. b))
        end
        for b = c.tl, c.hd do
          freed = add(freed, bucket(c, b)) or maxu()
          if cmp(freed, need) >= 0 then
            av = (b + op.n) * op.width
            break
          end
        end
      end
    end
    if big then
      out[o + 1], out[o + 2], out[o + 3], out[o + 4], out[o + 5] = N(c.used), N(c.held), ps, ra, av
    else
      out[o + 1], out[o + 2], out[o + 3], out[o + 4], out[o + 5] = c.used, c.held, ps, ra, av
    end
    o = o + 5
  end
  out[o + 1] = ncool
  o = o + 1
  for i = 1, ncool do out[o + i] = cooling[i] or '-' end
  o = o + ncool
  if settled then
    out[o + 1] = #settled
    for i, s in ipairs(settled) do out[o + 1 + i] = s end
  else
    out[o + 1] = 0
  end
  if breport then bstate(out, bfits, bunc, nil) end

  if applied and ekey ~= '-' and ewrite then
    -- The ledger keeps the answer, which a replay returns: one SET with its
    -- TTL. (Every number in it is an integer below 2^53, which msgpack keeps
    -- exactly; a larger amount is already a decimal string.)
    call('SET', ekey, cmsgpack.pack(efp, now, out), 'PX', horizon + margin)
  end
  return out
end

-- The usage each counter of one scope hash counted in a calendar period
-- (rule 11): args are pairs (counter field, period start); one decimal
-- string each. The counter's own usage if it holds that period (rolled or
-- not), plus the total kept for it.
local function periods(hk, args)
  if not call then
    call, type, tonumber, floor, fmt, byte, spack, sunpack = globals()
  end
  big = false
  local out = {}
  for i = 1, #args / 2 do
    local cid, start = args[2 * i - 1], args[2 * i] + 0
    local total = 0
    local v = call('HGET', hk, cid)
    if v then
      local u, st
      if byte(v, 1) == 35 then
        local held
        u, held, st = sunpack('<xdddd', v)
      else
        local us, ss = string.match(v, '^(%d+) %d+ (%-?%d+) %-?%d+$')
        u, st = P(us), ss and ss + 0
      end
      if u and st == start then total = u end
    end
    local _, kept = parsekept(call('HGET', hk, cid .. '|p'))
    for _, x in ipairs(kept) do
      if x[1] == start then total = add(total, P(x[2])) or maxu() end
    end
    out[i] = S(total)
  end
  return out
end

-- FCALL_RO tollgate_periods_@V@ 1 <scope hash> <field> <start> ...
redis.register_function{function_name = 'tollgate_periods_@V@',
  callback = function(keys, args) return periods(keys[1], args) end, flags = {'no-writes'}}

-- FCALL tollgate_apply_@V@ 1 <the home slot's key, for routing> <args>.
redis.register_function('tollgate_apply_@V@', function(_, args) return apply(args) end)
