"""The Lua scripts of the Redis index. Each index operation is one script call: one round trip,
atomic on the server, however many keys it covers. Inside a script, per-key work is batched into
a few multi-key commands (``HMGET``/``HSET`` of many fields, one ``ZADD`` per recency set), because
a Redis command called from Lua costs a few microseconds whatever it does.

Every script receives the key prefix as ``ARGV[1]`` and this node's id as ``ARGV[2]`` and builds
key names itself (README: key layout). Block keys travel as ``BlockKey.encode()`` bytes.

Locations of one block are one field of the hash ``P:loc``: records separated by ``\\x1e``, each
``tier \\x1f node \\x1f nbytes \\x1f checksum \\x1f offset`` (checksum and offset: decimal or empty;
they stay strings, as Lua numbers are doubles and would round a 64-bit hash; a record written by
an older version has no offset field). Tier, node and owner names may not contain
control characters, so the separators never appear inside them.

Liveness: a node listed in ``P:members`` whose ``P:n:<node>`` hash (its heartbeat, with a TTL) is
gone is dead, and its locations are invisible. A node that never registered is not a member and
counts as live, so locations inserted for it by hand behave as in the local index. This node is
always live to itself.

Leases: ``P:pins`` counts, per block, the live leases pinning it (plus one sentinel field ``''``).
Every lease is in the zset ``P:leases`` scored by its deadline (the server's clock, ms), with its
record ``P:lease:<id>``: ``node \\x1f owner \\x1d hits \\x1d`` and the call's packed keys, of which
the first ``hits`` are pinned. Each script that reads pins first *sweeps*: it ends the leases whose
deadline passed, so a daemon that died holding leases pins nothing once they are due, whoever asks
next. Records also carry a TTL (deadline + a grace period) so nothing outlives a
cluster that stops calling altogether.
"""

from __future__ import annotations

LEASE_GRACE_MS = 600_000  # lease records outlive their deadline this long, for the sweep to read

