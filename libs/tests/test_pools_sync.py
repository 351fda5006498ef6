"""Backend replicas of one model share their picks (modelplex_kit.pools.sync) over a real Redis
(Debian's redis-server): what one backend placed, the others pick alike."""

from __future__ import annotations

import pytest

from libs.tests.test_pools import FakeReplica, make_pool
from modelplex_kit.pools.load import EngineLoad
from modelplex_kit.pools.picker import PickRequest, Reason
from modelplex_kit.pools.prefix import block_hashes
from modelplex_kit.pools.sync import PickSync, SharedPick, decode, encode
from tests.support.redis_server import RedisServer
from tests.support.until import until

TENANT = "You are the claims desk of a harbour insurer; answer in two sentences, citing the clause. " * 30


async def listening(*pools) -> None:
    """Every pool started (a backend's first readiness check starts it) and subscribed to its channel."""
    import redis.asyncio as redis

    for pool in pools:
        await pool.ready()
    client = redis.Redis.from_url(pools[0]._sync.url)
    try:

        async def subscribers() -> int:
            return dict(await client.pubsub_numsub(pools[0]._sync.channel))[pools[0]._sync.channel.encode()]

        await until(lambda: subscribers_at_least(subscribers, len(pools)), 10, what="every pool subscribed")
    finally:
        await client.aclose()


async def subscribers_at_least(count, n: int) -> bool:
    return await count() >= n


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server.url
    server.stop()


def test_a_pick_message_round_trips_and_anything_else_is_refused():
    picks = [
        SharedPick("10.0.0.1:8000", (1, 2**64 - 1), 7),
        SharedPick("vllm-2.vllm:8000", (), 0),
        SharedPick("vllm-3.vllm:8000", (5,), 0, adapter="smollm2-kiwi"),
    ]
    origin, decoded = decode(encode(b"12345678", picks))
    assert origin == b"12345678" and decoded == picks
    for garbage in (b"", b"hello", encode(b"12345678", picks)[:-3]):
        with pytest.raises(ValueError):
            decode(garbage)


def test_a_very_long_prompt_is_shared_by_its_leading_blocks_and_its_batch_still_encodes():
    """An 8 MB prompt is 32k blocks and a 16 MiB body 64k: a record's block count is 16 bits, and an
    error there would drop the whole batch with it."""
    sync = PickSync("test", "redis://127.0.0.1:1/0", "modelplex:pool:test", lambda pick: None)
    sync.share(SharedPick("r0:1", tuple(range(70_000)), 0))
    sync.share(SharedPick("r1:1", (1, 2, 3), 9))
    _, picks = decode(encode(sync.origin, sync._pending))
    assert [len(p.hashes) for p in picks] == [4096, 3] and picks[0].hashes[:3] == (0, 1, 2)


def test_block_hashes_are_the_same_in_every_process():
    """str's hash() is salted per process; a peer's hashes must mean the same prefix here."""
    import os
    import subprocess
    import sys

    code = (
        "from modelplex_kit.pools.prefix import block_hashes, stable_hash;"
        "print(block_hashes('x' * 600, 256), stable_hash('u'))"
    )
    runs = {
        subprocess.run(
            [sys.executable, "-c", code], env=os.environ | {"PYTHONHASHSEED": seed}, capture_output=True, text=True
        ).stdout
        for seed in ("1", "2")
    }
    assert len(runs) == 1 and runs != {""}


