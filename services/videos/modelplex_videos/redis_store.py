"""Jobs in Redis, for several videos replicas sharing one queue (``store: redis``).

Layout (prefix ``modelplex:videos:``):

- ``job:<id>``: a hash per job (the :class:`Job` fields, plus its worker, lease and queue entry);
- ``jobs:<principal>``: a sorted set of the principal's job ids by creation order (listing, pagination);
- ``queue:<principal>``: a stream per principal, read through the consumer group ``workers``.
  A worker takes an entry with XREADGROUP and acknowledges it when the job is finished; while it
  renders, its heartbeat resets the entry's idle time (XCLAIM). An entry idle longer than the
  lease belongs to a dead worker: another replica takes it over with XAUTOCLAIM and re-runs it;
- ``turns``: a sorted set principal -> when it was last served; workers read the principals'
  streams least-recently-served first, so one busy project cannot starve the others;
- ``idem:<principal>:<key>``: Idempotency-Key reservations, expiring after the TTL;
- ``expiries``: completed job ids by ``expires_at``, for the sweeper.

State changes that must not interleave (take, renew, complete, fail) are Lua scripts.
"""

from __future__ import annotations

import time
from dataclasses import fields

from redis import asyncio as aioredis
from redis.exceptions import ResponseError

from modelplex_videos.jobs import (
    COMPLETED,
    FAILED,
    IN_PROGRESS,
    MAX_ATTEMPTS,
    QUEUED,
    Job,
    Limits,
    idempotency_conflict,
    idempotency_mismatch,
    not_found,
    queue_full,
)

PREFIX = "modelplex:videos:"
GROUP = "workers"
_INT_FIELDS = {f.name for f in fields(Job) if f.type in ("int", int)}
_BOOL_FIELDS = {"expired", "has_reference"}

