"""A durable job queue: workers claim jobs under a lease; a job whose worker died is re-run.

Shared by the videos service (render jobs) and the edge (background responses). A job is a
dataclass of the caller's own (see :class:`JobKind`): its fields become SQLite columns or Redis
hash fields, so each user keeps typed records while the queue logic lives here once.

A job is visible only to the principal that created it. Workers *claim* a queued job under a
lease they keep renewing; a job whose lease ran out (its worker died) is claimed again and re-run
from the start. Claims are fair: the next job goes to the principal served longest ago, so one
busy principal cannot starve the others. Deleting a job is how a caller cancels it: the worker's
next renewal fails and it stops.

Two implementations of one interface (:class:`JobStore`): :class:`SQLiteJobStore` (one replica,
or several processes on one host; ``:memory:`` for one process) and :class:`RedisJobStore` (several
replicas, consumer groups). An idle worker need not claim to learn that nothing is queued:
:meth:`JobStore.depth` is one indexed count (one round trip in Redis), and :func:`until_claimable`
waits on it.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import grpc

from modelplex_kit.errors import ServiceError

QUEUED, IN_PROGRESS, COMPLETED, FAILED = "queued", "in_progress", "completed", "failed"
# A job whose worker died this many times is failed rather than retried forever.
MAX_ATTEMPTS = 3


@dataclass(slots=True, kw_only=True)
class JobRecord:
    """What the queue keeps for every job. A user's job dataclass inherits it and adds its own fields
    (``@dataclass(slots=True, kw_only=True)``; str, int or bool), so the bookkeeping is declared once."""

    id: str
    #: The caller's scope: only it sees the job.
    principal: str
    status: str = QUEUED
    progress: int = 0
    created_at: int = field(default_factory=lambda: int(time.time()))
    completed_at: int = 0
    expires_at: int = 0
    error_code: str = ""
    error_message: str = ""
    expired: bool = False
    #: How many workers claimed it (a lapsed lease is a worker that died).
    attempts: int = 0


#: Fields every job dataclass has (its other fields are its user's own).
BASE_FIELDS = tuple(f.name for f in fields(JobRecord))


@dataclass(frozen=True, slots=True)
class JobKind:
    """One user of the queue: its job dataclass and the words its errors and keys use."""

    #: The job dataclass (a :class:`JobRecord` plus its own fields), constructed with keyword arguments.
    record: type
    #: "video": in "No video found with id ..." and "Too many video jobs are queued ...".
    noun: str
    #: The request parameter naming a job ("video_id").
    id_param: str
    #: The error message of a job whose workers kept dying.
    gave_up: str
    #: Redis keys' prefix ("modelplex:videos:"); SQLite keeps each kind in its own file.
    redis_prefix: str

    def __post_init__(self) -> None:
        missing = set(BASE_FIELDS) - set(self.names)
        if missing:
            raise TypeError(f"{self.record.__name__} lacks the job fields {sorted(missing)}")

    @property
    def names(self) -> list[str]:
        return [f.name for f in fields(self.record)]

    def kinds_of(self, kind: str) -> set[str]:
        """Field names of one type ("int", "bool"), annotations being strings or types."""
        return {f.name for f in fields(self.record) if f.type in (kind, {"int": int, "bool": bool}.get(kind))}

    def make(self, values: dict[str, Any]) -> Any:
        return self.record(**values)

    def not_found(self, job_id: str) -> ServiceError:
        return ServiceError(
            grpc.StatusCode.NOT_FOUND,
            f"No {self.noun} found with id '{job_id}'.",
            param=self.id_param,
            code="not_found",
        )

    def queue_full(self, scope: str) -> ServiceError:
        return ServiceError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"Too many {self.noun} jobs are queued {scope}; retry after some have finished.",
            code="rate_limit_exceeded",
            headers={"retry-after": "1"},  # served in-process (the edge): a full queue drains, so say when to retry
        )


@dataclass(frozen=True, slots=True)
class Limits:
    max_queue: int
    max_queue_per_principal: int


@dataclass(frozen=True, slots=True)
class QueueDepth:
    """How much work a queue holds, over every principal."""

    #: Jobs waiting for a worker.
    queued: int = 0
    #: Jobs claimed by a worker and not finished (including one whose worker died, until it is re-claimed).
    running: int = 0


def idempotency_conflict() -> ServiceError:
    return ServiceError(
        grpc.StatusCode.ABORTED,
        "A request with this Idempotency-Key is still being processed; retry shortly.",
        code="idempotency_key_in_use",
    )


def idempotency_mismatch() -> ServiceError:
    return ServiceError(
        grpc.StatusCode.FAILED_PRECONDITION,
        "This Idempotency-Key was already used with a different request body; use a new key for a new request.",
        param="Idempotency-Key",
        code="idempotency_key_reused",
    )


class JobStore(Protocol):
    async def reserve(self, principal: str, key: str, digest: str) -> Any | None:
        """Claims an idempotency key for a request about to be created: None when it is ours now,
        the earlier job when the same request already created one; raises 422 (different body)
        or 409 (the first request is still being created)."""
        ...

    async def unreserve(self, principal: str, key: str) -> None: ...

    async def create(self, job: Any, limits: Limits, key: str = "") -> Any:
        """Inserts a queued job (429 when the queue is full) and ties the reserved key to it."""
        ...

    async def get(self, principal: str, job_id: str) -> Any | None: ...

    async def list(self, principal: str, after: str, limit: int, order: str) -> tuple[list[Any], bool]: ...

    async def delete(self, principal: str, job_id: str) -> Any | None: ...

    async def claim(self, worker: str, lease_seconds: float) -> Any | None:
        """The next job to render, fairly across principals, leased to ``worker``."""
        ...

    async def renew(self, job_id: str, worker: str, progress: int, lease_seconds: float) -> bool:
        """Extends the lease and records progress; False when the job is gone or no longer ``worker``'s."""
        ...

    async def complete(self, job_id: str, worker: str, expires_at: int) -> bool: ...

    async def fail(self, job_id: str, worker: str, code: str, message: str) -> None: ...

    async def release(self, job_id: str, worker: str) -> None:
        """Puts a claimed job back in the queue (the engine was unavailable); the claim does not count as an
        attempt, so a job waits out an engine that is down instead of failing after MAX_ATTEMPTS claims."""
        ...

    async def expire_due(self, now: int) -> list[str]:
        """Marks completed jobs past ``expires_at`` as expired; returns their ids (content to delete)."""
        ...

    async def depth(self) -> QueueDepth:
        """Queued and running jobs over every principal: cheap (an indexed count, counters in Redis), so idle
        workers and demand reports may ask often."""
        ...

    async def close(self) -> None: ...


