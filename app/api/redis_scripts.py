"""The steps of a job's life on Redis that must be atomic, as Lua scripts (app/api/redis_jobs.py runs ADD, FINISH,
PROGRESS and POSITION, app/api/redis_backlog.py the rest).

A job is added with its backlog entry (ADD); a replica that takes the entry names itself the job's runner (TAKE);
from then on only the runner renews the entry (RENEW), writes progress (PROGRESS), hands the job back (RELEASE) or
ends it (FINISH), and a cancel ends it from anywhere (FINISH without a runner). The first end stands: a late
original and the replica that took its job over can't both finish it. While no replica has been given the job,
any replica reads its place in the backlog (POSITION).
"""

# Makes room (expired jobs, then the first finished) and adds the job and its backlog entry, atomically; or names
# the job its Idempotency-Key already has.
ADD = """
local now, ttl, max = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local id, prefix, idem = ARGV[4], ARGV[7], ARGV[8]
if idem ~= '' then
  local known = redis.call('GET', idem)
  if known and redis.call('EXISTS', prefix .. 'job:' .. known) == 1 then return {'known', known} end
end
local function drop(old)
  redis.call('DEL', prefix .. 'job:' .. old, prefix .. 'job:' .. old .. ':trace')
  redis.call('ZREM', KEYS[2], old)
end
for _, old in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - ttl)) do drop(old) end
while redis.call('SCARD', KEYS[1]) + redis.call('ZCARD', KEYS[2]) >= max and redis.call('ZCARD', KEYS[2]) > 0 do
  drop(redis.call('ZRANGE', KEYS[2], 0, 0)[1])
end
local unfinished = redis.call('SCARD', KEYS[1])
if unfinished >= max then return {'full', tostring(unfinished)} end
local entry = redis.call('XADD', KEYS[3], '*', 'id', id)
redis.call('HSET', prefix .. 'job:' .. id, 'meta', ARGV[5], 'state', ARGV[6], 'stream', KEYS[3], 'entry', entry)
redis.call('SADD', KEYS[1], id)
if idem ~= '' then redis.call('SET', idem, id) end
return {'added', id}
"""

# Ends a job once: the first outcome stands (a cancel from any replica, or its runner's end: ARGV[7] names the
# runner, '' for a cancel), and its backlog entry goes.
FINISH = """
if redis.call('EXISTS', KEYS[3]) == 0 or redis.call('HEXISTS', KEYS[3], 'outcome') == 1 then return 0 end
if ARGV[7] ~= '' and redis.call('HGET', KEYS[3], 'runner') ~= ARGV[7] then return 0 end
redis.call('HSET', KEYS[3], 'outcome', ARGV[2], 'final', ARGV[3])
local stream, entry = redis.call('HGET', KEYS[3], 'stream'), redis.call('HGET', KEYS[3], 'entry')
if stream then
  redis.call('XACK', stream, ARGV[8], entry)
  redis.call('XDEL', stream, entry)
end
redis.call('SREM', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
redis.call('EXPIRE', KEYS[3], ARGV[5])
redis.call('EXPIRE', KEYS[3] .. ':trace', ARGV[5])
if ARGV[6] ~= '' then redis.call('EXPIRE', ARGV[6], ARGV[5]) end
redis.call('PUBLISH', KEYS[3], 'finished')
return 1
"""

# Starts a run of the job here: it is the runner's from now on; its earlier run's progress is cleared.
TAKE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 'gone' end
if redis.call('HEXISTS', KEYS[1], 'outcome') == 1 then return 'done' end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'runner', ARGV[1], 'state', ARGV[3])
redis.call('DEL', KEYS[1] .. ':trace')
redis.call('PUBLISH', KEYS[1], 'progress')
if attempts > tonumber(ARGV[2]) then return 'exhausted' end
return 'run'
"""

# Renews the runner's entry (its idle time back to 0); 0 where another replica runs the job now, and
# {'ended', outcome, final} where it has ended while this replica ran it (a cancel from anywhere).
RENEW = """
if redis.call('HGET', KEYS[1], 'runner') ~= ARGV[1] then return 0 end
local outcome = redis.call('HGET', KEYS[1], 'outcome')
if outcome then return {'ended', outcome, redis.call('HGET', KEYS[1], 'final')} end
local stream, entry = redis.call('HGET', KEYS[1], 'stream'), redis.call('HGET', KEYS[1], 'entry')
redis.call('XCLAIM', stream, ARGV[2], ARGV[1], 0, entry, 'JUSTID')
return 1
"""

# The runner's progress; nothing is written where the job is no longer this replica's to run: 0 where another
# replica runs it now, {'ended', outcome, final} where it has ended (a cancel from anywhere).
PROGRESS = """
if redis.call('HGET', KEYS[1], 'runner') ~= ARGV[1] then return 0 end
local outcome = redis.call('HGET', KEYS[1], 'outcome')
if outcome then return {'ended', outcome, redis.call('HGET', KEYS[1], 'final')} end
redis.call('HSET', KEYS[1], 'state', ARGV[2])
if #ARGV > 2 then redis.call('RPUSH', KEYS[1] .. ':trace', unpack(ARGV, 3)) end
redis.call('PUBLISH', KEYS[1], 'progress')
return 1
"""

# Hands the runner's job back to the backlog, at its tail, as if never taken.
RELEASE = """
if redis.call('HGET', KEYS[1], 'runner') ~= ARGV[1] or redis.call('HEXISTS', KEYS[1], 'outcome') == 1 then
  return 0
end
local stream, entry = redis.call('HGET', KEYS[1], 'stream'), redis.call('HGET', KEYS[1], 'entry')
redis.call('XACK', stream, ARGV[2], entry)
redis.call('XDEL', stream, entry)
local again = redis.call('XADD', stream, '*', 'id', ARGV[3])
redis.call('HSET', KEYS[1], 'entry', again, 'state', ARGV[4])
redis.call('HDEL', KEYS[1], 'runner')
redis.call('HINCRBY', KEYS[1], 'attempts', -1)
redis.call('DEL', KEYS[1] .. ':trace')
redis.call('PUBLISH', KEYS[1], 'progress')
return 1
"""

# A job's place in its model's backlog while no replica has been given it: 1 + the entries not yet delivered to any
# replica that were added before its own (the consumer group's last-delivered id bounds the delivered ones); false
# once delivered, taken or ended (a replica's engine then tells its place, or it runs).
POSITION = """
if redis.call('HEXISTS', KEYS[1], 'outcome') == 1 or redis.call('HEXISTS', KEYS[1], 'runner') == 1 then
  return false
end
local stream, entry = redis.call('HGET', KEYS[1], 'stream'), redis.call('HGET', KEYS[1], 'entry')
if not stream then return false end
local start = '-'
local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', stream)
if ok then
  for _, group in ipairs(groups) do
    local fields = {}
    for i = 1, #group, 2 do fields[group[i]] = group[i + 1] end
    if fields['name'] == ARGV[1] and fields['last-delivered-id'] ~= '0-0' then
      start = '(' .. fields['last-delivered-id']
    end
  end
end
local ahead = #redis.call('XRANGE', stream, start, entry)
if ahead == 0 then return false end
return ahead
"""
