"""The scheduling benchmark's engine simulator behaves as the benchmark relies on: a cached prefix
skips its prefill, a full replica queues, and /metrics is vLLM's, read by Prometheus' own parser."""

from __future__ import annotations

import asyncio
import json
import time
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


async def _ttft(client: openai.AsyncOpenAI, content: str) -> tuple[float, int]:
    """Seconds to the first streamed text, and the cached prompt tokens the usage reports."""
    start, first, cached = time.perf_counter(), None, -1
    stream = await client.chat.completions.create(
        model="sim",
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
