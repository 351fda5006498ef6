"""Durable video jobs: the record, the store interface, and its SQLite implementation.

A job is visible only to the principal that created it. Workers *claim* a
queued job under a lease they keep renewing; a job whose lease ran out (its
worker died) is claimed again and re-run from the start. Claims are fair: the
next job goes to the principal served longest ago, so one busy project cannot
starve the others. ``store: redis`` (modelplex_videos.redis_store) implements
the same interface for several replicas.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Protocol

import grpc

from modelplex_kit.errors import ServiceError

QUEUED, IN_PROGRESS, COMPLETED, FAILED = "queued", "in_progress", "completed", "failed"
# A job whose worker died this many times is failed rather than retried forever.
MAX_ATTEMPTS = 3


@dataclass(slots=True)
class Job:
    id: str
    principal: str
    model: str
    prompt: str
    width: int
    height: int
    seconds: int
    seed: int
    status: str = QUEUED
    progress: int = 0
    created_at: int = field(default_factory=lambda: int(time.time()))
    completed_at: int = 0
    expires_at: int = 0
    error_code: str = ""
    error_message: str = ""
    remixed_from: str = ""
    expired: bool = False
    has_reference: bool = False
    attempts: int = 0


def new_job_id() -> str:
    return "video_" + secrets.token_hex(16)


@dataclass(frozen=True, slots=True)
class Limits:
    max_queue: int
    max_queue_per_principal: int


def queue_full(scope: str) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"Too many video jobs are queued {scope}; retry after some have finished.",
        code="rate_limit_exceeded",
    )


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


def not_found(video_id: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.NOT_FOUND, f"No video found with id '{video_id}'.", param="video_id",
                        code="not_found")


def body_hash(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


class JobStore(Protocol):
    async def reserve(self, principal: str, key: str, digest: str) -> Job | None:
        """Claims an idempotency key for a request about to be created: None when it is ours now,
        the earlier job when the same request already created one; raises 422 (different body)
        or 409 (the first request is still being created)."""
        ...

    async def unreserve(self, principal: str, key: str) -> None: ...

    async def create(self, job: Job, limits: Limits, key: str = "") -> Job:
        """Inserts a queued job (429 when the queue is full) and ties the reserved key to it."""
        ...

    async def get(self, principal: str, job_id: str) -> Job | None: ...

    async def list(self, principal: str, after: str, limit: int, order: str) -> tuple[list[Job], bool]: ...

    async def delete(self, principal: str, job_id: str) -> Job | None: ...

    async def claim(self, worker: str, lease_seconds: float) -> Job | None:
        """The next job to render, fairly across principals, leased to ``worker``."""
        ...

    async def renew(self, job_id: str, worker: str, progress: int, lease_seconds: float) -> bool:
        """Extends the lease and records progress; False when the job is gone or no longer ``worker``'s."""
        ...

    async def complete(self, job_id: str, worker: str, expires_at: int) -> bool: ...

    async def fail(self, job_id: str, worker: str, code: str, message: str) -> None: ...

    async def release(self, job_id: str, worker: str) -> None:
        """Puts a claimed job back in the queue (the engine was unavailable)."""
        ...

    async def expire_due(self, now: int) -> list[str]:
        """Marks completed jobs past ``expires_at`` as expired; returns their ids (content to delete)."""
        ...

    async def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT UNIQUE NOT NULL, principal TEXT NOT NULL, model TEXT, prompt TEXT,
  width INTEGER, height INTEGER, seconds INTEGER, seed INTEGER,
  status TEXT NOT NULL, progress INTEGER DEFAULT 0,
  created_at INTEGER, completed_at INTEGER DEFAULT 0, expires_at INTEGER DEFAULT 0,
  error_code TEXT DEFAULT '', error_message TEXT DEFAULT '', remixed_from TEXT DEFAULT '',
  expired INTEGER DEFAULT 0, has_reference INTEGER DEFAULT 0, attempts INTEGER DEFAULT 0,
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
_JOB_FIELDS = [f.name for f in fields(Job)]


class SQLiteJobStore:
    """Jobs in one SQLite file (WAL): for a single videos replica.

    Calls are short, indexed statements made on the event loop's thread; a
    transaction per method keeps each one atomic. Opening the store re-queues
    jobs left in progress: with one replica, their worker was this service
    before it restarted.
    """

    def __init__(self, path: Path, idempotency_ttl_seconds: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._idempotency_ttl = idempotency_ttl_seconds
        self._db.execute("UPDATE jobs SET status=?, worker='', lease_until=0 WHERE status=?", (QUEUED, IN_PROGRESS))

    def _tx(self):
        return _Transaction(self._db)

    @staticmethod
    def _job(row: sqlite3.Row | None) -> Job | None:
        if row is None:
            return None
        values = {name: row[name] for name in _JOB_FIELDS}
        values["expired"], values["has_reference"] = bool(row["expired"]), bool(row["has_reference"])
        return Job(**values)

    async def reserve(self, principal: str, key: str, digest: str) -> Job | None:
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
            raise not_found(row["job_id"])
        return job

    async def unreserve(self, principal: str, key: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM idempotency WHERE principal=? AND key=? AND job_id IS NULL", (principal, key))

    async def create(self, job: Job, limits: Limits, key: str = "") -> Job:
        with self._tx() as db:
            queued = db.execute("SELECT COUNT(*) FROM jobs WHERE status=?", (QUEUED,)).fetchone()[0]
            if queued >= limits.max_queue:
                raise queue_full("on this server")
            mine = db.execute(
                "SELECT COUNT(*) FROM jobs WHERE status=? AND principal=?", (QUEUED, job.principal)
            ).fetchone()[0]
            if mine >= limits.max_queue_per_principal:
                raise queue_full("for this API key")
            names = [name for name in _JOB_FIELDS]
            db.execute(
                f"INSERT INTO jobs ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
                [getattr(job, name) for name in names],
            )
            if key:
                db.execute("UPDATE idempotency SET job_id=? WHERE principal=? AND key=?", (job.id, job.principal, key))
        return job

    async def get(self, principal: str, job_id: str) -> Job | None:
        row = self._db.execute("SELECT * FROM jobs WHERE id=? AND principal=?", (job_id, principal)).fetchone()
        return self._job(row)

    async def list(self, principal: str, after: str, limit: int, order: str) -> tuple[list[Job], bool]:
        descending = order != "asc"
        query, args = "SELECT * FROM jobs WHERE principal=?", [principal]
        if after:
            cursor = self._db.execute("SELECT seq FROM jobs WHERE id=? AND principal=?", (after, principal)).fetchone()
            if cursor is None:
                raise not_found(after)
            query += " AND seq < ?" if descending else " AND seq > ?"
            args.append(cursor["seq"])
        query += f" ORDER BY seq {'DESC' if descending else 'ASC'} LIMIT ?"
        rows = self._db.execute(query, [*args, limit + 1]).fetchall()
        return [self._job(row) for row in rows[:limit]], len(rows) > limit

    async def delete(self, principal: str, job_id: str) -> Job | None:
        with self._tx() as db:
            job = self._job(db.execute("SELECT * FROM jobs WHERE id=? AND principal=?", (job_id, principal)).fetchone())
            if job is not None:
                db.execute("DELETE FROM jobs WHERE id=?", (job_id,))
        return job

    async def claim(self, worker: str, lease_seconds: float) -> Job | None:
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
                        (FAILED, "internal_error", "Video generation failed repeatedly.", int(now), row["id"]),
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
                "UPDATE jobs SET status=?, worker='', lease_until=0, progress=0 WHERE id=? AND worker=? AND status=?",
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
