"""The stored-responses interface, the same contract for the memory and SQLite stores (Redis's run in
tests/integration/test_responses_redis.py)."""

from __future__ import annotations

import grpc
import pytest

from modelplex_edge.endpoints.responses.store import MemoryStore, RedisStore, SQLiteStore, StoredResponse
from modelplex_kit.errors import ServiceError
from tests.support.ports import free_port
from tests.support.until import until

RESPONSE = {"id": "resp_1", "output": [], "usage": {"total_tokens": 3}}


def record(scope: str = "project-a", response_id: str = "resp_1") -> StoredResponse:
    return StoredResponse(response_id, scope, {**RESPONSE, "id": response_id}, [{"id": "msg_1"}], depth=2)


@pytest.fixture(params=["memory", "sqlite"])
def make_store(request, tmp_path):
    def make(retention_seconds: float = 3600):
        if request.param == "memory":
            return MemoryStore(retention_seconds)
        return SQLiteStore(str(tmp_path / "nested" / "responses.sqlite3"), retention_seconds, sweep_seconds=0)

    return make


async def test_a_record_round_trips(make_store):
    store = make_store()
    await store.put(record())
    found = await store.get("project-a", "resp_1")
    assert found == record()
    await store.close()


async def test_another_scope_finds_nothing_and_cannot_delete(make_store):
    store = make_store()
    await store.put(record())
    assert await store.get("project-b", "resp_1") is None
    assert await store.delete("project-b", "resp_1") is False
    assert await store.get("project-a", "resp_1") is not None
    await store.close()


async def test_delete_removes_once(make_store):
    store = make_store()
    await store.put(record())
    assert await store.delete("project-a", "resp_1") is True
    assert await store.get("project-a", "resp_1") is None
    assert await store.delete("project-a", "resp_1") is False
    await store.close()


async def test_records_expire_after_the_retention(make_store):
    store = make_store(retention_seconds=1)
    await store.put(record())

    async def expired() -> bool:
        return await store.get("project-a", "resp_1") is None

    await until(expired, 15)
    assert await store.delete("project-a", "resp_1") is False
    await store.close()


async def test_sqlite_keeps_records_across_reopening(tmp_path):
    path = str(tmp_path / "responses.sqlite3")
    first = SQLiteStore(path, 3600)
    await first.put(record())
    await first.close()
    second = SQLiteStore(path, 3600)
    assert await second.get("project-a", "resp_1") == record()
    await second.close()


async def test_the_memory_store_is_bounded_and_forgets_the_oldest_first():
    store = MemoryStore(3600, max_records=3)
    for i in range(5):
        await store.put(record(response_id=f"resp_{i}"))
    kept = [i for i in range(5) if await store.get("project-a", f"resp_{i}") is not None]
    assert kept == [2, 3, 4]


async def test_redis_down_is_a_retryable_503_not_a_server_error():
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", 3600)  # nobody listens there
    for attempt in (store.get("project-a", "resp_1"), store.put(record()), store.delete("project-a", "resp_1")):
        with pytest.raises(ServiceError) as failed:
            await attempt
        assert failed.value.status == grpc.StatusCode.UNAVAILABLE and failed.value.http.status == 503
        assert failed.value.headers.get("retry-after")
    await store.close()
