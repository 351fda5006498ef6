"""Engine pools: the prefix index, the load figures, the picker's policies and cost, and the pool's
retries, ejections and saturation, over in-process replica clients (the HTTP path against real
llama.cpp servers is tests/integration/test_engine_pool.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import pytest

from modelplex_kit.errors import ServiceError, invalid, unavailable
from modelplex_kit.pools import pool as pool_module
from modelplex_kit.pools.http import cache_use_of
from modelplex_kit.pools.load import EngineLoad, Prefill, ReplicaLoad, parse_engine_load
from modelplex_kit.pools.picker import CacheUse, Picker, PickRequest, Reason
from modelplex_kit.pools.pool import Pool, ReplicaUnreachable
from modelplex_kit.pools.prefix import PrefixIndex, block_hashes
from modelplex_kit.pools.settings import PoolSettings
from modelplex_kit.pools.sources import StaticSource, hostport, replica_source, url_template
from tests.support.until import until

SYSTEM = "You are a careful assistant for the accounts team. " * 40  # ~2 KB, several blocks


# -- sources ----------------------------------------------------------------------
async def test_a_comma_separated_url_is_a_static_pool_and_one_url_a_pool_of_one():
    many = PoolSettings(upstream_url="http://vllm-0:8000/v1, http://vllm-1:8000/v1/")
    assert [s async for s in replica_source(many).snapshots()] == [frozenset({"vllm-0:8000", "vllm-1:8000"})]
    assert url_template(many.upstream_url).base_url("10.0.0.7:8000") == "http://10.0.0.7:8000/v1"
    one = PoolSettings(upstream_url="https://vllm/v1")
    assert [s async for s in replica_source(one).snapshots()] == [frozenset({"vllm:443"})]
    assert hostport("http://[::1]:9/v1") == "[::1]:9"


async def test_dns_discovery_resolves_the_name_to_its_addresses():
    source = replica_source(PoolSettings(upstream_url="http://localhost:8000/v1", upstream_discovery="dns"))
    snapshots = aiter(source.snapshots())
    first = await asyncio.wait_for(anext(snapshots), 10)
    assert "127.0.0.1:8000" in first


# -- prefix index -----------------------------------------------------------------
def test_prompts_sharing_a_prefix_share_their_leading_block_hashes():
    a = block_hashes(SYSTEM + "Question one?", 256)
    b = block_hashes(SYSTEM + "A different question entirely?", 256)
    shared = len(SYSTEM) // 256
    assert a[:shared] == b[:shared] and len(a) >= shared
    assert block_hashes("short", 256) == []  # a partial block is not cached by an engine either
    assert block_hashes("x" * 256 + SYSTEM, 256)[1:shared] != a[1:shared]  # hashes chain the whole prefix


def test_the_index_matches_leading_blocks_per_replica_and_stays_bounded():
    index = PrefixIndex(max_blocks=64)
    hashes = block_hashes(SYSTEM, 64)
    index.record(hashes[:5], "a:1")
    index.record(hashes, "b:1")
    matched = index.matches(hashes, ["a:1", "b:1", "c:1"])
    assert matched == {"a:1": 5, "b:1": len(hashes), "c:1": 0}
    for i in range(1000):
        index.record(block_hashes(f"{i:08d}" * 100, 64), "c:1")
    assert len(index) <= 64
    index.forget("b:1")
    assert index.matches(hashes, ["b:1"]) == {"b:1": 0}


def test_with_a_known_cache_size_a_replica_forgets_the_prefixes_its_engine_must_have_evicted():
    index = PrefixIndex(max_blocks=1000, replica_blocks=8)
    first = block_hashes("first tenant's long system prompt. " * 20, 64)[:6]
    second = block_hashes("second tenant's other system prompt. " * 20, 64)[:6]
    index.record(first, "a:1")
    index.record(first, "b:1")
    index.record(second, "a:1")  # 12 blocks through a's cache of 8: first's oldest are gone there
    assert index.matches(first, ["a:1", "b:1"]) == {"a:1": 0, "b:1": 6}
    assert index.matches(second, ["a:1"]) == {"a:1": 6}
    unbounded = PrefixIndex(max_blocks=1000)
    unbounded.record(first, "a:1")
    unbounded.record(second, "a:1")
    assert unbounded.matches(first, ["a:1"]) == {"a:1": 6}


def unique_blocks(i: int, blocks: int = 6) -> list[int]:
    return block_hashes(f"unique prompt {i:06d} " * (blocks * 64 // 21 + 1), 64)[:blocks]


def test_an_engine_that_evicted_a_credited_prefix_teaches_the_index_how_long_that_replica_keeps_one():
    index = PrefixIndex(max_blocks=10_000)
    tenant = block_hashes(SYSTEM, 64)[:6]
    index.record(tenant, "a:1")
    index.record(tenant, "b:1")
    for i in range(5):  # 30 other blocks through a's cache since
        index.record(unique_blocks(i), "a:1")
    depth = index.recency(tenant[0], "a:1")
    assert depth == 35  # the tenant's other 5 blocks, then 30
    index.learn("a:1", depth, kept=False)  # a's engine had evicted it: a keeps fewer than 35 blocks
    assert index.horizon("a:1") == 35 and index.horizon("b:1") == 10_000
    index.record(tenant, "a:1")
    for i in range(5, 11):  # 36 blocks since: past what a keeps
        index.record(unique_blocks(i), "a:1")
        index.record(unique_blocks(i), "b:1")
    assert index.matches(tenant, ["a:1", "b:1"]) == {"a:1": 0, "b:1": 6}  # b was never seen to evict


def test_a_replicas_lru_order_is_bounded_by_the_index_whether_or_not_a_horizon_was_learned():
    index = PrefixIndex(max_blocks=64)
    for i in range(100):
        index.record(unique_blocks(i), "a:1")
    assert len(index) <= 64 and index.held("a:1") <= 64
    for replica in ("b:1", "c:1", "d:1", "e:1"):  # a fifth holder of a's last prompt: a is dropped from it
        index.record(unique_blocks(99), replica)
    assert index.matches(unique_blocks(99), ["a:1", "e:1"]) == {"a:1": 0, "e:1": 6}
    assert index.held("a:1") <= 64 - 6


def test_a_learned_horizon_moves_halfway_on_later_evictions_and_grows_on_prefixes_kept_near_it():
    index = PrefixIndex(max_blocks=10_000)
    index.record(unique_blocks(0), "a:1")
    index.learn("a:1", 100, kept=False)
    index.learn("a:1", 40, kept=False)
    assert index.horizon("a:1") == 70  # one eviction seen early (two prefills at once) is not the rule
    index.learn("a:1", 20, kept=True)  # kept well inside: nothing learned
    assert index.horizon("a:1") == 70
    index.learn("a:1", 69, kept=True)  # kept at the horizon's edge: the replica may keep more
    assert index.horizon("a:1") == 71
    index.learn("gone:1", 5, kept=False)  # a replica the index does not know (it left the pool)
    assert index.horizon("gone:1") == 10_000


# -- load -------------------------------------------------------------------------
VLLM_METRICS = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_waiting{engine="0",model_name="m"} 7.0
vllm:num_requests_waiting{engine="1",model_name="m"} 1.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.5
vllm:prompt_tokens_total{model_name="m"} 1234.0
"""