async def test_a_prefix_placed_through_one_backend_is_picked_for_the_same_replica_through_another(redis_url):
    """Two backend replicas of one model, each with its own pool over the same three engine replicas
    and its own view of their load. Backend A serves a tenant's first request; backend B, which never
    saw that tenant and whose view makes another replica the least loaded, sends the tenant's next
    request to A's replica; and a session A placed is B's too."""
    a, a_clients = make_pool(3, pool_sync_url=redis_url)
    b, b_clients = make_pool(3, pool_sync_url=redis_url)
    try:
        await listening(a, b)
        first = await a.call(PickRequest(TENANT + "Is hail damage covered?", session="user-1"), FakeReplica.answer)
        assert first in a_clients
        others = [k for k in b_clients if k != first]
        b_clients[first].engine = EngineLoad(running=2, waiting=0, kv_cache_usage=0.1)  # busier, within the bound
        for key in others:
            b_clients[key].engine = EngineLoad(running=0, waiting=0, kv_cache_usage=0.0)
        tenant_blocks = len(block_hashes(TENANT, b.picker._block_chars))
        await until(lambda: b.picker.prefixes.matches(block_hashes(TENANT, 256), [first])[first] >= tenant_blocks, 10)
        await until(lambda: all(r.load.engine is not None for r in b.replicas), 10)
        second = await b.call(PickRequest(TENANT + "And flood damage?"), FakeReplica.answer)
        assert second == first
        assert b.picker.sessions.get("user-1") == first
        # Without the shared pick B would have chosen by load: a pool of its own shows it.
        alone, alone_clients = make_pool(3)
        try:
            await alone.ready()
            alone_clients[first].engine = EngineLoad(running=2, waiting=0, kv_cache_usage=0.1)
            for key in others:
                alone_clients[key].engine = EngineLoad(running=0, waiting=0, kv_cache_usage=0.0)
            await until(lambda: all(r.load.engine is not None for r in alone.replicas), 10)
            pick = alone.picker.pick(alone.replicas, PickRequest(TENANT + "And flood damage?"))
            assert pick.key != first and pick.reason == Reason.LOAD
        finally:
            await alone.close()
    finally:
        await a.close()
        await b.close()


async def test_picks_go_on_while_redis_is_down_and_sharing_resumes_when_it_is_back(tmp_path):
    server = RedisServer(tmp_path).start()
    a, _ = make_pool(3, pool_sync_url=server.url)
    b, _ = make_pool(3, pool_sync_url=server.url)
    try:
        await listening(a, b)
        await a.call(PickRequest("warm up " * 60), FakeReplica.answer)
        await b.call(PickRequest("warm up " * 60), FakeReplica.answer)
        await until(lambda: a._sync.learned >= 1 and b._sync.learned >= 1, 10)
        server.stop()
        answers = [await a.call(PickRequest(f"tenant {i} " * 60), FakeReplica.answer) for i in range(5)]
        assert len(answers) == 5  # Redis away: nothing failed, nothing waited on it
        # The backends live the outage (it is not a restart between two looks): what a picked meanwhile
        # is dropped, and both subscribers have lost the channel.
        await until(lambda: a._sync.dropped >= 5, 30, what="the picks made while Redis is away dropped")
        await until(lambda: not a._sync.listening and not b._sync.listening, 30, what="both subscribers lost")
        server.start()
        await listening(a, b)  # pub/sub keeps nothing for a subscriber that is not back yet
        dropped = a._sync.dropped
        late = "a tenant after the outage " * 20
        placed = await a.call(PickRequest(late + "q1"), FakeReplica.answer)
        await until(lambda: b.picker.prefixes.matches(block_hashes(late, 256), [placed])[placed] > 0, 30)
        assert a._sync.dropped == dropped
    finally:
        await a.close()
        await b.close()
        server.stop()


async def test_a_redis_restart_between_two_picks_loses_neither_the_next_pick_nor_the_subscription(tmp_path, caplog):
    """Redis restarted while nobody picked (a quick restart, a failover): every connection the backends
    hold is dead though Redis is up. The next batch goes out on a fresh connection instead of being
    dropped, and the subscribers are back on the channel for good, neither backing off nor warning."""
    server = RedisServer(tmp_path).start()
    a, _ = make_pool(3, pool_sync_url=server.url)
    b, _ = make_pool(3, pool_sync_url=server.url)
    try:
        await listening(a, b)
        await a.call(PickRequest("warm up " * 60), FakeReplica.answer)
        await b.call(PickRequest("warm up " * 60), FakeReplica.answer)
        await until(lambda: a._sync.learned >= 1 and b._sync.learned >= 1, 10)
        server.stop()
        server.start()  # the event loop does not run in between: no task sees Redis away
        await listening(a, b)
        sent = a._sync.published
        late = "a tenant after the restart " * 20
        placed = await a.call(PickRequest(late + "q1"), FakeReplica.answer)
        await until(lambda: a._sync.published + a._sync.dropped > sent, 30, what="the next batch sent or dropped")
        assert a._sync.dropped == 0
        await until(lambda: b.picker.prefixes.matches(block_hashes(late, 256), [placed])[placed] > 0, 30)
        assert a._sync.listening and b._sync.listening
        assert "cannot publish" not in caplog.text
        assert "cannot listen" not in caplog.text
    finally:
        await a.close()
        await b.close()
        server.stop()