_PRELUDE = r"""
local P = ARGV[1]
local SELF = ARGV[2]
local GS, RS, US = '\29', '\30', '\31'
local LOC, PINS, LEASES = P .. ':loc', P .. ':pins', P .. ':leases'
local CHUNK = 1000
local unpack = unpack or table.unpack

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- redis.call(cmd, key, <head...>, items...) in slices, so no call passes more than ~2*CHUNK arguments
-- (Lua's C stack is limited). ``step`` keeps pairs together.
local function batched(cmd, key, items, step)
  step = step or 1
  local per = CHUNK * step
  for i = 1, #items, per do
    redis.call(cmd, key, unpack(items, i, math.min(i + per - 1, #items)))
  end
end

-- HMGET of many fields, slice by slice; returns one value (or false) per field.
local function hmget(key, fields)
  local out = {}
  for i = 1, #fields, CHUNK do
    local part = redis.call('HMGET', key, unpack(fields, i, math.min(i + CHUNK - 1, #fields)))
    for j = 1, #part do out[#out + 1] = part[j] end
  end
  return out
end

-- The keys of a call travel as one string (one argument instead of hundreds saves more client and
-- server time than the script takes): a 4-byte little-endian width, then the keys back to back when
-- they all have that width (the usual case: one namespace per request), or, with width 0, each
-- key preceded by its own 4-byte length.
local function u32(blob, pos)
  local b1, b2, b3, b4 = string.byte(blob, pos, pos + 3)
  return b1 + b2 * 256 + b3 * 65536 + b4 * 16777216
end

local function read_keys(blob)
  local out, size = {}, #blob
  if size == 0 then return out end
  local width = u32(blob, 1)
  local sub = string.sub
  if width > 0 then
    local n = 0
    for pos = 5, size, width do
      n = n + 1
      out[n] = sub(blob, pos, pos + width - 1)
    end
    return out
  end
  local pos, n = 5, 0
  while pos <= size do
    local len = u32(blob, pos)
    n = n + 1
    out[n] = sub(blob, pos + 4, pos + 3 + len)
    pos = pos + 4 + len
  end
  return out
end

local alive_cache = {}
local function alive(node)
  if node == SELF then return true end
  local a = alive_cache[node]
  if a == nil then
    a = redis.call('EXISTS', P .. ':n:' .. node) == 1 or redis.call('SISMEMBER', P .. ':members', node) == 0
    alive_cache[node] = a
  end
  return a
end

-- The record's "tier\31node" (its identity within the key) and its node. Plain finds, not
-- patterns: this runs for every location a call reads, and patterns cost several times more.
local find, sub = string.find, string.sub
local function where_of(record)
  local i = find(record, US, 1, true)
  local j = find(record, US, i + 1, true)
  return sub(record, 1, j - 1), sub(record, i + 1, j - 1)
end

-- The parts of ``value`` between separators ``sep`` (a value without one is its only part).
local function split(value, sep)
  if not value or value == '' then return {} end
  if not find(value, sep, 1, true) then return {value} end
  local out, pos = {}, 1
  while true do
    local k = find(value, sep, pos, true)
    if not k then out[#out + 1] = sub(value, pos); return out end
    out[#out + 1] = sub(value, pos, k - 1)
    pos = k + 1
  end
end

-- Records of one packed value, as a list (most keys have one location: no splitting then).
local function records(value) return split(value, RS) end

-- The live part of a packed value ('' when nothing is live; the value itself when all is live)
-- and where its records are: one "tier\31node" string for a single record (the common case, with
-- no table to allocate), else a list of them.
local function live(value)
  if not value or value == '' then return '', nil end
  if not find(value, RS, 1, true) then
    local where, node = where_of(value)
    if alive(node) then return value, where end
    return '', nil
  end
  local recs = records(value)
  local kept, wheres = {}, {}
  for i = 1, #recs do
    local where, node = where_of(recs[i])
    if alive(node) then
      kept[#kept + 1] = recs[i]
      wheres[#wheres + 1] = where
    end
  end
  if #kept == #recs then return value or '', wheres end
  return table.concat(kept, RS), wheres
end

-- Add ``delta`` to the pin count of each key in ``encs`` (a key may repeat); counts reaching 0 go.
local function add_pins(encs, delta)
  local sum, order = {}, {}
  for i = 1, #encs do
    local enc = encs[i]
    if sum[enc] == nil then sum[enc] = 0; order[#order + 1] = enc end
    sum[enc] = sum[enc] + delta
  end
  redis.call('HSETNX', PINS, '', 0)
  local current = hmget(PINS, order)
  local set, del = {}, {}
  for i = 1, #order do
    local count = (tonumber(current[i]) or 0) + sum[order[i]]
    if count > 0 then
      set[#set + 1] = order[i]; set[#set + 1] = count
    elseif current[i] then
      del[#del + 1] = order[i]
    end
  end
  if #set > 0 then batched('HSET', PINS, set, 2) end
  if #del > 0 then batched('HDEL', PINS, del) end
end

-- Pinned keys: P:pins keeps one sentinel field ('' is never an encoded key) so the hash is never
-- deleted and re-created; re-creating a hash of hundreds of fields costs more than using it.
local function pinned_count()
  redis.call('HSETNX', PINS, '', 0)
  return redis.call('HLEN', PINS) - 1
end

-- End the given leases (ids known to be in P:leases): unpin their keys, drop their records.
local function end_leases(ids)
  local unpin = {}
  for i = 1, #ids do
    local lk = P .. ':lease:' .. ids[i]
    local record = redis.call('GET', lk)
    if record then
      -- "node\31owner" \29 hits \29 the call's packed keys (the first ``hits`` are pinned)
      local a = find(record, GS, 1, true)
      local b = find(record, GS, a + 1, true)
      redis.call('ZREM', P .. ':o:' .. sub(record, 1, a - 1), ids[i])
      local hits = tonumber(sub(record, a + 1, b - 1))
      if hits > 0 then
        local encs = read_keys(sub(record, b + 1))
        for j = 1, hits do unpin[#unpin + 1] = encs[j] end
      end
      redis.call('DEL', lk)
    end
  end
  if #unpin > 0 then add_pins(unpin, -1) end
  if #ids > 0 then batched('ZREM', LEASES, ids) end
end

-- End every lease whose deadline is at or before ``now``.
local function sweep(now)
  local due = redis.call('ZRANGEBYSCORE', LEASES, '-inf', now)
  if #due > 0 then end_leases(due) end
end

-- Make ``encs[i]`` the most recently used keys, in that order, on each tier/node in
-- ``wheres[i]`` (one "tier\31node" or a list of them): one ZADD per recency set.
local function touch(encs, wheres)
  local base = redis.call('INCRBY', P .. ':seq', #encs) - #encs
  local by_where, order = {}, {}
  local function add(where, score, enc)
    local list = by_where[where]
    if not list then list = {}; by_where[where] = list; order[#order + 1] = where end
    local k = #list
    list[k + 1] = score; list[k + 2] = enc
  end
  for i = 1, #encs do
    local ws = wheres[i]
    if type(ws) == 'string' then
      add(ws, base + i, encs[i])
    else
      for j = 1, #ws do add(ws[j], base + i, encs[i]) end
    end
  end
  for i = 1, #order do batched('ZADD', P .. ':r:' .. order[i], by_where[order[i]], 2) end
end
"""

