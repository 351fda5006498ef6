"""Limit semantics, the same for the memory store and a real Redis."""

from __future__ import annotations

import asyncio

import pytest

from modelplex_gatekeeper.keys import KeyRecord
from modelplex_gatekeeper.redis_store import RedisStore
from modelplex_gatekeeper.store import MemoryStore, UsageLog
from tests.support.redis_server import RedisServer


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(params=["memory", "redis"])
async def store(request, tmp_path):
    if request.param == "memory":
        made = MemoryStore(0.3, UsageLog(tmp_path / "usage.jsonl"))
    else:
        server = request.getfixturevalue("redis_server")
        made = RedisStore(server.url, 0.3, f"usage-{tmp_path.name}", 1.0)
    yield made
    await made.close()


def key(name: str, **limits) -> KeyRecord:
    return KeyRecord(name=f"{name}-{id(limits)}", hash="", **limits)


async def test_requests_per_minute_admit_the_limit_then_refuse(store):
    k = key("rpm", rpm=3)
    decisions = [await store.admit(k, 0, f"s{i}") for i in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert [d.remaining_requests for d in decisions[:3]] == [2, 1, 0]
    refused = decisions[3]
    assert refused.denied_by == "requests" and refused.used == 3
    # One request comes back every 60/3 = 20 s: that is the wait, not a whole window.
    assert 19_000 < refused.retry_after_ms <= 20_000
    assert 59_000 < refused.reset_requests_ms <= 60_000


async def test_tokens_are_reserved_then_reconciled(store):
    k = key("tpm", tpm=100)
    first = await store.admit(k, 60, "a")
    assert first.allowed and first.remaining_tokens == 40
    refused = await store.admit(k, 60, "b")
    assert not refused.allowed and refused.denied_by == "tokens" and refused.used == 60
    # The first request used only 10 of its 60: 50 come back, and the same request now fits.
    await store.account(k, first.slot, 60, 10, {"key": k.name})
    second = await store.admit(k, 60, "c")
    assert second.allowed and second.remaining_tokens == 30
    # A request that used more than it reserved is charged the difference.
    await store.account(k, second.slot, 60, 90, {"key": k.name})
    assert (await store.peek(k)).remaining_tokens == 0


async def test_concurrency_slots_are_released_and_expire(store):
    k = key("conc", max_concurrent=1)
    held = await store.admit(k, 0, "one")
    assert held.allowed
    refused = await store.admit(k, 0, "two")
    assert not refused.allowed and refused.denied_by == "concurrency" and refused.used == 1
    await store.release(k, held.slot)
    again = await store.admit(k, 0, "three")
    assert again.allowed
    await asyncio.sleep(0.4)  # the slot's expiry (0.3 s here): a dead edge cannot leak it
    assert (await store.admit(k, 0, "four")).allowed


async def test_daily_budget(store):
    k = key("daily", daily_tokens=50)
    first = await store.admit(k, 0, "a")
    await store.account(k, first.slot, 0, 50, {"key": k.name})
    refused = await store.admit(k, 0, "b")
    assert not refused.allowed and refused.denied_by == "daily" and refused.used == 50


async def test_memory_gcra_refills_over_time(tmp_path):
    clock = Clock()
    store = MemoryStore(60, clock=clock)
    k = key("refill", rpm=60)
    assert all([(await store.admit(k, 0, str(i))).allowed for i in range(60)])
    assert not (await store.admit(k, 0, "x")).allowed
    clock.now += 1.0  # one per second comes back: exactly one more, never a double window
    assert (await store.admit(k, 0, "y")).allowed
    assert not (await store.admit(k, 0, "z")).allowed


async def test_redis_usage_goes_to_a_stream(redis_server):
    import redis

    store = RedisStore(redis_server.url, 60, "usage-stream-test", 1.0)
    k = key("stream")
    decision = await store.admit(k, 5, "s")
    await store.account(k, decision.slot, 5, 7, {"key": k.name, "model": "m", "total_tokens": 7})
    await store.close()
    entries = redis.Redis.from_url(redis_server.url).xrange("usage-stream-test")
    assert [e[1][b"total_tokens"] for e in entries] == [b"7"]