def test_vllm_metrics_parse_into_running_waiting_and_cache_usage():
    assert parse_engine_load(VLLM_METRICS) == EngineLoad(running=3.0, waiting=8.0, kv_cache_usage=0.5)
    assert parse_engine_load("llamacpp:requests_processing 1\nllamacpp:requests_deferred 4\n") == EngineLoad(1, 4, 0)
    assert parse_engine_load("process_cpu_seconds_total 3.2\n") is None


def test_load_is_the_scrape_plus_what_started_since_and_never_below_in_flight():
    load = ReplicaLoad()
    load.started()
    load.scraped(EngineLoad(running=5, waiting=2, kv_cache_usage=0.1))
    load.started()
    assert load.requests() == 8 and load.queue() == 3
    load.scraped(EngineLoad(running=0, waiting=0, kv_cache_usage=0))  # a scrape that lags our own count
    assert load.requests() == 2


def test_another_backends_requests_count_until_the_next_scrape_counts_them():
    """Several backend replicas: what the others sent a replica since its last scrape (their shared
    picks) would be invisible here for up to a scrape interval; it counts as waiting until then."""
    load = ReplicaLoad()
    load.scraped(EngineLoad(running=1, waiting=0, kv_cache_usage=0))
    load.peer_started()
    load.peer_started()
    assert (load.requests(), load.queue(), load.pending()) == (3, 2, 2)
    load.scraped(EngineLoad(running=3, waiting=0, kv_cache_usage=0))  # the engine has started them
    assert (load.requests(), load.queue(), load.pending()) == (3, 0, 0)


