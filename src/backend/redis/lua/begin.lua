-- KEYS[1] record, KEYS[2] lock, KEYS[3] fence; ARGV[1] token,
-- ARGV[2] lock TTL (ms), ARGV[3] how long the fence outlives it (ms)
local record = redis.call('GET', KEYS[1])
if record then
  return {1, record}
end
if not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {2, redis.call('PTTL', KEYS[2])}
end
-- The fencing token: the server clock in microseconds, and past the key's
-- last token should the clock have stepped back.
local now = redis.call('TIME')
local fence = tonumber(now[1]) * 1000000 + tonumber(now[2])
local last = tonumber(redis.call('GET', KEYS[3]))
if last and last >= fence then
  fence = last + 1
end
fence = string.format('%.0f', fence)
redis.call('SET', KEYS[3], fence, 'PX', ARGV[2] + ARGV[3])
return {0, fence}
