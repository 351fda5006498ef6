"""LoRA adapters on engine pools (modelplex_kit.pools.adapters): a request goes where its adapter is
loaded, or is loaded first where there is room; a replica holds at most its slots, the least recently
used idle adapter unloaded for another; a lost adapter is loaded again; a refusal is the adapter's 400
and ejects nothing; vLLM's lora_requests_info is read by its newest series. Over in-process replica
clients (the HTTP path: test_pools_http's vLLM stand-in and tests/vllm/test_lora_on_vllm.py)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from modelplex_kit.errors import ServiceError, invalid, upstream_http_error
from modelplex_kit.pools.adapters import AdapterRef
from modelplex_kit.pools.load import parse_engine_load
from modelplex_kit.pools.picker import PickRequest
from modelplex_kit.pools.pool import Pool
from modelplex_kit.pools.settings import PoolSettings
from modelplex_kit.pools.sources import StaticSource
from modelplex_kit.pools.sync import SharedPick
from tests.support.until import until


class LoraReplica:
    """A replica client whose engine loads adapters: it serves a request only under an adapter it holds
    (404 otherwise, as vLLM), and refuses loads past its own slots (a platform bug would show)."""

    def __init__(self, key: str, slots: int) -> None:
        self.key = key
        self.slots = slots
        self.loaded: list[str] = []
        self.loads: list[str] = []
        self.unloads: list[str] = []
        self.refuse: set[str] = set()
        self.gate: asyncio.Event | None = None  # set: requests wait on it (to keep adapters running)

    async def ready(self) -> bool | None:
        return True

    async def engine_load(self):
        return None

    async def close(self) -> None:
        pass

    async def load_adapter(self, adapter: AdapterRef) -> None:
        if adapter.name in self.refuse:
            raise invalid(f"The adapter {adapter.name!r} cannot be loaded by the model server: bad weights", "model")
        assert len(self.loaded) < self.slots, f"{self.key} asked to load {adapter.name} with {self.loaded} loaded"
        self.loads.append(adapter.name)
        self.loaded.append(adapter.name)

    async def unload_adapter(self, name: str) -> None:
        self.unloads.append(name)
        if name in self.loaded:
            self.loaded.remove(name)

    async def answer(self, model: str) -> str:
        if model and model not in self.loaded:
            raise upstream_http_error(404, {"error": {"message": f"The model `{model}` does not exist."}})
        if self.gate is not None:
            await self.gate.wait()
        return self.key


def make_pool(n: int = 2, slots: int = 2, **overrides: object) -> tuple[Pool[LoraReplica], dict[str, LoraReplica]]:
    keys = [f"r{i}:1" for i in range(n)]
    values = {
        "upstream_url": ",".join(f"http://{k}/v1" for k in keys),
        "pool_scrape_interval_seconds": 60,
        "pool_adapter_slots": slots,
        "pool_adapter_wait_seconds": 5,
    }
    settings = PoolSettings(**(values | overrides))  # type: ignore[arg-type]
    clients = {k: LoraReplica(k, slots) for k in keys}
    return Pool("test", settings, StaticSource(keys), clients.__getitem__), clients


def for_adapter(name: str, prompt: str = "") -> PickRequest:
    return PickRequest(prompt=prompt, adapter=AdapterRef(name, f"/adapters/{name}"))


async def serve(pool: Pool[LoraReplica], name: str) -> str:
    return await pool.call(for_adapter(name), lambda client: client.answer(name))


async def test_an_adapter_is_loaded_once_and_its_requests_follow_it():
    pool, clients = make_pool()
    try:
        first = await serve(pool, "kiwi")
        assert [await serve(pool, "kiwi") for _ in range(5)] == [first] * 5
        assert sum(len(c.loads) for c in clients.values()) == 1
        assert pool.adapters.holds(first, "kiwi")
    finally:
        await pool.close()


async def test_a_replica_holds_at_most_its_slots_and_lets_go_of_the_least_recently_used_idle_adapter():
    pool, clients = make_pool(n=1, slots=2)
    try:
        for name in ("a", "b", "a", "c"):  # c needs a slot: b was used less recently than a
            await serve(pool, name)
        replica = clients["r0:1"]
        assert replica.unloads == ["b"] and sorted(replica.loaded) == ["a", "c"]
        assert await serve(pool, "b") == "r0:1" and replica.unloads == ["b", "a"]
    finally:
        await pool.close()


async def test_an_adapter_in_use_is_never_unloaded_a_request_waits_for_a_free_slot_instead():
    pool, clients = make_pool(n=1, slots=1)
    replica = clients["r0:1"]
    replica.gate = asyncio.Event()
    try:
        running = asyncio.create_task(serve(pool, "a"))
        await until(lambda: replica.loaded == ["a"], 5, what="a loaded")
        waiting = asyncio.create_task(serve(pool, "b"))
        await asyncio.sleep(0)  # let it reach its wait
        assert replica.unloads == [] and not waiting.done()
        replica.gate.set()
        assert await running == "r0:1" and await waiting == "r0:1"
        assert replica.unloads == ["a"] and replica.loaded == ["b"]
    finally:
        await pool.close()


async def test_with_no_slot_freeing_in_time_the_request_gets_a_503():
    pool, clients = make_pool(n=1, slots=1, pool_adapter_wait_seconds=0.2)
    replica = clients["r0:1"]
    replica.gate = asyncio.Event()
    try:
        running = asyncio.create_task(serve(pool, "a"))
        await until(lambda: replica.loaded == ["a"], 5, what="a loaded")
        with pytest.raises(ServiceError) as refused:
            await serve(pool, "b")
        assert refused.value.status == grpc.StatusCode.UNAVAILABLE and "LoRA slot" in refused.value.message
        replica.gate.set()
        await running
    finally:
        await pool.close()


async def test_a_request_goes_to_a_replica_with_room_rather_than_evicting_where_others_have_room():
    pool, clients = make_pool(n=2, slots=1)
    try:
        where = {name: await serve(pool, name) for name in ("a", "b")}
        assert where["a"] != where["b"]  # b went to the replica with a free slot, not over a
        assert all(not c.unloads for c in clients.values())
    finally:
        await pool.close()


async def test_a_refused_adapter_is_the_clients_400_and_ejects_nothing():
    pool, clients = make_pool(n=2)
    for client in clients.values():
        client.refuse.add("broken")
    try:
        with pytest.raises(ServiceError) as refused:
            await serve(pool, "broken")
        assert refused.value.status == grpc.StatusCode.INVALID_ARGUMENT and refused.value.param == "model"
        assert all(r.available for r in pool.replicas)
        assert await serve(pool, "kiwi") in clients  # the pool serves on
    finally:
        await pool.close()


async def test_an_adapter_the_engine_lost_is_loaded_again_and_the_request_served():
    """vLLM restarted (runtime adapters are gone) or another backend unloaded it: its name is a 404."""
    pool, clients = make_pool(n=1)
    replica = clients["r0:1"]
    try:
        await serve(pool, "kiwi")
        replica.loaded.clear()
        assert await serve(pool, "kiwi") == "r0:1"
        assert replica.loads == ["kiwi", "kiwi"]
    finally:
        await pool.close()


async def test_concurrent_requests_for_a_cold_adapter_load_it_once():
    pool, clients = make_pool(n=1)
    try:
        answers = await asyncio.gather(*(serve(pool, "kiwi") for _ in range(8)))
        assert answers == ["r0:1"] * 8 and clients["r0:1"].loads == ["kiwi"]
    finally:
        await pool.close()


async def test_a_peers_placement_is_learned_so_both_backends_send_an_adapter_to_the_same_replica():
    pool, clients = make_pool(n=3, slots=2)
    try:
        await pool.ready()
        clients["r2:1"].loaded.append("kiwi")  # another backend loaded it there and said so
        pool._learn(SharedPick("r2:1", (), 0, adapter="kiwi"))
        assert await serve(pool, "kiwi") == "r2:1"
        assert all(not c.loads for c in clients.values())
    finally:
        await pool.close()


async def test_base_model_requests_are_not_narrowed_by_adapters():
    pool, clients = make_pool(n=2, slots=1)
    try:
        await serve(pool, "a")
        picked = {await pool.call(PickRequest(), lambda c: c.answer("")) for _ in range(6)}
        assert picked == set(clients)
    finally:
        await pool.close()


def test_lora_requests_info_is_read_by_its_newest_series():
    """vLLM's gauge is a timestamp per label set, and old label sets linger."""
    text = "\n".join(
        [
            "# TYPE vllm:lora_requests_info gauge",
            'vllm:lora_requests_info{max_lora="2",running_lora_adapters="a,b",waiting_lora_adapters=""} 1.7e9',
            'vllm:lora_requests_info{max_lora="2",running_lora_adapters="c",waiting_lora_adapters="d"} 1.8e9',
            'vllm:lora_requests_info{max_lora="2",running_lora_adapters="",waiting_lora_adapters=""} 1.6e9',
            "vllm:num_requests_running 2",
        ]
    )
    load = parse_engine_load(text)
    assert load is not None and load.lora_busy == frozenset({"c", "d"}) and load.running == 2