async def until_claimable(store: JobStore, poll_seconds: float, look_seconds: float) -> None:
    """What an idle worker waits for before its next claim: a job queued (one ``depth()`` every
    ``poll_seconds``), or ``look_seconds`` gone by (a job whose worker died is running, not queued, until a
    claim takes it over). A store that cannot answer ends the wait: the claim reports the outage."""
    deadline = time.monotonic() + look_seconds
    while True:
        await asyncio.sleep(poll_seconds)
        if time.monotonic() >= deadline:
            return
        try:
            if (await store.depth()).queued > 0:
                return
        except Exception:
            return


_TEXT_COLUMNS = {"id": "TEXT UNIQUE NOT NULL", "principal": "TEXT NOT NULL", "status": "TEXT NOT NULL"}


def _column(kind: JobKind, name: str) -> str:
    ints = kind.kinds_of("int") | kind.kinds_of("bool")
    return _TEXT_COLUMNS.get(name) or ("INTEGER DEFAULT 0" if name in ints else "TEXT DEFAULT ''")


def _add_new_columns(db: sqlite3.Connection, kind: JobKind) -> None:
    """A job field added since the file was created becomes a column; old rows read the field's default."""
    existing = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
    for spec in fields(kind.record):
        if spec.name in existing:
            continue
        column = _column(kind, spec.name)
        if isinstance(spec.default, bool | int | str):
            column = column.split(" DEFAULT ")[0] + " DEFAULT " + _sql_literal(spec.default)
        db.execute(f"ALTER TABLE jobs ADD COLUMN {spec.name} {column}")


