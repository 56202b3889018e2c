-- KEYS[1] record, KEYS[2] lock; ARGV[1] token, ARGV[2] record, ARGV[3] TTL (ms)
if redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('DEL', KEYS[2])
return 1