async def test_an_adapter_the_engine_says_is_running_is_not_unloaded():
    """Another backend's requests run under it there: this backend's count says idle, the engine does not."""
    pool, clients = make_pool(n=1, slots=1, pool_adapter_wait_seconds=0.2)
    try:
        await serve(pool, "a")
        pool.adapters.engine_says("r0:1", frozenset({"a"}))
        with pytest.raises(ServiceError):
            await serve(pool, "b")
        pool.adapters.engine_says("r0:1", frozenset())
        assert await serve(pool, "b") == "r0:1" and clients["r0:1"].unloads == ["a"]
    finally:
        await pool.close()


async def test_an_adapter_a_peer_just_sent_requests_for_is_not_unloaded_until_the_next_scrape_shows_it():
    """Another backend's request is in flight there: neither this backend's count nor the last scrape says so."""
    pool, clients = make_pool(n=1, slots=1, pool_adapter_wait_seconds=0.2)
    try:
        await pool.ready()
        clients["r0:1"].loaded.append("a")
        pool._learn(SharedPick("r0:1", (), 0, adapter="a"))
        with pytest.raises(ServiceError):
            await serve(pool, "b")
        pool.adapters.peers_counted("r0:1")
        assert await serve(pool, "b") == "r0:1" and clients["r0:1"].unloads == ["a"]
    finally:
        await pool.close()