def _sql_literal(value: bool | int | str) -> str:
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return str(int(value))


def _schema(kind: JobKind) -> str:
    """The videos service's original table, generalised: one column per job field."""
    columns = [f"{name} {_column(kind, name)}" for name in kind.names]
    return f"""
CREATE TABLE IF NOT EXISTS jobs (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  {", ".join(columns)},
  worker TEXT DEFAULT '', lease_until REAL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_by_principal ON jobs (principal, seq);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, seq);
CREATE TABLE IF NOT EXISTS principals (principal TEXT PRIMARY KEY, last_claim INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS idempotency (
  principal TEXT NOT NULL, key TEXT NOT NULL, digest TEXT NOT NULL, job_id TEXT, created_at INTEGER NOT NULL,
  PRIMARY KEY (principal, key)
);
"""


class SQLiteJobStore:
    """Jobs in one SQLite file (WAL): for a single replica.

    Calls are short, indexed statements made on the event loop's thread; a
    transaction per method keeps each one atomic. Opening the store re-queues
    jobs left in progress (``requeue``): with one process running the jobs, their
    worker was that process before it restarted. A process that only queues and
    reads (the edge, beside the jobs process) opens it with ``requeue=False``.
    """

    def __init__(self, kind: JobKind, path: Path, idempotency_ttl_seconds: int, requeue: bool = True) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._kind = kind
        self._bools = kind.kinds_of("bool")
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_schema(kind))
        _add_new_columns(self._db, kind)
        self._idempotency_ttl = idempotency_ttl_seconds
        if requeue:
            self._db.execute(
                "UPDATE jobs SET status=?, worker='', lease_until=0 WHERE status=?", (QUEUED, IN_PROGRESS)
            )

    def _tx(self):
        return _Transaction(self._db)

    def _job(self, row: sqlite3.Row | None) -> Any | None:
        if row is None:
            return None
        values = {name: bool(row[name]) if name in self._bools else row[name] for name in self._kind.names}
        return self._kind.make(values)

    async def reserve(self, principal: str, key: str, digest: str) -> Any | None:
        now = int(time.time())
        with self._tx() as db:
            db.execute("DELETE FROM idempotency WHERE created_at < ?", (now - self._idempotency_ttl,))
            row = db.execute("SELECT * FROM idempotency WHERE principal=? AND key=?", (principal, key)).fetchone()
            if row is None:
                db.execute("INSERT INTO idempotency VALUES (?, ?, ?, NULL, ?)", (principal, key, digest, now))
                return None
        if row["digest"] != digest:
            raise idempotency_mismatch()
        if row["job_id"] is None:
            raise idempotency_conflict()
        job = await self.get(principal, row["job_id"])
        if job is None:
            raise self._kind.not_found(row["job_id"])
        return job

    async def unreserve(self, principal: str, key: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM idempotency WHERE principal=? AND key=? AND job_id IS NULL", (principal, key))

    async def create(self, job: Any, limits: Limits, key: str = "") -> Any:
        with self._tx() as db:
            queued = db.execute("SELECT COUNT(*) FROM jobs WHERE status=?", (QUEUED,)).fetchone()[0]
            if queued >= limits.max_queue:
                raise self._kind.queue_full("on this server")
            mine = db.execute(
                "SELECT COUNT(*) FROM jobs WHERE status=? AND principal=?", (QUEUED, job.principal)
            ).fetchone()[0]
            if mine >= limits.max_queue_per_principal:
                raise self._kind.queue_full("for this API key")
            names = self._kind.names
            db.execute(
                f"INSERT INTO jobs ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
                [getattr(job, name) for name in names],
            )
            if key:
                db.execute("UPDATE idempotency SET job_id=? WHERE principal=? AND key=?", (job.id, job.principal, key))
        return job

    async def get(self, principal: str, job_id: str) -> Any | None:
        row = self._db.execute("SELECT * FROM jobs WHERE id=? AND principal=?", (job_id, principal)).fetchone()
        return self._job(row)

    async def list(self, principal: str, after: str, limit: int, order: str) -> tuple[list[Any], bool]:
        descending = order != "asc"
        query, args = "SELECT * FROM jobs WHERE principal=?", [principal]
        if after:
            cursor = self._db.execute("SELECT seq FROM jobs WHERE id=? AND principal=?", (after, principal)).fetchone()
            if cursor is None:
                raise self._kind.not_found(after)
            query += " AND seq < ?" if descending else " AND seq > ?"
            args.append(cursor["seq"])
        query += f" ORDER BY seq {'DESC' if descending else 'ASC'} LIMIT ?"
        rows = self._db.execute(query, [*args, limit + 1]).fetchall()
        return [self._job(row) for row in rows[:limit]], len(rows) > limit

    async def delete(self, principal: str, job_id: str) -> Any | None:
        with self._tx() as db:
            job = self._job(db.execute("SELECT * FROM jobs WHERE id=? AND principal=?", (job_id, principal)).fetchone())
            if job is not None:
                db.execute("DELETE FROM jobs WHERE id=?", (job_id,))
        return job

    async def claim(self, worker: str, lease_seconds: float) -> Any | None:
        now = time.time()
        with self._tx() as db:
            while True:
                row = db.execute(
                    "SELECT j.* FROM jobs j LEFT JOIN principals p ON p.principal = j.principal "
                    "WHERE j.status=? OR (j.status=? AND j.lease_until < ?) "
                    "ORDER BY COALESCE(p.last_claim, 0), j.seq LIMIT 1",
                    (QUEUED, IN_PROGRESS, now),
                ).fetchone()
                if row is None:
                    return None
                if row["attempts"] >= MAX_ATTEMPTS:  # its workers kept dying: stop retrying
                    db.execute(
                        "UPDATE jobs SET status=?, error_code=?, error_message=?, completed_at=? WHERE id=?",
                        (FAILED, "internal_error", self._kind.gave_up, int(now), row["id"]),
                    )
                    continue
                break
            db.execute(
                "UPDATE jobs SET status=?, worker=?, lease_until=?, attempts=attempts+1, progress=0 WHERE id=?",
                (IN_PROGRESS, worker, now + lease_seconds, row["id"]),
            )
            turn = db.execute("SELECT COALESCE(MAX(last_claim), 0) + 1 FROM principals").fetchone()[0]
            db.execute("INSERT OR REPLACE INTO principals VALUES (?, ?)", (row["principal"], turn))
        job = self._job(row)
        job.status, job.progress, job.attempts = IN_PROGRESS, 0, job.attempts + 1
        return job

    async def renew(self, job_id: str, worker: str, progress: int, lease_seconds: float) -> bool:
        with self._tx() as db:
            cursor = db.execute(
                "UPDATE jobs SET progress=MAX(progress, ?), lease_until=? WHERE id=? AND worker=? AND status=?",
                (progress, time.time() + lease_seconds, job_id, worker, IN_PROGRESS),
            )
        return cursor.rowcount == 1

    async def complete(self, job_id: str, worker: str, expires_at: int) -> bool:
        with self._tx() as db:
            cursor = db.execute(
                "UPDATE jobs SET status=?, progress=100, completed_at=?, expires_at=?, worker='' "
                "WHERE id=? AND worker=? AND status=?",
                (COMPLETED, int(time.time()), expires_at, job_id, worker, IN_PROGRESS),
            )
        return cursor.rowcount == 1

    async def fail(self, job_id: str, worker: str, code: str, message: str) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET status=?, error_code=?, error_message=?, completed_at=?, worker='' "
                "WHERE id=? AND worker=? AND status=?",
                (FAILED, code, message, int(time.time()), job_id, worker, IN_PROGRESS),
            )

    async def release(self, job_id: str, worker: str) -> None:
        with self._tx() as db:
            db.execute(
                # Not an attempt: the engine was unavailable, the worker did not die (MAX_ATTEMPTS counts deaths).
                "UPDATE jobs SET status=?, worker='', lease_until=0, progress=0, attempts=MAX(attempts-1, 0) "
                "WHERE id=? AND worker=? AND status=?",
                (QUEUED, job_id, worker, IN_PROGRESS),
            )

    async def expire_due(self, now: int) -> list[str]:
        with self._tx() as db:
            rows = db.execute(
                "SELECT id FROM jobs WHERE status=? AND expired=0 AND expires_at > 0 AND expires_at <= ?",
                (COMPLETED, now),
            ).fetchall()
            ids = [row["id"] for row in rows]
            db.executemany("UPDATE jobs SET expired=1 WHERE id=?", [(i,) for i in ids])
        return ids

    async def depth(self) -> QueueDepth:
        counts = dict(
            self._db.execute(  # the status index: counts of two statuses, never a read of the rows
                "SELECT status, COUNT(*) FROM jobs WHERE status IN (?, ?) GROUP BY status", (QUEUED, IN_PROGRESS)
            ).fetchall()
        )
        return QueueDepth(queued=counts.get(QUEUED, 0), running=counts.get(IN_PROGRESS, 0))

    async def close(self) -> None:
        self._db.close()


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error): one writer at a time, even across processes."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> sqlite3.Connection:
        self._db.execute("BEGIN IMMEDIATE")
        return self._db

    def __exit__(self, exc_type, exc, tb) -> None:
        self._db.execute("ROLLBACK" if exc_type else "COMMIT")