# ARGV: P, SELF, keys (packed), records ("tier\31node\31nbytes\31checksum\31offset" per key, joined by \29).
# Replaces each key's record on that tier/node; makes every location of the key most recent.
INSERT = _PRELUDE + r"""
local encs = read_keys(ARGV[3])
local recs_in = split(ARGV[4], GS)
local n = #encs
if n == 0 then return 0 end
local order, value, seen = {}, {}, {}
for i = 1, n do
  local enc = encs[i]
  if not seen[enc] then seen[enc] = true; order[#order + 1] = enc end
end
local current = hmget(LOC, order)
for i = 1, #order do value[order[i]] = current[i] or '' end
local new_tiers = {}
local touched = {}
for i = 1, n do
  local enc, record = encs[i], recs_in[i]
  local where = where_of(record)
  local recs = records(value[enc])
  local kept, replaced = {}, false
  for j = 1, #recs do
    if where_of(recs[j]) == where then replaced = true else kept[#kept + 1] = recs[j] end
  end
  kept[#kept + 1] = record
  value[enc] = table.concat(kept, RS)
  if not replaced then new_tiers[where] = true end
  touched[#touched + 1] = enc
end
local set = {}
for i = 1, #order do set[#set + 1] = order[i]; set[#set + 1] = value[order[i]] end
batched('HSET', LOC, set, 2)
for where in pairs(new_tiers) do
  local tier, node = string.match(where, '^([^\31]*)\31(.*)$')
  redis.call('SADD', P .. ':nt:' .. node, tier)
end
local wheres = {}
for i = 1, #touched do
  local recs, ws = records(value[touched[i]]), {}
  for j = 1, #recs do ws[j] = where_of(recs[j]) end
  wheres[i] = ws
end
touch(touched, wheres)
return n
"""

# ARGV: P, SELF, keys (packed) -> the live locations of each key ('' = miss), joined by \29.
LOOKUP = _PRELUDE + r"""
local encs = read_keys(ARGV[3])
local values = hmget(LOC, encs)
local out = {}
for i = 1, #encs do out[i] = live(values[i]) end  -- (the first result only)
return table.concat(out, GS)
"""

# ARGV: P, SELF, ttl_ms, grace_ms, lease_id, owner, keys (packed) -> the live locations of each
# hit, joined by \29 ('' = no hit). Pins the longest prefix of keys with a live location.
ACQUIRE = _PRELUDE + r"""
local ttl, grace = tonumber(ARGV[3]), tonumber(ARGV[4])
local lease_id, owner = ARGV[5], ARGV[6]
local now = now_ms()
sweep(now)
local deadline = now + ttl
local encs = read_keys(ARGV[7])
local values = hmget(LOC, encs)
local hits, hit_encs, wheres = {}, {}, {}
for i = 1, #encs do
  local v, ws = live(values[i])
  if v == '' then break end
  hits[i], hit_encs[i], wheres[i] = v, encs[i], ws
end
if #hits > 0 then
  touch(hit_encs, wheres)
  add_pins(hit_encs, 1)
end
-- The record keeps the call's packed keys as they came (cheaper than a list of the hits).
redis.call('SET', P .. ':lease:' .. lease_id, SELF .. US .. owner .. GS .. #hits .. GS .. ARGV[7],
           'PXAT', deadline + grace)
redis.call('ZADD', LEASES, deadline, lease_id)
local ok = P .. ':o:' .. SELF .. US .. owner
redis.call('ZADD', ok, deadline, lease_id)
local top = redis.call('ZRANGE', ok, -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', ok, top[2] + grace)
return table.concat(hits, GS)
"""