# -- picker -----------------------------------------------------------------------
@dataclass
class Stub:
    key: str
    load: ReplicaLoad = field(default_factory=ReplicaLoad)


def stubs(n: int) -> list[Stub]:
    return [Stub(f"10.0.0.{i}:8000") for i in range(n)]


def busy(replica: Stub, requests: int) -> None:
    replica.load.scraped(EngineLoad(running=requests, waiting=0, kv_cache_usage=0))


def queued(replica: Stub, requests: int) -> None:
    replica.load.scraped(EngineLoad(running=8, waiting=requests, kv_cache_usage=0))


def picker(policy: str = "affinity") -> Picker:
    return Picker(policy, max_imbalance=2.0, block_chars=128, index_blocks=10_000)  # type: ignore[arg-type]


def test_requests_sharing_a_prefix_stick_to_one_replica_while_it_is_not_much_busier():
    replicas, choose = stubs(4), picker()
    first = choose.pick(replicas, PickRequest(SYSTEM + "q0"))
    assert first.reason == Reason.LOAD
    for i in range(1, 6):
        again = choose.pick(replicas, PickRequest(SYSTEM + f"question {i}"))
        assert again.key == first.key and again.reason == Reason.PREFIX
    # The warm replica gets a long queue: the bound sends the prefix elsewhere.
    queued(next(r for r in replicas if r.key == first.key), 10)
    moved = choose.pick(replicas, PickRequest(SYSTEM + "q7"))
    assert moved.key != first.key and moved.reason == Reason.LOAD


def test_a_named_session_sticks_and_unrelated_prompts_spread_by_load():
    replicas, choose = stubs(3), picker()
    home = choose.pick(replicas, PickRequest("hi", session="user-42")).key
    for replica in replicas:
        busy(replica, 1)
    assert choose.pick(replicas, PickRequest("other", session="user-42")).key == home
    busy(replicas[0], 0)
    assert choose.pick(replicas, PickRequest("unrelated")).key == replicas[0].key


def test_a_session_moving_to_another_shared_prompt_follows_the_prompt_not_its_old_replica():
    replicas, choose = stubs(3), picker()
    other_tenant = "You answer questions about the shipping schedule of a harbour, tersely. " * 20
    tenant_home = choose.pick(replicas, PickRequest(other_tenant + "first")).key
    busy(next(r for r in replicas if r.key == tenant_home), 1)  # so the session lands elsewhere
    session_home = choose.pick(replicas, PickRequest("hello", session="user-9")).key
    assert session_home != tenant_home
    moved = choose.pick(replicas, PickRequest(other_tenant + "second", session="user-9"))
    assert moved.key == tenant_home and moved.reason == Reason.PREFIX


def test_least_loaded_and_round_robin_policies():
    replicas = stubs(3)
    busy(replicas[0], 4), busy(replicas[1], 1), busy(replicas[2], 3)
    assert picker("least_loaded").pick(replicas, PickRequest(SYSTEM)).key == replicas[1].key
    rr = picker("round_robin")
    assert [rr.pick(replicas, PickRequest()).key for _ in range(6)] == [r.key for r in replicas] * 2


def test_equally_loaded_replicas_share_unrelated_requests_evenly():
    replicas, choose = stubs(4), picker()
    keys = [choose.pick(replicas, PickRequest(f"{i} unique prompt " * 20)).key for i in range(40)]
    assert {keys.count(r.key) for r in replicas} == {10}


def test_a_pick_costs_microseconds():
    replicas, choose = stubs(8), picker()
    for i, replica in enumerate(replicas):
        busy(replica, i % 3)
    prompts = [SYSTEM[: 300 * (i % 7 + 1)] + f"tail {i}" for i in range(2000)]  # up to ~2 KB, shared heads
    start = time.perf_counter()
    for prompt in prompts:
        choose.pick(replicas, PickRequest(prompt, session=prompt[-6:]))
    per_pick_us = (time.perf_counter() - start) / len(prompts) * 1e6
    print(f"affinity pick over 8 replicas: {per_pick_us:.1f} us")
    assert per_pick_us < 500  # a loaded 2-core CI machine; measured ~20 us idle