# ---- Redis --------------------------------------------------------------------------

GROUP = "workers"

# KEYS: job, total counter, principal counter, running set. ARGV: worker, lease_until.
_TAKE = """
if redis.call('HGET', KEYS[1], 'status') ~= 'queued' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'in_progress', 'worker', ARGV[1], 'lease_until', ARGV[2], 'progress', 0)
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('DECR', KEYS[2])
redis.call('DECR', KEYS[3])
redis.call('SADD', KEYS[4], redis.call('HGET', KEYS[1], 'id'))
return 1
"""
# Re-taking a job whose worker died (its entry was auto-claimed). KEYS: job, running set. ARGV: worker,
# lease_until.
_RETAKE = """
if redis.call('HGET', KEYS[1], 'status') ~= 'in_progress' then return 0 end
redis.call('HSET', KEYS[1], 'worker', ARGV[1], 'lease_until', ARGV[2], 'progress', 0)
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('SADD', KEYS[2], redis.call('HGET', KEYS[1], 'id'))
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
# KEYS: job, stream, expiries, running set. ARGV: worker, group, status, completed_at, expires_at, error_code,
# error_message.
_FINISH = """
if redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'status') ~= 'in_progress' then
  return 0
end
redis.call('SREM', KEYS[4], redis.call('HGET', KEYS[1], 'id'))
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