async def test_an_adapter_being_loaded_counts_as_held_so_requests_meanwhile_wait_for_that_load():
    pool, clients = make_pool(n=2, slots=2)
    slow = asyncio.Event()
    original = clients["r0:1"].load_adapter, clients["r1:1"].load_adapter

    async def slow_load(adapter, load=original[0]):
        await slow.wait()
        await load(adapter)

    clients["r0:1"].load_adapter = slow_load
    clients["r1:1"].load_adapter = slow_load
    try:
        first = asyncio.create_task(serve(pool, "kiwi"))
        await until(lambda: any(pool.adapters.holds(k, "kiwi") for k in clients), 5, what="a load under way")
        second = asyncio.create_task(serve(pool, "kiwi"))
        await asyncio.sleep(0)
        slow.set()
        assert await first == await second
        assert sum(len(c.loads) for c in clients.values()) == 1
    finally:
        await pool.close()


def test_an_engines_answer_to_a_load_is_loaded_the_adapters_400_or_the_upstreams_failure():
    """vLLM's own answers: success is plain text; "already loaded" is another backend's load; a failure in the
    engine is a 500 carrying the reason (the adapter's fault: a 400, no ejection); a 503 is the engine's."""
    from modelplex_kit.errors import adapter_load_error

    assert adapter_load_error("kiwi", 200, {}) is None
    already = {"error": {"message": "The lora adapter 'kiwi' has already been loaded. If you want to ..."}}
    assert adapter_load_error("kiwi", 400, already) is None
    rank = {"error": {"message": "LoRA rank 16 is greater than max_lora_rank 8.", "type": "InternalServerError"}}
    refused = adapter_load_error("kiwi", 500, rank)
    assert refused is not None and refused.status == grpc.StatusCode.INVALID_ARGUMENT and refused.param == "model"
    assert "max_lora_rank 8" in refused.message
    missing = adapter_load_error("kiwi", 404, {"error": {"message": "No adapter found for /nowhere"}})
    assert missing is not None and missing.status == grpc.StatusCode.INVALID_ARGUMENT
    down = adapter_load_error("kiwi", 503, {})
    assert down is not None and down.status == grpc.StatusCode.UNAVAILABLE