def test_the_bound_weighs_requests_waiting_for_their_first_token_not_those_already_answering():
    replicas, choose = stubs(3), picker()
    warm = replicas[0]
    choose.prefixes.record(block_hashes(SYSTEM, 128), warm.key)
    busy(warm, 6)  # six requests decoding there, none waiting: a new one starts at once
    assert choose.pick(replicas, PickRequest(SYSTEM + "q1")).key == warm.key
    queued(warm, 3)  # three waiting for a slot while the others are idle: past the bound
    assert choose.pick(replicas, PickRequest(SYSTEM + "q2")).reason == Reason.LOAD
    busy(warm, 0)
    for _ in range(3):  # this backend's own requests sent there, not answering yet
        Prefill(warm.load)
    assert warm.load.pending() == 3
    assert choose.pick(replicas, PickRequest(SYSTEM + "q3")).key != warm.key


def test_an_answer_with_fewer_cached_tokens_than_the_index_credited_lowers_that_replicas_horizon():
    replicas, choose = stubs(2), picker()
    first = choose.pick(replicas, PickRequest(SYSTEM + "q0"))
    again = choose.pick(replicas, PickRequest(SYSTEM + "q1"))
    assert again.key == first.key and again.reason == Reason.PREFIX and again.credited_blocks == len(SYSTEM) // 128
    default = choose.prefixes.horizon(again.key)
    prompt_tokens = (len(SYSTEM) + 2) // 4
    choose.observed(again, CacheUse(prompt_tokens=prompt_tokens, cached_tokens=prompt_tokens - 40))  # kept
    assert choose.prefixes.horizon(again.key) == default
    choose.observed(again, CacheUse(prompt_tokens=prompt_tokens, cached_tokens=0))  # evicted
    assert choose.prefixes.horizon(again.key) < default
    assert choose.prefixes.horizon(next(r.key for r in replicas if r.key != again.key)) == default


# -- pool -------------------------------------------------------------------------
class FakeReplica:
    """A replica client over no network: what it answers is set by the test."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.up = True
        self.busy = False  # its readiness check does not answer in time
        self.failing = False
        self.engine: EngineLoad | None = None
        self.served = 0
        self.closed = False

    async def ready(self) -> bool | None:
        return None if self.busy else self.up

    async def engine_load(self) -> EngineLoad | None:
        if not self.up:
            raise ReplicaUnreachable(self.key)
        return self.engine

    async def close(self) -> None:
        self.closed = True

    async def answer(self) -> str:
        if not self.up or self.failing:
            raise unavailable("The model server is unreachable; retry shortly.")
        self.served += 1
        return self.key

    async def tokens(self, fail_after: int | None = None) -> AsyncIterator[str]:
        if not self.up:
            raise unavailable("The model server is unreachable; retry shortly.")
        for i in range(3):
            if fail_after is not None and i == fail_after:
                raise unavailable("The model server ended the stream before finishing; retry shortly.")
            yield f"{self.key}:{i}"
        self.served += 1


def make_pool(n: int = 3, **overrides: object) -> tuple[Pool[FakeReplica], dict[str, FakeReplica]]:
    keys = [f"r{i}:1" for i in range(n)]
    values = {
        "upstream_url": ",".join(f"http://{k}/v1" for k in keys),
        "pool_scrape_interval_seconds": 0.02,
        "pool_ready_check_seconds": 0.02,
        "pool_eject_seconds": 0.2,
    }
    settings = PoolSettings(**(values | overrides))  # type: ignore[arg-type]
    clients = {k: FakeReplica(k) for k in keys}
    return Pool("test", settings, StaticSource(keys), clients.__getitem__), clients


async def test_requests_another_backend_sent_weigh_on_a_replica_until_its_next_scrape():
    """Pick sharing (sync.py) tells a pool where the other backend replicas sent their requests: a pool
    that has not scraped since counts them as that replica's load."""
    from modelplex_kit.pools.sync import SharedPick

    pool, _ = make_pool(2, pool_scrape_interval_seconds=60)
    try:
        await pool.ready()
        for _ in range(3):
            pool._learn(SharedPick("r0:1", (), 0))
        answers = [await pool.call(PickRequest(), FakeReplica.answer) for _ in range(2)]
        assert answers == ["r1:1", "r1:1"]  # ties would have gone in turn, r0 first
    finally:
        await pool.close()