def _decode(kind: JobKind, raw: dict[bytes, bytes]) -> Any | None:
    if not raw:
        return None
    values = {k.decode(): v.decode() for k, v in raw.items()}
    bools, ints = kind.kinds_of("bool"), kind.kinds_of("int")
    job: dict[str, Any] = {}
    for name in kind.names:
        if name not in values:
            continue  # a field added since the job was written: its default
        value = values[name]
        if name in bools:
            job[name] = value == "1"
        elif name in ints:
            job[name] = int(value or 0)
        else:
            job[name] = value
    return kind.make(job)


def _encode(kind: JobKind, job: Any) -> dict[str, str | int]:
    bools = kind.kinds_of("bool")
    return {name: int(getattr(job, name)) if name in bools else getattr(job, name) for name in kind.names}


class RedisJobStore:
    """Jobs in Redis, for several replicas sharing one queue.

    Layout (under the kind's prefix):

    - ``job:<id>``: a hash per job (the job's fields, plus its worker, lease and queue entry);
    - ``jobs:<principal>``: a sorted set of the principal's job ids by creation order (listing, pagination);
    - ``queue:<principal>``: a stream per principal, read through the consumer group ``workers``.
      A worker takes an entry with XREADGROUP and acknowledges it when the job is finished; while it
      works, its heartbeat resets the entry's idle time (XCLAIM). An entry idle longer than the
      lease belongs to a dead worker: another replica takes it over with XAUTOCLAIM and re-runs it;
    - ``turns``: a sorted set principal -> when it was last served; workers read the principals'
      streams least-recently-served first, so one busy principal cannot starve the others;
    - ``idem:<principal>:<key>``: Idempotency-Key reservations, expiring after the TTL;
    - ``expiries``: completed job ids by ``expires_at``, for the sweeper;
    - ``queued`` (and ``queued:<principal>``): counters of queued jobs; ``running``: the set of claimed job ids
      (added when taken, removed when finished, released or deleted; a set, so a race cannot skew it), so
      ``depth`` is one round trip.

    State changes that must not interleave (take, renew, complete, fail) are Lua scripts.
    """

    def __init__(self, kind: JobKind, url: str, idempotency_ttl_seconds: int, **redis_options: Any) -> None:
        from redis import asyncio as aioredis  # only replicas sharing a queue need redis installed

        if not url:
            raise SystemExit(f"{kind.noun} jobs: a redis store needs a redis url (e.g. redis://redis:6379/0)")
        self._kind = kind
        self._redis = aioredis.from_url(url, **redis_options)
        self._ttl = idempotency_ttl_seconds
        self._take = self._redis.register_script(_TAKE)
        self._retake = self._redis.register_script(_RETAKE)
        self._renew = self._redis.register_script(_RENEW)
        self._finish = self._redis.register_script(_FINISH)
        self._reserve = self._redis.register_script(_RESERVE)

    def _key(self, *parts: str) -> str:
        return self._kind.redis_prefix + ":".join(parts)

    # -- idempotency -----------------------------------------------------------------
    async def reserve(self, principal: str, key: str, digest: str) -> Any | None:
        found = await self._reserve(keys=[self._key("idem", principal, key)], args=[digest, self._ttl])
        if found is None:
            return None
        earlier_digest, job_id = (value.decode() if value else "" for value in found)
        if earlier_digest != digest:
            raise idempotency_mismatch()
        if not job_id:
            raise idempotency_conflict()
        job = await self.get(principal, job_id)
        if job is None:
            raise self._kind.not_found(job_id)
        return job

    async def unreserve(self, principal: str, key: str) -> None:
        idem = self._key("idem", principal, key)
        if not (await self._redis.hget(idem, "job_id")):
            await self._redis.delete(idem)

    # -- jobs ------------------------------------------------------------------------
    async def create(self, job: Any, limits: Limits, key: str = "") -> Any:
        # The limits are read, then the job added: racing creates on several replicas may overshoot
        # the limit by a few jobs, which a queue bound tolerates.
        total, mine = await self._redis.mget(self._key("queued"), self._key("queued", job.principal))
        if int(total or 0) >= limits.max_queue:
            raise self._kind.queue_full("on this server")
        if int(mine or 0) >= limits.max_queue_per_principal:
            raise self._kind.queue_full("for this API key")
        stream = self._key("queue", job.principal)
        try:
            await self._redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
        except Exception as exc:  # redis ResponseError BUSYGROUP: it exists
            if "BUSYGROUP" not in str(exc):
                raise
        seq = await self._redis.incr(self._key("seq"))
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                self._key("job", job.id),
                mapping={**_encode(self._kind, job), "seq": seq, "worker": "", "lease_until": 0},
            )
            pipe.zadd(self._key("jobs", job.principal), {job.id: seq})
            pipe.incr(self._key("queued"))
            pipe.incr(self._key("queued", job.principal))
            pipe.sadd(self._key("principals"), job.principal)
            pipe.xadd(stream, {"job": job.id})
            if key:
                pipe.hset(self._key("idem", job.principal, key), "job_id", job.id)
            await pipe.execute()
        return job

    async def get(self, principal: str, job_id: str) -> Any | None:
        job = _decode(self._kind, await self._redis.hgetall(self._key("job", job_id)))
        return job if job is not None and job.principal == principal else None

    async def list(self, principal: str, after: str, limit: int, order: str) -> tuple[list[Any], bool]:
        index = self._key("jobs", principal)
        descending = order != "asc"
        low, high = "-inf", "+inf"
        if after:
            score = await self._redis.zscore(index, after)
            if score is None:
                raise self._kind.not_found(after)
            low, high = (low, f"({int(score)}") if descending else (f"({int(score)}", high)
        if descending:
            ids = await self._redis.zrevrangebyscore(index, high, low, start=0, num=limit + 1)
        else:
            ids = await self._redis.zrangebyscore(index, low, high, start=0, num=limit + 1)
        jobs = [await self.get(principal, job_id.decode()) for job_id in ids[:limit]]
        return [job for job in jobs if job is not None], len(ids) > limit

    async def delete(self, principal: str, job_id: str) -> Any | None:
        job = await self.get(principal, job_id)
        if job is None:
            return None
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._key("job", job_id))
            pipe.zrem(self._key("jobs", principal), job_id)
            pipe.zrem(self._key("expiries"), job_id)
            pipe.srem(self._key("running"), job_id)
            if job.status == QUEUED:  # its queue entry is skipped (and acknowledged) when read
                pipe.decr(self._key("queued"))
                pipe.decr(self._key("queued", principal))
            await pipe.execute()
        return job

    # -- workers -----------------------------------------------------------------------
    async def _principals_by_turn(self) -> list[str]:
        members = [m.decode() for m in await self._redis.smembers(self._key("principals"))]
        turns = dict(await self._redis.zrange(self._key("turns"), 0, -1, withscores=True))
        return sorted(members, key=lambda p: (turns.get(p.encode(), 0.0), p))

    async def claim(self, worker: str, lease_seconds: float) -> Any | None:
        principals = await self._principals_by_turn()
        lease_until = time.time() + lease_seconds
        for principal in principals:  # first, jobs whose worker died
            stream = self._key("queue", principal)
            _, entries, _ = await self._redis.xautoclaim(
                stream, GROUP, worker, min_idle_time=int(lease_seconds * 1000), start_id="0-0", count=1
            )
            for entry_id, values in entries:
                if job := await self._take_over(stream, entry_id, values, worker, lease_until, retake=True):
                    return job
        for principal in principals:  # then new jobs, least recently served principal first
            stream = self._key("queue", principal)
            replies = await self._redis.xreadgroup(GROUP, worker, {stream: ">"}, count=1)
            for _, entries in replies or []:
                for entry_id, values in entries:
                    if job := await self._take_over(stream, entry_id, values, worker, lease_until, retake=False):
                        turn = await self._redis.incr(self._key("turn"))
                        await self._redis.zadd(self._key("turns"), {principal: turn})
                        return job
        return None

    async def _take_over(self, stream, entry_id, values, worker, lease_until, retake: bool) -> Any | None:
        job_id = values[b"job"].decode()
        job_key = self._key("job", job_id)
        job = _decode(self._kind, await self._redis.hgetall(job_key))
        if job is None:  # deleted while queued
            await self._redis.xack(stream, GROUP, entry_id)
            return None
        await self._redis.hset(job_key, mapping={"entry": entry_id, "stream": stream})
        if retake and job.attempts >= MAX_ATTEMPTS:  # its workers kept dying: stop retrying
            await self._redis.hset(job_key, "worker", worker)
            await self.fail(job_id, worker, "internal_error", self._kind.gave_up)
            return None
        if retake:
            taken = await self._retake(keys=[job_key, self._key("running")], args=[worker, lease_until])
        else:
            keys = [job_key, self._key("queued"), self._key("queued", job.principal), self._key("running")]
            taken = await self._take(keys=keys, args=[worker, lease_until])
        if not taken:  # finished or failed meanwhile: nothing to do
            await self._redis.xack(stream, GROUP, entry_id)
            return None
        return _decode(self._kind, await self._redis.hgetall(job_key))

    async def renew(self, job_id: str, worker: str, progress: int, lease_seconds: float) -> bool:
        job_key = self._key("job", job_id)
        stream = await self._redis.hget(job_key, "stream")
        if stream is None:
            return False
        args = [worker, progress, time.time() + lease_seconds, GROUP]
        return bool(await self._renew(keys=[job_key, stream.decode()], args=args))

    async def _finish_job(self, job_id: str, worker: str, status: str, expires_at: int, code="", message="") -> bool:
        job_key = self._key("job", job_id)
        stream = await self._redis.hget(job_key, "stream")
        if stream is None:
            return False
        args = [worker, GROUP, status, int(time.time()), expires_at, code, message]
        keys = [job_key, stream.decode(), self._key("expiries"), self._key("running")]
        return bool(await self._finish(keys=keys, args=args))

    async def complete(self, job_id: str, worker: str, expires_at: int) -> bool:
        return await self._finish_job(job_id, worker, COMPLETED, expires_at)

    async def fail(self, job_id: str, worker: str, code: str, message: str) -> None:
        await self._finish_job(job_id, worker, FAILED, 0, code, message)

    async def release(self, job_id: str, worker: str) -> None:
        """Back to the queue: a fresh entry, the old one acknowledged."""
        job = _decode(self._kind, await self._redis.hgetall(self._key("job", job_id)))
        raw = await self._redis.hmget(self._key("job", job_id), "worker", "stream", "entry")
        if job is None or job.status != IN_PROGRESS or raw[0] is None or raw[0].decode() != worker:
            return
        stream, entry = raw[1].decode(), raw[2].decode()
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._key("job", job_id), mapping={"status": QUEUED, "worker": "", "progress": 0})
            pipe.hincrby(self._key("job", job_id), "attempts", -1)  # not an attempt: the engine was unavailable
            pipe.incr(self._key("queued"))
            pipe.incr(self._key("queued", job.principal))
            pipe.srem(self._key("running"), job_id)
            pipe.xack(stream, GROUP, entry)
            pipe.xadd(stream, {"job": job_id})
            await pipe.execute()

    async def expire_due(self, now: int) -> list[str]:
        ids = [i.decode() for i in await self._redis.zrangebyscore(self._key("expiries"), "-inf", now)]
        for job_id in ids:
            if await self._redis.exists(self._key("job", job_id)):
                await self._redis.hset(self._key("job", job_id), "expired", 1)
            await self._redis.zrem(self._key("expiries"), job_id)
        return ids

    async def depth(self) -> QueueDepth:
        async with self._redis.pipeline(transaction=False) as pipe:  # one round trip
            pipe.get(self._key("queued"))
            pipe.scard(self._key("running"))
            queued, running = await pipe.execute()
        return QueueDepth(queued=max(0, int(queued or 0)), running=int(running))

    async def close(self) -> None:
        await self._redis.aclose()