# ARGV: P, SELF, n, lease_id... -> the ids that were live (deadline not reached) and are now ended.
RELEASE = _PRELUDE + r"""
local n = tonumber(ARGV[3])
local now = now_ms()
sweep(now)
local ids = {}
for i = 1, n do
  if redis.call('ZSCORE', LEASES, ARGV[3 + i]) then ids[#ids + 1] = ARGV[3 + i] end
end
end_leases(ids)
return ids
"""

# ARGV: P, SELF, owner -> ids of this node's live leases of ``owner``, ended.
RELEASE_OWNER = _PRELUDE + r"""
local now = now_ms()
sweep(now)
local ids = redis.call('ZRANGE', P .. ':o:' .. SELF .. US .. ARGV[3], 0, -1)
end_leases(ids)
return ids
"""

# ARGV: P, SELF, tier ('' = any), node, by_node ('1'/'0'), keys (packed) -> how many keys lost a live
# location. Locations of dead nodes are deleted too but not counted: nobody could see them.
REMOVE = _PRELUDE + r"""
local tier, node, by_node = ARGV[3], ARGV[4], ARGV[5] == '1'
local encs = read_keys(ARGV[6])
local order, seen = {}, {}
for i = 1, #encs do
  local enc = encs[i]
  if not seen[enc] then seen[enc] = true; order[#order + 1] = enc end
end
local values = hmget(LOC, order)
local set, del, unlist, unorder = {}, {}, {}, {}
local removed = 0
for i = 1, #order do
  local recs = records(values[i])
  local kept, lost = {}, false
  for j = 1, #recs do
    local where, rnode = where_of(recs[j])
    local rtier = sub(where, 1, #where - #rnode - 1)
    if (tier == '' or rtier == tier) and (not by_node or rnode == node) then
      if not unlist[where] then unlist[where] = {}; unorder[#unorder + 1] = where end
      table.insert(unlist[where], order[i])
      if alive(rnode) then lost = true end
    else
      kept[#kept + 1] = recs[j]
    end
  end
  if #kept < #recs then
    if #kept == 0 then del[#del + 1] = order[i]
    else set[#set + 1] = order[i]; set[#set + 1] = table.concat(kept, RS) end
  end
  if lost then removed = removed + 1 end
end
if #set > 0 then batched('HSET', LOC, set, 2) end
if #del > 0 then batched('HDEL', LOC, del) end
for i = 1, #unorder do batched('ZREM', P .. ':r:' .. unorder[i], unlist[unorder[i]]) end
return removed
"""

# ARGV: P, SELF, "tier\31node", count -> up to count unpinned keys, least recently used first.
VICTIMS = _PRELUDE + r"""
local zk = P .. ':r:' .. ARGV[3]
local count = tonumber(ARGV[4])
sweep(now_ms())
local out = {}
local start = 0
local step = math.max(2 * count, 128)
while #out < count do
  local members = redis.call('ZRANGE', zk, start, start + step - 1)
  if #members == 0 then break end
  local pins = hmget(PINS, members)
  for j = 1, #members do
    if not pins[j] then
      out[#out + 1] = members[j]
      if #out == count then break end
    end
  end
  start = start + step
end
return out
"""

# ARGV: P, SELF, keys (packed) -> one character per key, '1' pinned, '0' not.
IS_PINNED = _PRELUDE + r"""
sweep(now_ms())
local encs = read_keys(ARGV[3])
local pins = hmget(PINS, encs)
local out = {}
for i = 1, #encs do out[i] = pins[i] and '1' or '0' end
return table.concat(out)
"""