# KEYS: job, total counter, principal counter. ARGV: worker, lease_until.
_TAKE = """
if redis.call('HGET', KEYS[1], 'status') ~= 'queued' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'in_progress', 'worker', ARGV[1], 'lease_until', ARGV[2], 'progress', 0)
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('DECR', KEYS[2])
redis.call('DECR', KEYS[3])
return 1
"""
# Re-taking a job whose worker died (its entry was auto-claimed). KEYS: job. ARGV: worker, lease_until.
_RETAKE = """
if redis.call('HGET', KEYS[1], 'status') ~= 'in_progress' then return 0 end
redis.call('HSET', KEYS[1], 'worker', ARGV[1], 'lease_until', ARGV[2], 'progress', 0)
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
return 1
"""
# KEYS: job, stream. ARGV: worker, progress, lease_until, group.
_RENEW = """
if redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'status') ~= 'in_progress' then
  return 0
end
local progress = tonumber(redis.call('HGET', KEYS[1], 'progress') or '0')
redis.call('HSET', KEYS[1], 'progress', math.max(progress, tonumber(ARGV[2])), 'lease_until', ARGV[3])
redis.call('XCLAIM', KEYS[2], ARGV[4], ARGV[1], 0, redis.call('HGET', KEYS[1], 'entry'), 'JUSTID')
return 1
"""
# KEYS: job, stream, expiries. ARGV: worker, group, status, completed_at, expires_at, error_code, error_message.
_FINISH = """
if redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'status') ~= 'in_progress' then
  return 0
end
redis.call('HSET', KEYS[1], 'status', ARGV[3], 'completed_at', ARGV[4], 'expires_at', ARGV[5],
           'error_code', ARGV[6], 'error_message', ARGV[7], 'worker', '', 'finished_by', ARGV[1])
if ARGV[3] == 'completed' then
  redis.call('HSET', KEYS[1], 'progress', 100)
  redis.call('ZADD', KEYS[3], ARGV[5], redis.call('HGET', KEYS[1], 'id'))
end
redis.call('XACK', KEYS[2], ARGV[2], redis.call('HGET', KEYS[1], 'entry'))
return 1
"""
# KEYS: idem. ARGV: digest, ttl. Returns nil when reserved now, else {digest, job_id}.
_RESERVE = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'digest', ARGV[1], 'job_id', '')
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  return false
end
return redis.call('HMGET', KEYS[1], 'digest', 'job_id')
"""


def _key(*parts: str) -> str:
    return PREFIX + ":".join(parts)


def _decode(raw: dict[bytes, bytes]) -> Job | None:
    if not raw:
        return None
    values = {k.decode(): v.decode() for k, v in raw.items()}
    job = {}
    for field in fields(Job):
        value = values.get(field.name, "")
        if field.name in _BOOL_FIELDS:
            job[field.name] = value == "1"
        elif field.name in _INT_FIELDS:
            job[field.name] = int(value or 0)
        else:
            job[field.name] = value
    return Job(**job)


def _encode(job: Job) -> dict[str, str | int]:
    return {f.name: int(getattr(job, f.name)) if f.name in _BOOL_FIELDS else getattr(job, f.name) for f in fields(Job)}


class RedisJobStore:
    def __init__(self, url: str, idempotency_ttl_seconds: int) -> None:
        if not url:
            raise SystemExit("videos: store redis needs redis_url (e.g. redis://redis:6379/0)")
        self._redis = aioredis.from_url(url)
        self._ttl = idempotency_ttl_seconds
        self._take = self._redis.register_script(_TAKE)
        self._retake = self._redis.register_script(_RETAKE)
        self._renew = self._redis.register_script(_RENEW)
        self._finish = self._redis.register_script(_FINISH)
        self._reserve = self._redis.register_script(_RESERVE)

    # -- idempotency -----------------------------------------------------------------
    async def reserve(self, principal: str, key: str, digest: str) -> Job | None:
        found = await self._reserve(keys=[_key("idem", principal, key)], args=[digest, self._ttl])
        if found is None:
            return None
        earlier_digest, job_id = (value.decode() if value else "" for value in found)
        if earlier_digest != digest:
            raise idempotency_mismatch()
        if not job_id:
            raise idempotency_conflict()
        job = await self.get(principal, job_id)
        if job is None:
            raise not_found(job_id)
        return job

    async def unreserve(self, principal: str, key: str) -> None:
        idem = _key("idem", principal, key)
        if not (await self._redis.hget(idem, "job_id")):
            await self._redis.delete(idem)

    # -- jobs ------------------------------------------------------------------------
    async def create(self, job: Job, limits: Limits, key: str = "") -> Job:
        # The limits are read, then the job added: racing creates on several replicas may overshoot
        # the limit by a few jobs, which a queue bound tolerates.
        total, mine = await self._redis.mget(_key("queued"), _key("queued", job.principal))
        if int(total or 0) >= limits.max_queue:
            raise queue_full("on this server")
        if int(mine or 0) >= limits.max_queue_per_principal:
            raise queue_full("for this API key")
        stream = _key("queue", job.principal)
        try:
            await self._redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
        except ResponseError as exc:  # BUSYGROUP: it exists
            if "BUSYGROUP" not in str(exc):
                raise
        seq = await self._redis.incr(_key("seq"))
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(_key("job", job.id), mapping={**_encode(job), "seq": seq, "worker": "", "lease_until": 0})
            pipe.zadd(_key("jobs", job.principal), {job.id: seq})
            pipe.incr(_key("queued"))
            pipe.incr(_key("queued", job.principal))
            pipe.sadd(_key("principals"), job.principal)
            pipe.xadd(stream, {"job": job.id})
            if key:
                pipe.hset(_key("idem", job.principal, key), "job_id", job.id)
            await pipe.execute()
        return job

    async def get(self, principal: str, job_id: str) -> Job | None:
        job = _decode(await self._redis.hgetall(_key("job", job_id)))
        return job if job is not None and job.principal == principal else None

    async def list(self, principal: str, after: str, limit: int, order: str) -> tuple[list[Job], bool]:
        index = _key("jobs", principal)
        descending = order != "asc"
        low, high = "-inf", "+inf"
        if after:
            score = await self._redis.zscore(index, after)
            if score is None:
                raise not_found(after)
            low, high = (low, f"({int(score)}") if descending else (f"({int(score)}", high)
        if descending:
            ids = await self._redis.zrevrangebyscore(index, high, low, start=0, num=limit + 1)
        else:
            ids = await self._redis.zrangebyscore(index, low, high, start=0, num=limit + 1)
        jobs = [await self.get(principal, job_id.decode()) for job_id in ids[:limit]]
        return [job for job in jobs if job is not None], len(ids) > limit

    async def delete(self, principal: str, job_id: str) -> Job | None:
        job = await self.get(principal, job_id)
        if job is None:
            return None
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(_key("job", job_id))
            pipe.zrem(_key("jobs", principal), job_id)
            pipe.zrem(_key("expiries"), job_id)
            if job.status == QUEUED:  # its queue entry is skipped (and acknowledged) when read
                pipe.decr(_key("queued"))
                pipe.decr(_key("queued", principal))
            await pipe.execute()
        return job

    # -- workers -----------------------------------------------------------------------
    async def _principals_by_turn(self) -> list[str]:
        members = [m.decode() for m in await self._redis.smembers(_key("principals"))]
        turns = dict(await self._redis.zrange(_key("turns"), 0, -1, withscores=True))
        return sorted(members, key=lambda p: (turns.get(p.encode(), 0.0), p))

    async def claim(self, worker: str, lease_seconds: float) -> Job | None:
        principals = await self._principals_by_turn()
        lease_until = time.time() + lease_seconds
        for principal in principals:  # first, jobs whose worker died
            stream = _key("queue", principal)
            _, entries, _ = await self._redis.xautoclaim(
                stream, GROUP, worker, min_idle_time=int(lease_seconds * 1000), start_id="0-0", count=1
            )
            for entry_id, values in entries:
                if (job := await self._take_over(stream, entry_id, values, worker, lease_until, retake=True)):
                    return job
        for principal in principals:  # then new jobs, least recently served principal first
            stream = _key("queue", principal)
            replies = await self._redis.xreadgroup(GROUP, worker, {stream: ">"}, count=1)
            for _, entries in replies or []:
                for entry_id, values in entries:
                    if (job := await self._take_over(stream, entry_id, values, worker, lease_until, retake=False)):
                        turn = await self._redis.incr(_key("turn"))
                        await self._redis.zadd(_key("turns"), {principal: turn})
                        return job
        return None

    async def _take_over(self, stream, entry_id, values, worker, lease_until, retake: bool) -> Job | None:
        job_id = values[b"job"].decode()
        job_key = _key("job", job_id)
        job = _decode(await self._redis.hgetall(job_key))
        if job is None:  # deleted while queued
            await self._redis.xack(stream, GROUP, entry_id)
            return None
        await self._redis.hset(job_key, mapping={"entry": entry_id, "stream": stream})
        if retake and job.attempts >= MAX_ATTEMPTS:  # its workers kept dying: stop retrying
            await self._redis.hset(job_key, "worker", worker)
            await self.fail(job_id, worker, "internal_error", "Video generation failed repeatedly.")
            return None
        if retake:
            taken = await self._retake(keys=[job_key], args=[worker, lease_until])
        else:
            taken = await self._take(
                keys=[job_key, _key("queued"), _key("queued", job.principal)], args=[worker, lease_until]
            )
        if not taken:  # finished or failed meanwhile: nothing to do
            await self._redis.xack(stream, GROUP, entry_id)
            return None
        return _decode(await self._redis.hgetall(job_key))

    async def renew(self, job_id: str, worker: str, progress: int, lease_seconds: float) -> bool:
        job_key = _key("job", job_id)
        stream = await self._redis.hget(job_key, "stream")
        if stream is None:
            return False
        args = [worker, progress, time.time() + lease_seconds, GROUP]
        return bool(await self._renew(keys=[job_key, stream.decode()], args=args))

    async def _finish_job(self, job_id: str, worker: str, status: str, expires_at: int, code="", message="") -> bool:
        job_key = _key("job", job_id)
        stream = await self._redis.hget(job_key, "stream")
        if stream is None:
            return False
        args = [worker, GROUP, status, int(time.time()), expires_at, code, message]
        return bool(await self._finish(keys=[job_key, stream.decode(), _key("expiries")], args=args))

    async def complete(self, job_id: str, worker: str, expires_at: int) -> bool:
        return await self._finish_job(job_id, worker, COMPLETED, expires_at)

    async def fail(self, job_id: str, worker: str, code: str, message: str) -> None:
        await self._finish_job(job_id, worker, FAILED, 0, code, message)

    async def release(self, job_id: str, worker: str) -> None:
        """Back to the queue: a fresh entry, the old one acknowledged."""
        job = _decode(await self._redis.hgetall(_key("job", job_id)))
        raw = await self._redis.hmget(_key("job", job_id), "worker", "stream", "entry")
        if job is None or job.status != IN_PROGRESS or raw[0] is None or raw[0].decode() != worker:
            return
        stream, entry = raw[1].decode(), raw[2].decode()
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(_key("job", job_id), mapping={"status": QUEUED, "worker": "", "progress": 0})
            pipe.incr(_key("queued"))
            pipe.incr(_key("queued", job.principal))
            pipe.xack(stream, GROUP, entry)
            pipe.xadd(stream, {"job": job_id})
            await pipe.execute()

    async def expire_due(self, now: int) -> list[str]:
        ids = [i.decode() for i in await self._redis.zrangebyscore(_key("expiries"), "-inf", now)]
        for job_id in ids:
            if await self._redis.exists(_key("job", job_id)):
                await self._redis.hset(_key("job", job_id), "expired", 1)
            await self._redis.zrem(_key("expiries"), job_id)
        return ids

    async def close(self) -> None:
        await self._redis.aclose()
