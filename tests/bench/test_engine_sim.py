"""The scheduling benchmark's engine simulator behaves as the benchmark relies on: a cached prefix
skips its prefill, a full replica queues, /metrics is vLLM's, read by Prometheus' own parser, and
runtime LoRA adapters load, serve and unload as vLLM's do, within the replica's slots."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.engine_sim import PrefixCache, SimParams, block_hashes
from bench.scheduling import Simulators
from tests.support.until import until

WORDS = " ".join(f"w{i}" for i in range(63))  # + the role marker: 64 tokens, four blocks of 16


def _replica(params: SimParams) -> tuple[Simulators, openai.AsyncOpenAI]:
    """One replica in its own process, as the benchmark runs them (and so /metrics can be read blocking)."""
    sim = Simulators.start(1, params)
    return sim, openai.AsyncOpenAI(base_url=sim.urls()[0], api_key="unused", max_retries=0)


def _metrics(address: str) -> dict[str, tuple[str, float]]:
    """family name -> (type, value of its one sample)"""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {f.name: (f.type, f.samples[0].value) for f in text_string_to_metric_families(text) if f.samples}


def _series(address: str, family: str) -> list[tuple[dict[str, str], float]]:
    """Every sample of one family: (labels, value)."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return [(s.labels, s.value) for f in text_string_to_metric_families(text) if f.name == family for s in f.samples]