async def test_other_backends_picks_count_one_scrape_tick_even_where_the_scrape_fails():
    """A replica whose metrics cannot be read keeps its last figures; the others' picks must not pile up
    on it with every tick (they would make it look ever busier, up to a saturated pool's 503s)."""
    from modelplex_kit.pools.sync import SharedPick

    pool, clients = make_pool(2)
    clients["r0:1"].engine = EngineLoad(running=0, waiting=0, kv_cache_usage=0)
    try:
        await pool.ready()
        r0 = next(r for r in pool.replicas if r.key == "r0:1")
        await until(lambda: r0.load.engine is not None, 10, what="a first scrape")

        async def failing_scrape() -> EngineLoad | None:
            raise TimeoutError

        clients["r0:1"].engine_load = failing_scrape  # type: ignore[method-assign]
        for _ in range(100):
            pool._learn(SharedPick("r0:1", (), 0))
        assert r0.load.queue() == 100
        await until(lambda: r0.load.queue() == 0, 10, what="the next tick forgot them")
        assert r0.available  # a slow scrape ejects nothing
    finally:
        await pool.close()


async def test_a_failing_replica_is_skipped_ejected_and_taken_back_once_ready():
    pool, clients = make_pool(3, pool_policy="round_robin")
    clients["r1:1"].up = False
    try:
        answers = [await pool.call(PickRequest(), FakeReplica.answer) for _ in range(9)]
        assert "r1:1" not in answers and len(answers) == 9  # no request failed
        down = next(r for r in pool.replicas if r.key == "r1:1")
        assert not down.available
        clients["r1:1"].up = True
        await until(lambda: down.available, timeout=10)
        answers = [await pool.call(PickRequest(), FakeReplica.answer) for _ in range(6)]
        assert answers.count("r1:1") == 2
    finally:
        await pool.close()


async def test_a_stream_is_retried_before_its_first_item_and_never_after():
    pool, clients = make_pool(2, pool_policy="round_robin")
    try:
        clients["r0:1"].up = False
        items = [item async for item in pool.stream(PickRequest(), FakeReplica.tokens)]
        assert items == ["r1:1:0", "r1:1:1", "r1:1:2"]
        clients["r0:1"].up = True
        for replica in pool.replicas:
            replica.ejected_until = None
        received: list[str] = []
        with pytest.raises(ServiceError) as cut:
            async for item in pool.stream(PickRequest(), lambda c: c.tokens(fail_after=1)):
                received.append(item)
        assert len(received) == 1 and cut.value.status == grpc.StatusCode.UNAVAILABLE
    finally:
        await pool.close()


async def test_a_client_error_is_not_retried_and_ejects_nobody():
    pool, _ = make_pool(3)
    calls = 0

    async def refuse(client: FakeReplica) -> str:
        nonlocal calls
        calls += 1
        raise invalid("bad temperature", param="temperature")

    try:
        with pytest.raises(ServiceError) as refused:
            await pool.call(PickRequest(), refuse)
        assert refused.value.param == "temperature" and calls == 1
        assert all(r.available for r in pool.replicas)
    finally:
        await pool.close()


async def test_every_replica_failing_gives_the_failure_after_trying_each_once():
    pool, clients = make_pool(3, pool_max_attempts=5)
    for client in clients.values():
        client.failing = True
    try:
        with pytest.raises(ServiceError) as failed:
            await pool.call(PickRequest(), FakeReplica.answer)
        assert failed.value.status == grpc.StatusCode.UNAVAILABLE
        assert not any(r.available for r in pool.replicas)
        # All ejected: a request still tries one rather than failing untried.
        for client in clients.values():
            client.failing = False
        assert await pool.call(PickRequest(), FakeReplica.answer) in clients
    finally:
        await pool.close()


async def test_a_saturated_pool_answers_503_with_retry_after_at_once():
    pool, clients = make_pool(2, pool_max_queue=4)
    for client in clients.values():
        client.engine = EngineLoad(running=8, waiting=6, kv_cache_usage=0.9)
    try:
        assert await pool.ready()  # starts the pool: its scrape loop reads the queues
        await until(lambda: all(r.load.engine is not None for r in pool.replicas), 10)
        with pytest.raises(ServiceError) as full:
            await pool.call(PickRequest(), FakeReplica.answer)
        assert full.value.http.status == 503 and int(full.value.headers["retry-after"]) >= 1
        assert sum(c.served for c in clients.values()) == 0
        clients["r1:1"].engine = EngineLoad(running=8, waiting=1, kv_cache_usage=0.9)
        await until(lambda: pool.replicas[1].load.queue() < 4, 10)
        assert await pool.call(PickRequest(), FakeReplica.answer) == "r1:1"
    finally:
        await pool.close()


