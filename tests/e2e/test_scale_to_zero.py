"""Scale to zero end to end: a model whose engines are not running yet is held, not failed.

The official openai SDK against `make run`'s stack (catalog, text backend, edge); the model's engine is two
real llama.cpp servers (llama-cpp-python's, standing in for vLLM pods) that start only after a 20 s "cold
start". KEDA's side is played by a gRPC client of the catalog's external scaler, calling it as KEDA does
(StreamIsActive held open, GetMetricSpec, GetMetrics, IsActive).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from contextlib import ExitStack

import grpc
import httpx
import openai
import pytest
import yaml

from externalscaler import externalscaler_pb2, externalscaler_pb2_grpc
from modelplex_kit.devstack import Stack
from tests.support.llama_server import llama_server, smollm2_gguf
from tests.support.ports import free_port
from tests.support.until import until

pytestmark = pytest.mark.e2e

KEY = "sk-modelplex-cold"
COLD, NEVER = "cold-llama", "never-llama"
BURST = 100
COLD_START_S = 20.0


def _entry(model_id: str, urls: list[str], timeout: float) -> dict:
    return {
        "id": model_id,
        "modality": "text",
        "backend": f"127.0.0.1:{free_port()}",
        "engine": {"kind": "openai", "settings": {"upstream_url": ",".join(urls), "upstream_model": smollm2_gguf()}},
        "capabilities": ["chat"],
        "context_length": 2048,
        "scale_to_zero": True,
        "cold_start_timeout": timeout,
    }


@pytest.fixture(scope="module")
def cold(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cold-start")
    ports = [free_port(), free_port()]
    catalog = tmp / "catalog.yaml"
    entries = [
        _entry(COLD, [f"http://127.0.0.1:{p}/v1" for p in ports], timeout=180),
        # Its engine never comes: requests wait out the bound.
        _entry(NEVER, [f"http://127.0.0.1:{free_port()}/v1"], timeout=2),
    ]
    catalog.write_text(yaml.safe_dump({"models": entries}))
    stack = Stack(
        catalog,
        catalog_listen=f"127.0.0.1:{free_port()}",
        edge_port=free_port(),
        env={"MODELPLEX_DEV_API_KEY": KEY, "MODELPLEX_EDGE_STREAM_KEEPALIVE_SECONDS": "0.5"},
        log_dir=tmp,
    ).start()
    try:
        yield stack, ports, tmp
    finally:
        stack.stop()


def _ref(key: str) -> externalscaler_pb2.ScaledObjectRef:
    return externalscaler_pb2.ScaledObjectRef(
        name=f"vllm-{key}", namespace="modelplex", scalerMetadata={"key": key, "targetPerReplica": "16"}
    )


async def _metric(scaler: externalscaler_pb2_grpc.ExternalScalerStub, key: str) -> int:
    spec = await scaler.GetMetricSpec(_ref(key))
    name = spec.metricSpecs[0].metricName
    metrics = await scaler.GetMetrics(externalscaler_pb2.GetMetricsRequest(scaledObjectRef=_ref(key), metricName=name))
    return metrics.metricValues[0].metricValue


async def _ask(client: openai.AsyncOpenAI, i: int) -> str:
    if i % 10 == 0:  # some stream: held streams are answered once the engine is up
        chunks = await client.chat.completions.create(
            model=COLD, messages=[{"role": "user", "content": f"Count: {i}"}], max_tokens=2, stream=True
        )
        finish = None
        async for chunk in chunks:
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
        return finish or ""
    answer = await client.chat.completions.create(
        model=COLD, messages=[{"role": "user", "content": f"Count: {i}"}], max_tokens=2
    )
    return answer.choices[0].finish_reason


async def test_a_burst_during_a_cold_start_is_held_and_served(cold):
    stack, ports, tmp = cold
    client = openai.AsyncOpenAI(base_url=stack.base_url, api_key=KEY, max_retries=0, timeout=300)
    async with grpc.aio.insecure_channel(stack.catalog_listen) as channel:
        scaler = externalscaler_pb2_grpc.ExternalScalerStub(channel)
        spec = await scaler.GetMetricSpec(_ref(COLD))
        assert spec.metricSpecs[0].targetSize == 16
        assert not (await scaler.IsActive(_ref(COLD))).result
        # KEDA holds StreamIsActive open: its first answer is the current state (idle).
        activity = scaler.StreamIsActive(_ref(COLD))
        assert (await activity.read()).result is False

        started = time.monotonic()
        first = asyncio.create_task(_ask(client, 1))
        active = await asyncio.wait_for(activity.read(), 10)
        pushed_after = time.monotonic() - started
        assert active.result is True
        # Pushed at once (the backend reports the first held request, the scaler streams it), not polled.
        assert pushed_after < 0.1, pushed_after

        burst = [first, *(asyncio.create_task(_ask(client, i)) for i in range(2, BURST + 1))]
        # Every request is held (none failed), and the scaler reports them under this model alone.
        assert await until(lambda: _metric(scaler, COLD), 60, what="held burst") and await until(
            lambda: _held_all(scaler), 60, what=f"{BURST} held"
        )
        assert await _metric(scaler, NEVER) == 0
        assert not (await scaler.IsActive(_ref(NEVER))).result
        assert not any(task.done() for task in burst)

        # The engines come up after the cold start; every held request is answered.
        await asyncio.sleep(max(0.0, COLD_START_S - (time.monotonic() - started)))
        with ExitStack() as servers:
            for i, port in enumerate(ports):
                await asyncio.to_thread(servers.enter_context, llama_server(tmp / f"llama{i}.log", port=port))
            finishes = await asyncio.wait_for(asyncio.gather(*burst), 240)
            assert len(finishes) == BURST and all(f in ("length", "stop") for f in finishes), finishes
            # Demand falls back to nothing: KEDA may scale in after its cooldown.
            await until(lambda: _idle(scaler), 30, what="demand gone")
            activity.cancel()


async def _held_all(scaler) -> bool:
    return await _metric(scaler, COLD) >= BURST


async def _idle(scaler) -> bool:
    return not (await scaler.IsActive(_ref(COLD))).result


async def test_past_the_bound_a_request_gets_503_with_retry_after(cold):
    stack, _, _ = cold
    client = openai.AsyncOpenAI(base_url=stack.base_url, api_key=KEY, max_retries=0, timeout=60)
    with pytest.raises(openai.APIStatusError) as caught:
        await client.chat.completions.create(model=NEVER, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert caught.value.status_code == 503
    assert int(caught.value.response.headers["retry-after"]) >= 1
    assert "starting" in caught.value.message


async def test_a_held_stream_is_kept_alive_then_told_why(cold):
    """A stream cannot change its status once answered: it is answered at once (the backend said it holds
    it), sent SSE comments while it waits, and given the 503 as an error event past the bound."""
    stack, _, _ = cold
    body = {"model": NEVER, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stream": True}
    async with (
        httpx.AsyncClient(timeout=60) as http,
        http.stream(
            "POST", f"{stack.base_url}/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
        ) as response,
    ):
        assert response.status_code == 200
        text = ""
        with contextlib.suppress(httpx.ReadError):
            async for piece in response.aiter_text():
                text += piece
    assert text.startswith(": the model is starting"), text[:200]
    assert text.count(": the model is starting") >= 2  # every 0.5 s over the 2 s bound
    error = next(json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {"))
    assert "was not ready within 2 s" in error["error"]["message"], error
    assert "data: [DONE]" in text
