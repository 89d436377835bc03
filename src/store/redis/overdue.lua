-- tollgate: live leases past their deadline (see src/store/redis.rs).
-- KEYS[1]: the deadline index; ARGV: now ms, use server time, lease key prefix.
local now = tonumber(ARGV[1])
if ARGV[2] == '1' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)) do
  local r = redis.call('HMGET', ARGV[3] .. id, 'st', 'ex', 'od', 'op', 'dl')
  if r[1] == '0' and now < tonumber(r[2]) then
    out[#out + 1] = id
    out[#out + 1] = r[3]
    out[#out + 1] = r[4]
    out[#out + 1] = r[2]
    out[#out + 1] = r[5] or '-'
  else
    -- Settled, expired or forgotten: never live again.
    redis.call('ZREM', KEYS[1], id)
  end
end
return out
