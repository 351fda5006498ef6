"""The real vLLM's KV-cache events behind two backends' engine pools (modelplex_kit.pools.kv_events).

vLLM runs with the chart's ``--kv-events-config`` (ZMQ on a free port here). Backend A's pool has only
that vLLM and serves a tenant's prompt; backend B's pool has the vLLM and a second replica, shares no
picks with A, and has never seen the prompt: what places B's request on the vLLM is B's view of the
vLLM's own events, and the vLLM's answer confirms it found the prefix cached. The second replica is a
stand-in (libs/tests/test_pools_http.py's FakeVllm on 127.0.0.2, answering the pool's probes; it is never
sent a request in this test, and would answer one with its own name).
"""

from __future__ import annotations

import httpx
import pytest

from libs.tests.test_pools_http import FakeVllm, serving
from modelplex_kit.pools.http import OpenAIPool
from modelplex_kit.pools.kv_events import EngineCacheView
from modelplex_kit.pools.picker import PickRequest, Reason
from modelplex_kit.pools.settings import PoolSettings
from modelplex_text.adapters.openai_wire import tokenize_body
from tests.support.until import until

pytestmark = pytest.mark.vllm


def tenant_prompt(tenant: str) -> str:
    # The tenant's name first: its first KV block differs from every other tenant's (and from any block
    # stored before backend B subscribed, whose chain B could not follow).
    return f"{tenant}. You are the claims desk of a harbour insurer; answer in one sentence. " * 12


def chat(model: str, system: str, question: str) -> dict:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    return {"model": model, "messages": messages, "max_tokens": 1, "temperature": 0}


def pick_for(body: dict) -> PickRequest:
    prompt = "".join(m["content"] for m in body["messages"])
    return PickRequest(prompt=prompt, tokenize=tokenize_body(body))


@pytest.fixture
async def stand_in():
    """The second replica: the pool tests' stand-in vLLM pod (it answers the pool's probes, and a request
    with its own name), on a loopback address of its own (engines publish on one port of their host)."""
    replica = FakeVllm("stand-in", host="127.0.0.2")
    async with serving(replica):
        yield replica.url


async def test_a_prefix_served_through_backend_a_is_picked_for_its_replica_through_backend_b(vllm_text, stand_in):
    model = vllm_text.served_model
    vllm_key = vllm_text.base_url.removeprefix("http://").removesuffix("/v1")
    backend_a = OpenAIPool("kv-a", PoolSettings(upstream_url=vllm_text.base_url), timeout_seconds=300)
    settings_b = PoolSettings(
        upstream_url=f"{vllm_text.base_url},{stand_in}",
        pool_kv_events_port=vllm_text.kv_events_port,
        pool_scrape_interval_seconds=0.1,
        # This 2-core machine's vLLM may take longer than the default 250 ms to tokenize while it serves.
        pool_tokenize_timeout_seconds=30,
    )
    backend_b = OpenAIPool("kv-b", settings_b, timeout_seconds=300)
    try:
        assert await backend_a.ready() and await backend_b.ready()
        view: EngineCacheView = backend_b.pool._engine_cache.view

        # A PUB socket sends nothing to a subscriber still connecting: A serves warm-up prompts until
        # B's view has heard the vLLM store one (the events' own wire format, decoded).
        warmups = iter(range(1000))

        async def b_hears_the_engine() -> bool:
            body = chat(model, tenant_prompt(f"Warm-up tenant {next(warmups)}"), "Hello?")
            await backend_a.call("chat/completions", body, pick=pick_for(body))
            return view.held(vllm_key) > 0

        await until(b_hears_the_engine, 120, what="backend B's view received the vLLM's BlockStored events")
        assert view.block_size == 32  # the chart's --block-size for the engine suite

        for tenant in ("Tenant Aldebaran", "Tenant Betelgeuse", "Tenant Capella"):
            system = tenant_prompt(tenant)
            first = chat(model, system, "Is a cracked hull covered?")
            await backend_a.call("chat/completions", first, pick=pick_for(first))
            tokens = await tokens_of(vllm_text.root_url, first)

            async def b_knows_it(tokens: list[int] = tokens) -> bool:
                return view.matches(tokens, [vllm_key])[vllm_key] >= 4

            await until(b_knows_it, 30, what=f"backend B's view holds {tenant}'s prefix on the vLLM")

            second = chat(model, system, "And a lost anchor?")
            pick = pick_for(second)
            replicas = backend_b.pool.replicas
            engine_cached = await backend_b.pool._engine_cached(replicas, pick)
            chosen = backend_b.pool.picker.pick(replicas, pick, engine_cached)
            assert (chosen.key, chosen.reason) == (vllm_key, Reason.ENGINE_CACHE), tenant
            # And through B's whole call path: the vLLM answers, having found the prefix cached.
            answer = await backend_b.call("chat/completions", second, pick=pick_for(second))
            assert answer["model"] == model
            assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] >= 4 * 32, answer["usage"]

        # A prompt no engine has seen is placed by load, not by the events.
        cold = chat(model, tenant_prompt("Tenant Deneb"), "Hello?")
        replicas = backend_b.pool.replicas
        engine_cached = await backend_b.pool._engine_cached(replicas, pick_for(cold))
        assert engine_cached is not None and not any(engine_cached.values())
    finally:
        await backend_a.close()
        await backend_b.close()


async def tokens_of(root_url: str, body: dict) -> list[int]:
    async with httpx.AsyncClient(timeout=30) as client:
        answer = await client.post(f"{root_url}/tokenize", json=tokenize_body(body))
    answer.raise_for_status()
    return answer.json()["tokens"]
