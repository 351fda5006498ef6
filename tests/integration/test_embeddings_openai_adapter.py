"""The openai embeddings adapter against a canned aiohttp server replaying vLLM's /v1/embeddings.

No vLLM pooling model (nor an embedding GGUF for llama.cpp's server) ships in a
package here, so the server replays vLLM's response shape (``object: list``,
``data[i].index``, ``usage`` with only the batch total) and its 400 envelope;
the vectors it serves are the local engine's, so they can be compared.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from aiohttp import web

from modelplex.v1 import embeddings_pb2 as pb
from modelplex_embeddings.adapters.local import LocalEngine
from modelplex_embeddings.adapters.openai_http import OpenAIHttpEngine
from modelplex_embeddings.servicer import EmbeddingsServicer
from modelplex_embeddings.settings import BatchingSettings, LocalSettings, RemoteSettings
from modelplex_kit.errors import ServiceError
from tests.support.ports import free_port

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def local() -> LocalEngine:
    return LocalEngine(LocalSettings())


@pytest.fixture
async def vllm(local):
    seen: list[dict] = []

    async def embeddings(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append(body)
        if any(isinstance(x, str) and "poison" in x for x in body["input"]):
            error = {"message": "input rejected", "type": "BadRequestError", "param": None, "code": 400}
            return web.json_response({"error": error}, status=400)  # vLLM's envelope
        inputs = [
            pb.EmbedInput(text=x) if isinstance(x, str) else pb.EmbedInput(tokens=pb.TokenIds(ids=x))
            for x in body["input"]
        ]
        vectors = await local.embed(local.prepare(inputs))
        data = [{"index": i, "object": "embedding", "embedding": v.tolist()} for i, v in enumerate(vectors)]
        data.reverse()  # order comes from `index`, not position
        return web.json_response(
            {
                "id": "embd-1",
                "object": "list",
                "created": 1,
                "model": body["model"],
                "data": data,
                "usage": {"prompt_tokens": 99, "total_tokens": 99, "completion_tokens": 0},
            }
        )

    app = web.Application()
    app.router.add_post("/v1/embeddings", embeddings)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}/v1", seen
    await runner.cleanup()


async def test_vectors_order_and_exact_usage_through_the_upstream(vllm, local):
    url, seen = vllm
    engine = OpenAIHttpEngine(RemoteSettings(upstream_url=url, upstream_model="minilm"))
    servicer = EmbeddingsServicer(engine, BatchingSettings(max_wait_ms=20))
    texts = ["The weather is lovely today.", "He drove to the stadium."]
    request = pb.EmbedRequest(
        model="m",
        inputs=[pb.EmbedInput(text=t) for t in texts] + [pb.EmbedInput(tokens=pb.TokenIds(ids=[101, 7592, 102]))],
    )
    response = await servicer.Embed(request, None)
    expected = await local.embed(local.prepare(request.inputs))
    np.testing.assert_allclose([e.values for e in response.embeddings], expected, atol=1e-6)
    assert response.usage.prompt_tokens == 8 + 8 + 3  # counted here, not vLLM's batch total
    assert seen[-1]["input"][2] == [101, 7592, 102] and seen[-1]["model"] == "minilm"
    await servicer.close()


async def test_merged_requests_with_one_refused_input_fail_alone(vllm):
    url, seen = vllm
    servicer = EmbeddingsServicer(OpenAIHttpEngine(RemoteSettings(upstream_url=url)), BatchingSettings(max_wait_ms=50))
    good, bad = await asyncio.gather(
        servicer.Embed(pb.EmbedRequest(model="m", inputs=[pb.EmbedInput(text="fine")]), None),
        servicer.Embed(pb.EmbedRequest(model="m", inputs=[pb.EmbedInput(text="poison")]), None),
        return_exceptions=True,
    )
    assert len(good.embeddings) == 1 and isinstance(bad, ServiceError) and bad.http.status == 400
    assert len(seen[0]["input"]) == 2  # merged first
    await servicer.close()


async def test_an_unreachable_upstream_is_503():
    engine = OpenAIHttpEngine(RemoteSettings(upstream_url=f"http://127.0.0.1:{free_port()}/v1"))
    with pytest.raises(ServiceError) as err:
        await engine.embed(engine.prepare([pb.EmbedInput(text="x")]))
    assert err.value.http.status == 503
    await engine.close()