async def test_a_replica_whose_scrape_is_refused_is_ejected_before_any_request_fails():
    pool, clients = make_pool(2)
    try:
        assert await pool.ready()
        clients["r0:1"].up = False
        await until(lambda: not pool.replicas[0].available, timeout=10)
        assert {await pool.call(PickRequest(), FakeReplica.answer) for _ in range(4)} == {"r1:1"}
        assert await pool.ready()
    finally:
        await pool.close()


async def test_a_replica_too_busy_to_answer_its_readiness_check_is_not_ejected_but_one_not_ready_is():
    pool, clients = make_pool(2)
    try:
        assert await pool.ready()
        clients["r0:1"].busy = True
        checks = [r.next_ready_check for r in pool.replicas]
        await until(lambda: all(r.next_ready_check > c for r, c in zip(pool.replicas, checks, strict=True)), 10)
        await until(lambda: all(r.next_ready_check > c + 0.1 for r, c in zip(pool.replicas, checks, strict=True)), 10)
        assert pool.replicas[0].available
        clients["r1:1"].up, clients["r1:1"].engine = False, None
        clients["r1:1"].engine_load = clients["r0:1"].engine_load  # its scrape still answers: only readiness fails
        await until(lambda: not pool.replicas[1].available, 10)
    finally:
        await pool.close()


class Snapshots:
    """A replica source the test drives: each put is the next snapshot."""

    def __init__(self, first: set[str]) -> None:
        self.queue: asyncio.Queue[frozenset[str]] = asyncio.Queue()
        self.queue.put_nowait(frozenset(first))

    async def snapshots(self) -> AsyncIterator[frozenset[str]]:
        while True:
            yield await self.queue.get()


async def test_a_replica_leaving_the_source_finishes_its_requests_before_it_is_closed():
    clients = {k: FakeReplica(k) for k in ("r0:1", "r1:1")}
    source = Snapshots(set(clients))
    pool = Pool("test", PoolSettings(upstream_url="http://r0:1/v1"), source, clients.__getitem__)
    release = asyncio.Event()

    async def slow(client: FakeReplica) -> str:
        await release.wait()
        return client.key

    try:
        assert await pool.ready()
        first = asyncio.ensure_future(pool.call(PickRequest(), slow))
        await until(lambda: sum(r.load.in_flight for r in pool.replicas) == 1, 10)
        busy_key = next(r.key for r in pool.replicas if r.load.in_flight)
        source.queue.put_nowait(frozenset(clients) - {busy_key})
        await until(lambda: [r.key for r in pool.replicas] == sorted(set(clients) - {busy_key}), 10)
        assert not clients[busy_key].closed  # its request is still running there
        release.set()
        assert await first == busy_key
        await until(lambda: clients[busy_key].closed, 10)
        assert await pool.call(PickRequest(), FakeReplica.answer) != busy_key
    finally:
        await pool.close()


def answer_with_usage(cached_tokens: int, prompt_tokens: int = 500):
    async def send(client: FakeReplica) -> dict:
        return {"usage": {"prompt_tokens": prompt_tokens, "prompt_tokens_details": {"cached_tokens": cached_tokens}}}

    return send


async def test_a_request_counts_as_prefilling_on_its_replica_until_its_first_item_or_its_answer():
    pool, _ = make_pool(1)
    counted: list[int] = []

    def prefilling() -> int:
        return pool.replicas[0].load.prefilling

    async def tokens(client: FakeReplica) -> AsyncIterator[str]:
        counted.append(prefilling())  # sent, nothing back yet
        async for item in client.tokens():
            yield item

    async def answer(client: FakeReplica) -> str:
        counted.append(prefilling())
        return await client.answer()

    try:
        async for _ in pool.stream(PickRequest(SYSTEM), tokens):
            counted.append(prefilling())
        await pool.call(PickRequest(SYSTEM), answer)
        assert counted == [1, 0, 0, 0, 1] and prefilling() == 0
    finally:
        await pool.close()


