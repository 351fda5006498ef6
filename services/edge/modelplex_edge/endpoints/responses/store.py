"""Where stored responses live: a three-method interface and its memory, SQLite and Redis implementations.

A record is keyed by (scope, id): the scope is the caller's project, so another project's key finds nothing
(a 404, never a 403 that would confirm the id exists). Retention is enforced by the store itself: Redis
expires the key, SQLite and memory refuse and sweep rows past their expiry. ``store: false`` responses
never reach a store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson

from modelplex_kit.errors import unavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StoredResponse:
    id: str
    scope: str
    #: The Response object as returned to the client.
    response: dict[str, Any]
    #: This request's input items, ids assigned (GET /v1/responses/{id}/input_items).
    input_items: list[dict[str, Any]]
    #: Responses in the chain ending here (1 without previous_response_id).
    depth: int = 1
    #: A background response's stream events so far (bounded), for clients resuming with starting_after.
    events: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> bytes:
        return orjson.dumps(
            {"response": self.response, "input_items": self.input_items, "depth": self.depth, "events": self.events}
        )

    @staticmethod
    def from_json(response_id: str, scope: str, data: bytes | str) -> StoredResponse:
        fields = orjson.loads(data)
        return StoredResponse(
            response_id, scope, fields["response"], fields["input_items"], fields["depth"], fields.get("events", [])
        )


class ResponseStore(Protocol):
    async def put(self, record: StoredResponse) -> None: ...

    async def get(self, scope: str, response_id: str) -> StoredResponse | None:
        """The record, or None when it never existed, expired, was deleted or is another scope's."""

    async def delete(self, scope: str, response_id: str) -> bool: ...

    async def close(self) -> None: ...


class MemoryStore:
    """One process's dict: for tests and a single edge that may forget on restart. Bounded: beyond
    ``max_records`` the oldest records are dropped first, so memory cannot grow without limit."""

    def __init__(self, retention_seconds: float, max_records: int = 10_000) -> None:
        self._retention = retention_seconds
        self._max_records = max_records
        # Insertion order is expiry order (one retention for all), so expired records are at the front.
        self._records: OrderedDict[tuple[str, str], tuple[float, bytes]] = OrderedDict()

    async def put(self, record: StoredResponse) -> None:
        self._sweep()
        key = (record.scope, record.id)
        self._records[key] = (time.time() + self._retention, record.to_json())
        self._records.move_to_end(key)
        while len(self._records) > self._max_records:
            self._records.popitem(last=False)

    async def get(self, scope: str, response_id: str) -> StoredResponse | None:
        found = self._records.get((scope, response_id))
        if found is None or found[0] <= time.time():
            return None
        return StoredResponse.from_json(response_id, scope, found[1])

    async def delete(self, scope: str, response_id: str) -> bool:
        found = self._records.pop((scope, response_id), None)
        return found is not None and found[0] > time.time()

    def _sweep(self) -> None:
        now = time.time()
        while self._records and next(iter(self._records.values()))[0] <= now:
            self._records.popitem(last=False)

    async def close(self) -> None:
        self._records.clear()


class SQLiteStore:
    """One file (the ``make run`` default, under .modelplex/): survives restarts of one edge."""

    _SCHEMA = """
        CREATE TABLE IF NOT EXISTS responses (
            scope TEXT NOT NULL, id TEXT NOT NULL, expires_at REAL NOT NULL, body BLOB NOT NULL,
            PRIMARY KEY (scope, id))
    """

    def __init__(self, path: str, retention_seconds: float, sweep_seconds: float = 60.0) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # In WAL mode NORMAL survives a crash of the edge (not of the machine) and skips an fsync per
        # write, which measured 2 ms a request (docs/benchmarks.md, Responses API).
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(self._SCHEMA)
        self._lock = asyncio.Lock()  # one statement at a time on the one connection
        self._retention = retention_seconds
        self._sweep_seconds = sweep_seconds
        self._swept = 0.0

    async def _run(self, sql: str, args: tuple) -> list[tuple]:
        async with self._lock:
            return await asyncio.to_thread(lambda: self._db.execute(sql, args).fetchall())

    async def put(self, record: StoredResponse) -> None:
        now = time.time()
        if now - self._swept > self._sweep_seconds:
            self._swept = now
            await self._run("DELETE FROM responses WHERE expires_at <= ?", (now,))
        await self._run(
            "INSERT OR REPLACE INTO responses (scope, id, expires_at, body) VALUES (?, ?, ?, ?)",
            (record.scope, record.id, now + self._retention, record.to_json()),
        )

    async def get(self, scope: str, response_id: str) -> StoredResponse | None:
        rows = await self._run(
            "SELECT body FROM responses WHERE scope = ? AND id = ? AND expires_at > ?",
            (scope, response_id, time.time()),
        )
        return StoredResponse.from_json(response_id, scope, rows[0][0]) if rows else None

    async def delete(self, scope: str, response_id: str) -> bool:
        rows = await self._run(
            "DELETE FROM responses WHERE scope = ? AND id = ? AND expires_at > ? RETURNING id",
            (scope, response_id, time.time()),
        )
        return bool(rows)

    async def close(self) -> None:
        async with self._lock:
            self._db.close()


@contextlib.asynccontextmanager
async def _outage_is_503() -> AsyncIterator[None]:
    """Redis down or slow is an outage worth retrying (503 + Retry-After), not a server error."""
    from redis.exceptions import ConnectionError, TimeoutError

    try:
        yield
    except (ConnectionError, TimeoutError, OSError) as exc:
        log.warning("response store unavailable", extra={"error": type(exc).__name__})
        raise unavailable("The response store is unavailable; retry shortly.") from None


class RedisStore:
    """Shared by every edge replica (the gatekeeper's Redis when one is configured); Redis expires keys."""

    def __init__(
        self, url: str, retention_seconds: float, prefix: str = "modelplex:responses", timeout_seconds: float = 2.0
    ) -> None:
        import redis.asyncio as aioredis

        self._redis = aioredis.from_url(url, socket_timeout=timeout_seconds, socket_connect_timeout=timeout_seconds)
        self._retention = max(1, int(retention_seconds))
        self._prefix = prefix

    def _key(self, scope: str, response_id: str) -> str:
        return f"{self._prefix}:{{{scope}}}:{response_id}"

    async def put(self, record: StoredResponse) -> None:
        async with _outage_is_503():
            await self._redis.set(self._key(record.scope, record.id), record.to_json(), ex=self._retention)

    async def get(self, scope: str, response_id: str) -> StoredResponse | None:
        async with _outage_is_503():
            data = await self._redis.get(self._key(scope, response_id))
        return StoredResponse.from_json(response_id, scope, data) if data is not None else None

    async def delete(self, scope: str, response_id: str) -> bool:
        async with _outage_is_503():
            return bool(await self._redis.delete(self._key(scope, response_id)))

    async def close(self) -> None:
        await self._redis.aclose()


def build_store(
    kind: str, *, sqlite_path: str, redis_url: str, retention_seconds: float, memory_max_records: int = 10_000
) -> ResponseStore:
    if kind == "redis":
        if not redis_url:
            raise ValueError("MODELPLEX_EDGE_RESPONSES_STORE=redis needs MODELPLEX_EDGE_RESPONSES_REDIS_URL")
        return RedisStore(redis_url, retention_seconds)
    if kind == "sqlite":
        return SQLiteStore(sqlite_path, retention_seconds)
    return MemoryStore(retention_seconds, memory_max_records)