def _post(address: str, path: str, body: dict) -> tuple[int, str]:
    """(status, body text) of a JSON POST, errors included."""
    request = urllib.request.Request(
        f"http://{address}{path}", json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


async def _load(address: str, name: str, path: str = "", **extra) -> tuple[int, str]:
    body = {"lora_name": name, "lora_path": path or f"/adapters/{name}", **extra}
    return await asyncio.to_thread(_post, address, "/v1/load_lora_adapter", body)


async def _unload(address: str, name: str) -> tuple[int, str]:
    return await asyncio.to_thread(_post, address, "/v1/unload_lora_adapter", {"lora_name": name})


def _error_message(text: str) -> str:
    """The message of an OpenAI error envelope."""
    error = json.loads(text)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error["message"]


async def _ttft(client: openai.AsyncOpenAI, content: str, model: str = "sim") -> tuple[float, int]:
    """Seconds to the first streamed text, and the cached prompt tokens the usage reports."""
    start, first, cached = time.perf_counter(), None, -1
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": content}],
        max_tokens=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - start
        if chunk.usage:
            cached = chunk.usage.prompt_tokens_details.cached_tokens
    assert first is not None
    return first, cached


async def test_a_cached_prefix_skips_its_prefill() -> None:
    # 20 ms per uncached prompt token: 64 tokens take at least 1.28 s cold; the same prompt again
    # computes only its last token (as vLLM, which needs that token's logits).
    replica, client = _replica(SimParams(prefill_seconds_per_token=0.02, decode_seconds_per_token=0.001))
    try:
        cold, cold_cached = await _ttft(client, WORDS)
        warm, warm_cached = await _ttft(client, WORDS)
        other, other_cached = await _ttft(client, WORDS.replace("w0 ", "x0 "))  # differs in the first block
        metrics = _metrics(replica.addresses[0])
    finally:
        replica.stop()
    assert cold >= 64 * 0.02 and cold_cached == 0
    assert warm_cached == 63 and warm < cold / 2
    assert other_cached == 0 and other >= 64 * 0.02  # chained block hashes: nothing after a changed block matches
    assert metrics["vllm:prefix_cache_queries"] == ("counter", 3 * 64)
    assert metrics["vllm:prefix_cache_hits"] == ("counter", 63)


async def test_prefills_take_turns_on_a_replica() -> None:
    # Two cold 64-token prompts at once, 10 ms per token: one prefill waits for the other's 0.64 s.
    replica, client = _replica(SimParams(prefill_seconds_per_token=0.01, decode_seconds_per_token=0.001))
    try:
        firsts = await asyncio.gather(_ttft(client, WORDS), _ttft(client, WORDS.replace("w", "v")))
    finally:
        replica.stop()
    assert max(t for t, _ in firsts) >= 2 * 64 * 0.01


async def test_a_saturated_replica_queues_in_order_and_reports_it() -> None:
    replica, client = _replica(SimParams(max_running=1, decode_seconds_per_token=0.05))
    try:
        requests = [
            asyncio.create_task(client.completions.create(model="sim", prompt=f"p{i}", max_tokens=20)) for i in range(3)
        ]
        await until(lambda: _metrics(replica.addresses[0])["vllm:num_requests_waiting"][1] == 2, timeout=30)
        running = _metrics(replica.addresses[0])["vllm:num_requests_running"]
        done = await asyncio.gather(*requests)
        idle = _metrics(replica.addresses[0])
    finally:
        replica.stop()
    assert running == ("gauge", 1)
    assert [c.usage.completion_tokens for c in done] == [20, 20, 20]
    assert done[0].choices[0].text.split() == ["tok"] * 20 and done[0].choices[0].finish_reason == "length"
    assert idle["vllm:num_requests_waiting"] == ("gauge", 0) and idle["vllm:num_requests_running"] == ("gauge", 0)
    assert idle["vllm:kv_cache_usage_perc"] == ("gauge", 0)


async def test_metrics_are_vllms_names_and_types() -> None:
    replica, client = _replica(SimParams())
    try:
        reply = await client.chat.completions.create(model="sim", messages=[{"role": "user", "content": "hi"}])
        models = await client.models.list()
        with urllib.request.urlopen(f"http://{replica.addresses[0]}/health", timeout=10) as health:
            assert health.status == 200
        metrics = _metrics(replica.addresses[0])
    finally:
        replica.stop()
    assert reply.choices[0].message.content and reply.usage.prompt_tokens == 2
    assert [m.id for m in models.data] == ["sim"]
    assert {name: kind for name, (kind, _) in metrics.items() if name.startswith("vllm:")} == {
        "vllm:num_requests_running": "gauge",
        "vllm:num_requests_waiting": "gauge",
        "vllm:kv_cache_usage_perc": "gauge",
        "vllm:prefix_cache_queries": "counter",
        "vllm:prefix_cache_hits": "counter",
        "vllm:lora_requests_info": "gauge",  # LoRA is on by default (four slots), as vLLM with --enable-lora
    }


def test_the_prefix_cache_is_bounded_and_least_recently_used() -> None:
    cache = PrefixCache(capacity_blocks=4)
    first, second = block_hashes([f"a{i}" for i in range(32)], 16), block_hashes([f"b{i}" for i in range(32)], 16)
    cache.insert(first)
    cache.insert(second)
    assert cache.match(first) == 2  # touched: now the most recent
    cache.insert(block_hashes([f"c{i}" for i in range(32)], 16))
    assert len(cache) == 4 and cache.match(first) == 2 and cache.match(second) == 0
    assert block_hashes([f"a{i}" for i in range(20)], 16) == first[:1]  # only full blocks


@pytest.mark.parametrize("bad", [{"model": "sim"}, {"model": "sim", "prompt": "x", "max_tokens": 0}])
async def test_bad_requests_are_openai_errors(bad) -> None:
    replica, client = _replica(SimParams())
    try:
        with pytest.raises(openai.BadRequestError):
            await client.post("/completions", body=bad, cast_to=object)
    finally:
        replica.stop()


async def test_with_an_events_port_it_publishes_vllms_kv_events_that_a_pool_view_follows() -> None:
    """As vLLM with --kv-events-config: what its prefix cache stores and evicts, on ZMQ in vLLM's format,
    with /tokenize's ids; the kit's view (modelplex_kit.pools.kv_events) then agrees with the cache."""
    import zmq
    import zmq.asyncio

    from modelplex_kit.pools.kv_events import EngineCacheView, decode_batch
    from tests.support.ports import free_port

    port = free_port()
    replica = Simulators.start(1, SimParams(cache_blocks=4, prefill_seconds_per_token=0.0), events_port=port)
    client = openai.AsyncOpenAI(base_url=replica.urls()[0], api_key="unused", max_retries=0)
    view, address = EngineCacheView(max_blocks_per_replica=100), replica.addresses[0]
    socket = zmq.asyncio.Context.instance().socket(zmq.SUB)
    socket.setsockopt(zmq.SUBSCRIBE, b"")
    socket.connect(f"tcp://{address.rsplit(':', 1)[0]}:{port}")
    try:

        async def tokens(content: str) -> list[int]:
            body = {"model": "sim", "messages": [{"role": "user", "content": content}]}
            request = urllib.request.Request(
                f"http://{address}/tokenize", data=json.dumps(body).encode(), method="POST"
            )
            return json.load(await asyncio.to_thread(urllib.request.urlopen, request, timeout=10))["tokens"]

        async def served_and_heard(content: str) -> bool:
            await _ttft(client, content)
            while await socket.poll(200):
                view.apply(address, decode_batch((await socket.recv_multipart())[-1]))
            return view.matches(await tokens(content), [address])[address] == 4

        # A PUB socket drops what it sends before the subscription is up: prompts until one is heard.
        n = iter(range(100))
        await until(lambda: served_and_heard(f"u{next(n)} " + WORDS), timeout=30)
        # Four blocks fit: a second prompt of four evicts the first one's, and the view follows.
        first = f"x{next(n)} " + WORDS
        await until(lambda: served_and_heard(first), timeout=30)
        assert await served_and_heard(f"y{next(n)} " + WORDS)
        assert view.matches(await tokens(first), [address])[address] == 0 and view.held(address) == 4
    finally:
        socket.close(linger=0)
        replica.stop()


async def test_lora_adapters_load_serve_and_unload_as_vllms_do() -> None:
    replica, client = _replica(SimParams(lora_slots=2, lora_load_ms=200))
    address = replica.addresses[0]
    try:
        start = time.perf_counter()
        loaded = await _load(address, "a")
        load_seconds = time.perf_counter() - start
        again = await _load(address, "a")
        served = await client.chat.completions.create(model="a", messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.NotFoundError) as unknown:
            await client.chat.completions.create(model="b", messages=[{"role": "user", "content": "hi"}])
        assert (await _load(address, "b"))[0] == 200
        beyond = await _load(address, "c")  # two slots, both taken
        models = {m.id: m.model_dump() for m in (await client.models.list()).data}
        unloaded, unknown_unload = await _unload(address, "b"), await _unload(address, "b")
        assert (await _load(address, "c"))[0] == 200  # b's slot is free again
        reloaded = await _load(address, "a", "/adapters/a-v2", load_inplace=True)
        after = {m.id: m.model_dump() for m in (await client.models.list()).data}
        counters = {
            family: {tuple(labels.values()): value for labels, value in _series(address, family)}
            for family in (
                "modelplex_sim_lora_loads",
                "modelplex_sim_lora_unloads",
                "modelplex_sim_lora_load_refusals",
                "modelplex_sim_lora_requests",
                "modelplex_sim_model_not_found",
            )
        }
    finally:
        replica.stop()
    assert loaded == (200, "Success: LoRA adapter 'a' added successfully.")
    assert load_seconds >= 0.2  # reading the weights takes --lora-load-ms
    assert again[0] == 400 and _error_message(again[1]) == "The lora adapter 'a' has already been loaded."
    assert served.model == "a" and served.choices[0].message.content
    assert unknown.value.status_code == 404 and unknown.value.body["message"] == "The model `b` does not exist."
    assert beyond[0] == 400 and "max loaded adapters reached" in _error_message(beyond[1])
    assert list(models) == ["sim", "a", "b"]
    assert models["a"]["parent"] == "sim" and models["a"]["root"] == "/adapters/a" and models["sim"]["parent"] is None
    assert unloaded == (200, "Success: LoRA adapter 'b' removed successfully.")
    assert unknown_unload[0] == 404 and _error_message(unknown_unload[1]) == "The lora adapter 'b' cannot be found."
    assert reloaded[0] == 200 and list(after) == ["sim", "a", "c"] and after["a"]["root"] == "/adapters/a-v2"
    assert counters["modelplex_sim_lora_loads"] == {(): 4}  # a, b, c and a's reload
    assert counters["modelplex_sim_lora_unloads"] == {(): 1}
    assert counters["modelplex_sim_lora_load_refusals"] == {("slots_full",): 1, ("already_loaded",): 1, ("invalid",): 0}
    assert counters["modelplex_sim_lora_requests"] == {("a",): 1}
    assert counters["modelplex_sim_model_not_found"] == {(): 1}


async def test_concurrent_loads_take_turns_and_share_the_slots() -> None:
    """Two loads of one name: the second sees the first's outcome (vLLM's per-name lock). Two names for the
    last slot: a load under way holds its slot, so one of them is refused."""
    replica, _ = _replica(SimParams(lora_slots=2, lora_load_ms=200))
    address = replica.addresses[0]
    try:
        same = await asyncio.gather(_load(address, "a"), _load(address, "a"))
        last_slot = await asyncio.gather(_load(address, "b"), _load(address, "c"))
        loads = _series(address, "modelplex_sim_lora_loads")
    finally:
        replica.stop()
    assert sorted(status for status, _ in same) == [200, 400]
    assert sorted(status for status, _ in last_slot) == [200, 400]
    assert "max loaded adapters reached" in _error_message(max(last_slot)[1])
    assert loads == [({}, 2)]


async def test_a_load_stalls_the_replica_while_it_reads_the_weights() -> None:
    # A 300-token decode of 3 s; a 0.5 s load during it: no decode step starts meanwhile (the one under way,
    # of at most stream_interval tokens, finishes).
    params = SimParams(lora_load_ms=500, prefill_seconds_per_token=0.0, decode_seconds_per_token=0.01)
    replica, client = _replica(params)
    address = replica.addresses[0]
    try:
        start = time.perf_counter()
        request = asyncio.create_task(client.completions.create(model="sim", prompt="p", max_tokens=300))
        await until(lambda: _metrics(address)["vllm:num_requests_running"][1] == 1, timeout=30)
        assert (await _load(address, "a"))[0] == 200
        within = not request.done()  # the whole load fell within the decode
        await request
        elapsed = time.perf_counter() - start
    finally:
        replica.stop()
    assert within
    assert elapsed >= 300 * 0.01 + 0.5 - params.stream_interval * 0.01


async def test_the_prefix_cache_is_per_adapter() -> None:
    replica, client = _replica(SimParams(lora_load_ms=0, prefill_seconds_per_token=0.0))
    address = replica.addresses[0]
    try:
        assert (await _load(address, "a"))[0] == 200
        _, base_cold = await _ttft(client, WORDS)
        _, adapter_cold = await _ttft(client, WORDS, model="a")  # cached under the base only
        _, adapter_warm = await _ttft(client, WORDS, model="a")
        _, base_warm = await _ttft(client, WORDS)
        probe = {"messages": [{"role": "user", "content": WORDS}]}
        probed = {
            model: json.loads((await asyncio.to_thread(_post, address, "/sim/cached", probe | {"model": model}))[1])
            for model in ("sim", "a", "b")
        }
    finally:
        replica.stop()
    assert (base_cold, adapter_cold, adapter_warm, base_warm) == (0, 0, 63, 63)
    assert {model: reply["cached_tokens"] for model, reply in probed.items()} == {"sim": 64, "a": 64, "b": 0}


async def test_lora_requests_info_names_the_running_and_waiting_adapters() -> None:
    """vLLM's odd gauge: its labels carry the state, its value the time it was set; the newest series is now."""
    replica, client = _replica(SimParams(max_running=1, lora_load_ms=0, decode_seconds_per_token=0.05))
    address = replica.addresses[0]

    def now() -> dict[str, str]:
        return max(_series(address, "vllm:lora_requests_info"), key=lambda series: series[1])[0]

    try:
        idle = now()
        assert (await _load(address, "a"))[0] == 200 and (await _load(address, "b"))[0] == 200
        first = asyncio.create_task(client.completions.create(model="a", prompt="p", max_tokens=20))
        await until(lambda: now()["running_lora_adapters"] == "a", timeout=30)
        second = asyncio.create_task(client.completions.create(model="b", prompt="p", max_tokens=20))
        await until(lambda: now()["waiting_lora_adapters"] == "b", timeout=30)
        busy = now()
        await asyncio.gather(first, second)
        done = now()
    finally:
        replica.stop()
    assert idle == {"max_lora": "4", "running_lora_adapters": "", "waiting_lora_adapters": ""}
    assert busy == {"max_lora": "4", "running_lora_adapters": "a", "waiting_lora_adapters": "b"}
    assert done == idle


async def test_with_no_lora_slots_lora_is_off() -> None:
    """As vLLM without runtime LoRA updating: its routes are not mounted (FastAPI's 404), no LoRA gauge."""
    replica, client = _replica(SimParams(lora_slots=0))
    address = replica.addresses[0]
    try:
        load, unload = await _load(address, "a"), await _unload(address, "a")
        with pytest.raises(openai.NotFoundError):
            await client.completions.create(model="a", prompt="p", max_tokens=1)
        metrics = _metrics(address)
    finally:
        replica.stop()
    assert load == unload == (404, json.dumps({"detail": "Not Found"}))
    assert "vllm:lora_requests_info" not in metrics