# ARGV: P, SELF -> {blocks, pinned keys, live leases}.
STATS = _PRELUDE + r"""
sweep(now_ms())
return {redis.call('HLEN', LOC), pinned_count(), redis.call('ZCARD', LEASES)}
"""

# ARGV: P, SELF, ttl_ms, force ('1' rewrites the node hash), address, then name/value pairs of
# transport descriptors -> 1 if this node's heartbeat was still there, 0 if it had lapsed (or
# Redis lost it): then the caller republishes what this node holds.
HEARTBEAT = _PRELUDE + r"""
local nk = P .. ':n:' .. SELF
local existed = redis.call('EXISTS', nk)
if existed == 0 or ARGV[4] == '1' then
  redis.call('DEL', nk)
  redis.call('HSET', nk, 'addr', ARGV[5])
  for i = 6, #ARGV, 2 do
    redis.call('HSET', nk, 't:' .. ARGV[i], ARGV[i + 1])
  end
end
redis.call('PEXPIRE', nk, tonumber(ARGV[3]))
redis.call('SADD', P .. ':members', SELF)
return existed
"""

# ARGV: P, SELF -> {node, {field, value, ...}} for every live member.
NODES = _PRELUDE + r"""
local members = redis.call('SMEMBERS', P .. ':members')
local out = {}
for i = 1, #members do
  local h = redis.call('HGETALL', P .. ':n:' .. members[i])
  if #h > 0 then out[#out + 1] = {members[i], h} end
end
return out
"""

# ARGV: P, SELF, budget, only ('' = every dead member, else just that node) -> {locations deleted,
# 1 when nothing is left to clean}. Bounded so one call never blocks Redis for long.
REAP = _PRELUDE + r"""
local budget = tonumber(ARGV[3])
local members
if ARGV[4] == '' then members = redis.call('SMEMBERS', P .. ':members') else members = {ARGV[4]} end
local cleaned = 0
for i = 1, #members do
  local node = members[i]
  if redis.call('EXISTS', P .. ':n:' .. node) == 0 then
    local tk = P .. ':nt:' .. node
    local tiers = redis.call('SMEMBERS', tk)
    for j = 1, #tiers do
      local where = tiers[j] .. US .. node
      local zk = P .. ':r:' .. where
      local encs = redis.call('ZRANGE', zk, 0, budget - 1)
      if #encs > 0 then
        local values = hmget(LOC, encs)
        local set, del = {}, {}
        for k = 1, #encs do
          local recs = records(values[k])
          local kept = {}
          for r = 1, #recs do
            if where_of(recs[r]) ~= where then kept[#kept + 1] = recs[r] end
          end
          if #kept == 0 then
            if values[k] then del[#del + 1] = encs[k] end
          elseif #kept < #recs then
            set[#set + 1] = encs[k]; set[#set + 1] = table.concat(kept, RS)
          end
        end
        if #set > 0 then batched('HSET', LOC, set, 2) end
        if #del > 0 then batched('HDEL', LOC, del) end
        redis.call('ZREMRANGEBYRANK', zk, 0, #encs - 1)
      end
      cleaned = cleaned + #encs
      budget = budget - #encs
      if redis.call('EXISTS', zk) == 0 then redis.call('SREM', tk, tiers[j]) end
      if budget <= 0 then return {cleaned, 0} end
    end
    redis.call('SREM', P .. ':members', node)
  end
end
return {cleaned, 1}
"""

# ARGV: P, SELF, tier -> keys this node is listed with on ``tier`` (used when reconciling after an
# outage: the caller removes those it no longer holds).
OWN_KEYS = _PRELUDE + r"""
return redis.call('ZRANGE', P .. ':r:' .. ARGV[3] .. US .. SELF, 0, -1)
"""

# ARGV: P, SELF -> tiers this node is listed on.
OWN_TIERS = _PRELUDE + r"""
return redis.call('SMEMBERS', P .. ':nt:' .. SELF)
"""
