"""Limits shared by every replica through Redis: one atomic Lua script per decision.

The scripts read Redis's own clock (TIME), so replicas with skewed clocks still
agree. All of one key's state shares a hash tag ({name}), so it lives on one
shard of a Redis Cluster too.
"""

from __future__ import annotations

import logging
import time

import redis.asyncio as aioredis
from redis.exceptions import BusyLoadingError, ConnectionError, TimeoutError

from modelplex_gatekeeper.keys import KeyRecord
from modelplex_gatekeeper.metrics import REDIS_FAILURES, REDIS_UP
from modelplex_gatekeeper.store import DENIED_BY, Decision, MemoryStore

log = logging.getLogger(__name__)

OUTAGES = (ConnectionError, TimeoutError, BusyLoadingError, OSError)

_COMMON = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local window = 60000
local function fmt(x) return string.format('%.3f', x) end
local function remaining(tat, limit)
  return math.max(0, math.floor((window - math.max(0, tat - now)) / (window / limit) + 1e-9))
end
"""

# KEYS: requests tat, tokens tat, slots zset, daily hash
# ARGV: rpm, tpm, max_concurrent, daily_tokens, cost, slot_ttl_ms, slot, peek
ADMIT = (
    _COMMON
    + """
local rpm, tpm, maxc, daily = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local cost, ttl, slot, peek = tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7], ARGV[8] == '1'
local tat_r = tonumber(redis.call('GET', KEYS[1]) or '0')
local tat_t = tonumber(redis.call('GET', KEYS[2]) or '0')
local function result(allowed, why, wait, used)
  local rr, resr, rt, rest = 0, 0, 0, 0
  if rpm > 0 then rr = remaining(tat_r, rpm); resr = math.ceil(math.max(0, tat_r - now)) end
  if tpm > 0 then rt = remaining(tat_t, tpm); rest = math.ceil(math.max(0, tat_t - now)) end
  return {allowed, why, math.max(allowed == 1 and 0 or 1, math.ceil(wait)), used, rr, resr, rt, rest}
end
if peek then return result(1, 0, 0, 0) end
local day = tostring(math.floor(now / 86400000))
if daily > 0 then
  local spent = tonumber(redis.call('HGET', KEYS[4], day) or '0')
  if spent >= daily then return result(0, 1, (tonumber(day) + 1) * 86400000 - now, spent) end
end
if maxc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  local held = redis.call('ZCARD', KEYS[3])
  if held >= maxc then return result(0, 2, 1000, held) end
end
local new_r, new_t = tat_r, tat_t
if rpm > 0 then
  new_r = math.max(tat_r, now) + window / rpm
  local over = new_r - now - window
  if over > 0 then return result(0, 3, over, rpm - remaining(tat_r, rpm)) end
end
if tpm > 0 and cost > 0 then
  new_t = math.max(tat_t, now) + cost * window / tpm
  local over = new_t - now - window
  if over > 0 then return result(0, 4, over, tpm - remaining(tat_t, tpm)) end
end
if rpm > 0 then
  tat_r = new_r
  redis.call('SET', KEYS[1], fmt(new_r), 'PX', math.ceil(new_r - now) + window)
end
if tpm > 0 and cost > 0 then
  tat_t = new_t
  redis.call('SET', KEYS[2], fmt(new_t), 'PX', math.ceil(new_t - now) + window)
end
if maxc > 0 then
  redis.call('ZADD', KEYS[3], now + ttl, slot)
  redis.call('PEXPIRE', KEYS[3], ttl)
end
return result(1, 0, 0, 0)
"""
)

# KEYS: tokens tat, slots zset, daily hash, usage stream
# ARGV: tpm, reserved, used, slot, then the usage record's field/value pairs
ACCOUNT = (
    _COMMON
    + """
local tpm, reserved, used, slot = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
if slot ~= '' then redis.call('ZREM', KEYS[2], slot) end
if tpm > 0 and used ~= reserved then
  local tat = tonumber(redis.call('GET', KEYS[1]) or '0') + (used - reserved) * window / tpm
  if tat > now then
    redis.call('SET', KEYS[1], fmt(tat), 'PX', math.ceil(tat - now) + window)
  else
    redis.call('DEL', KEYS[1])
  end
end
if used > 0 then
  redis.call('HINCRBY', KEYS[3], tostring(math.floor(now / 86400000)), used)
  redis.call('EXPIRE', KEYS[3], 172800)