async def test_a_replica_removed_while_its_request_runs_has_its_late_answer_ignored():
    """The race: the source drops a replica while a request on it is still running; its answer
    (whose usage says the engine had evicted the prefix) arrives after the picker forgot it."""
    clients = {k: FakeReplica(k) for k in ("r0:1", "r1:1")}
    source = Snapshots(set(clients))
    pool = Pool("test", PoolSettings(upstream_url="http://r0:1/v1"), source, clients.__getitem__)
    release = asyncio.Event()

    async def slow_miss(client: FakeReplica) -> dict:
        await release.wait()
        return await answer_with_usage(cached_tokens=0)(client)

    try:
        assert await pool.ready()
        await pool.call(PickRequest(SYSTEM + "q0"), answer_with_usage(0), cache_use_of)
        running = asyncio.ensure_future(pool.call(PickRequest(SYSTEM + "q1"), slow_miss, cache_use_of))
        await until(lambda: sum(r.load.in_flight for r in pool.replicas) == 1, 10)
        busy_key = next(r.key for r in pool.replicas if r.load.in_flight)
        source.queue.put_nowait(frozenset(clients) - {busy_key})
        await until(lambda: [r.key for r in pool.replicas] == sorted(set(clients) - {busy_key}), 10)
        release.set()
        assert (await running)["usage"]["prompt_tokens"] == 500  # no error reached the caller
        assert pool.picker.prefixes.horizon(busy_key) == PoolSettings().pool_prefix_index_blocks
    finally:
        await pool.close()


class Flaky:
    """A source that fails once after its first snapshot, then yields the second."""

    def __init__(self) -> None:
        self.runs = 0

    async def snapshots(self) -> AsyncIterator[frozenset[str]]:
        self.runs += 1
        if self.runs == 1:
            yield frozenset({"r0:1"})
            raise ConnectionError("watch broke")
        yield frozenset({"r0:1", "r1:1"})


async def test_a_failing_source_is_restarted_and_a_failing_scrape_stops_nothing():
    clients = {k: FakeReplica(k) for k in ("r0:1", "r1:1")}

    async def broken_scrape() -> EngineLoad | None:
        raise RuntimeError("unexpected")

    clients["r0:1"].engine_load = broken_scrape  # type: ignore[method-assign]
    clients["r1:1"].engine = EngineLoad(running=1, waiting=2, kv_cache_usage=0)
    settings = PoolSettings(upstream_url="http://r0:1/v1", pool_scrape_interval_seconds=0.02)
    pool = Pool("test", settings, Flaky(), clients.__getitem__)
    try:
        assert await pool.ready()
        await until(lambda: len(pool.replicas) == 2, 10)
        await until(lambda: pool.replicas[1].load.engine is not None, 10)  # scrapes go on past r0's failures
    finally:
        await pool.close()


async def test_a_source_that_never_answers_holds_requests_for_a_bounded_time_only(monkeypatch):
    monkeypatch.setattr(pool_module, "_FIRST_SNAPSHOT_S", 0.5)

    class Silent:
        async def snapshots(self) -> AsyncIterator[frozenset[str]]:
            await asyncio.Event().wait()
            yield frozenset()

    pool = Pool("test", PoolSettings(upstream_url="http://r0:1/v1"), Silent(), FakeReplica)
    try:
        with pytest.raises(ServiceError) as empty:
            await asyncio.wait_for(pool.call(PickRequest(), FakeReplica.answer), 30)
        assert empty.value.status == grpc.StatusCode.UNAVAILABLE
        start = time.monotonic()
        with pytest.raises(ServiceError):
            await pool.call(PickRequest(), FakeReplica.answer)
        assert time.monotonic() - start < 0.4  # the first wait was the pool's, not every request's
    finally:
        await pool.close()


async def test_a_pool_whose_every_replica_was_down_is_ready_as_soon_as_one_is_back():
    pool, clients = make_pool(1, pool_eject_seconds=30.0, pool_eject_max_seconds=60.0)
    try:
        clients["r0:1"].up = False
        assert not await pool.ready()
        await until(lambda: not pool.replicas[0].available, 10)
        clients["r0:1"].up = True
        assert await pool.ready()  # not 30 s later, when its backoff ends
        assert pool.replicas[0].available
    finally:
        await pool.close()