end
if #ARGV > 4 then redis.call('XADD', KEYS[4], '*', unpack(ARGV, 5)) end
return 1
"""
)


def _keys(key: KeyRecord) -> list[str]:
    tag = f"mpx:{{{key.name}}}"
    return [f"{tag}:rpm", f"{tag}:tpm", f"{tag}:slots", f"{tag}:daily"]


class RedisStore:
    def __init__(self, url: str, slot_ttl_seconds: float, stream: str, timeout: float) -> None:
        self._client = aioredis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, retry_on_timeout=False
        )
        self._admit = self._client.register_script(ADMIT)
        self._account = self._client.register_script(ACCOUNT)
        self._slot_ttl_ms = int(slot_ttl_seconds * 1000)
        self._stream = stream

    async def _run_admit(self, key: KeyRecord, cost: int, slot: str, peek: bool) -> Decision:
        args = [key.rpm, key.tpm, key.max_concurrent, key.daily_tokens, cost, self._slot_ttl_ms, slot, int(peek)]
        allowed, why, wait, used, rr, resr, rt, rest = await self._admit(keys=_keys(key), args=args)
        return Decision(bool(allowed), DENIED_BY[why], wait, used, rr, resr, rt, rest, slot=slot)

    async def admit(self, key: KeyRecord, cost: int, slot: str) -> Decision:
        return await self._run_admit(key, cost, slot, False)

    async def peek(self, key: KeyRecord) -> Decision:
        return await self._run_admit(key, 0, "", True)

    async def account(self, key: KeyRecord, slot: str, reserved: int, used: int, record: dict) -> None:
        _, tpm_key, slots_key, daily_key = _keys(key)
        fields = [str(part) for pair in record.items() for part in pair]
        await self._account(
            keys=[tpm_key, slots_key, daily_key, self._stream], args=[key.tpm, reserved, used, slot, *fields]
        )

    async def release(self, key: KeyRecord, slot: str) -> None:
        await self._client.zrem(_keys(key)[2], slot)

    async def close(self) -> None:
        await self._client.aclose()


class StoreUnavailable(Exception):
    """Redis is down and the policy is to fail closed."""


class FailoverStore:
    """Redis while it answers; during an outage, this process's own limiter ("open") or a refusal ("closed").

    After a failure Redis is skipped for ``retry_seconds`` (no decision waits on a dead server), then
    tried again: recovery needs no restart. Slots and reservations go back to the store that made them.
    """

    def __init__(self, remote: RedisStore, local: MemoryStore, policy: str, retry_seconds: float) -> None:
        self.remote, self.local = remote, local
        self.policy = policy
        self._retry_seconds = retry_seconds
        self._down_until = 0.0
        self._down = False
        REDIS_UP.set(1)

    def _usable(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, exc: BaseException) -> None:
        self._down_until = time.monotonic() + self._retry_seconds
        REDIS_UP.set(0)
        if not self._down:
            self._down = True
            log.error(
                "redis unreachable; limits fall back",
                extra={"policy": self.policy, "error": type(exc).__name__},
            )

    def _answered(self) -> None:
        if self._down:
            self._down = False
            REDIS_UP.set(1)
            log.warning("redis answers again; limits are shared again")

    async def admit(self, key: KeyRecord, cost: int, slot: str) -> Decision:
        if self._usable():
            try:
                decision = await self.remote.admit(key, cost, "r" + slot)
            except OUTAGES as exc:
                self._failed(exc)
            else:
                self._answered()
                return decision
        return self._fallback(key, cost, slot)

    def _fallback(self, key: KeyRecord, cost: int, slot: str) -> Decision:
        if self.policy == "closed":
            REDIS_FAILURES.labels("refused").inc()
            raise StoreUnavailable
        REDIS_FAILURES.labels("local").inc()
        return self.local.admit_now(key, cost, "l" + slot)

    async def peek(self, key: KeyRecord) -> Decision:
        if self._usable():
            try:
                return await self.remote.peek(key)
            except OUTAGES as exc:
                self._failed(exc)
        return await self.local.peek(key)

    async def account(self, key: KeyRecord, slot: str, reserved: int, used: int, record: dict) -> None:
        if not slot.startswith("r"):
            await self.local.account(key, slot, reserved, used, record)
            return
        try:
            await self.remote.account(key, slot, reserved, used, record)
        except OUTAGES as exc:
            self._failed(exc)
            # The record is not lost: the local append-only file takes it.
            await self.local.account(key, slot, 0, 0, record)

    async def release(self, key: KeyRecord, slot: str) -> None:
        try:
            await (self.remote if slot.startswith("r") else self.local).release(key, slot)
        except OUTAGES:
            pass  # the slot expires in Redis on its own

    async def close(self) -> None:
        await self.remote.close()
        await self.local.close()
