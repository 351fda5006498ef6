"""The Triton embeddings adapter against the real tritonserver's ``minilm`` (deploy/triton/model_repository/).

What the KServe ModelServer stand-in covered before, now on Triton, plus what only Triton showed:
its ``max_batch_size`` (a request of more rows is refused, so the adapter splits), token arrays as
``input_ids`` with their mask, model control (unload, load) and its metrics port.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY

from modelplex.v1 import embeddings_pb2 as pb
from modelplex_embeddings.adapters.local import LocalEngine
from modelplex_embeddings.adapters.triton import TritonEngine
from modelplex_embeddings.servicer import EmbeddingsServicer
from modelplex_embeddings.settings import BatchingSettings, LocalSettings, RemoteSettings
from modelplex_kit.errors import ServiceError
from tests.support.ports import free_port
from tests.support.real_triton import TritonServer
from tests.support.until import until

pytestmark = pytest.mark.triton

SENTENCES = ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]


def settings(target: str, **extra) -> RemoteSettings:
    return RemoteSettings(upstream_url=target, upstream_model="minilm", triton_token_input="input_ids", **extra)


@pytest.fixture(scope="module")
def local() -> LocalEngine:
    return LocalEngine(LocalSettings())


async def expected(local: LocalEngine, texts: list[str]) -> np.ndarray:
    return await local.embed(local.prepare([pb.EmbedInput(text=t) for t in texts]))


async def test_vectors_equal_the_local_engines(triton, local):
    engine = TritonEngine(settings(triton.grpc_target))
    servicer = EmbeddingsServicer(engine, BatchingSettings(max_wait_ms=20))
    responses = await asyncio.gather(
        *(servicer.Embed(pb.EmbedRequest(model="m", inputs=[pb.EmbedInput(text=s)]), None) for s in SENTENCES)
    )
    got = np.array([r.embeddings[0].values for r in responses], dtype=np.float32)
    np.testing.assert_allclose(got, await expected(local, SENTENCES), atol=1e-5)
    assert [r.usage.prompt_tokens for r in responses] == [8, 9, 8]
    await servicer.close()


async def test_more_inputs_than_the_models_max_batch_size_are_split(triton, local):
    """Before: 'inference request batch-size must be <= 64' for 65 inputs and more (a 503)."""
    texts = [f"sentence number {i} about the weather" for i in range(150)]
    engine = TritonEngine(settings(triton.grpc_target))
    try:
        vectors = await engine.embed(engine.prepare([pb.EmbedInput(text=t) for t in texts]))
    finally:
        await engine.close()
    np.testing.assert_allclose(vectors, await expected(local, texts), atol=1e-5)


async def test_token_arrays_go_as_input_ids_and_equal_their_text(triton, local):
    ids = local.prepare([pb.EmbedInput(text=s) for s in SENTENCES])
    engine = TritonEngine(settings(triton.grpc_target))
    try:
        items = engine.prepare([pb.EmbedInput(tokens=pb.TokenIds(ids=item.ids)) for item in ids])
        vectors = await engine.embed(items)
    finally:
        await engine.close()
    np.testing.assert_allclose(vectors, await expected(local, SENTENCES), atol=1e-5)


async def test_a_model_without_a_token_input_refuses_token_arrays(triton):
    engine = TritonEngine(RemoteSettings(upstream_url=triton.grpc_target, upstream_model="minilm"))
    with pytest.raises(ServiceError) as refused:
        engine.prepare([pb.EmbedInput(text="x"), pb.EmbedInput(tokens=pb.TokenIds(ids=[1]))])
    assert refused.value.param == "input[1]"
    await engine.close()


async def test_an_unknown_model_and_an_unreachable_server_are_503(triton):
    for target, model in ((triton.grpc_target, "nope"), (f"127.0.0.1:{free_port()}", "minilm")):
        engine = TritonEngine(RemoteSettings(upstream_url=target, upstream_model=model, upstream_timeout_seconds=5))
        with pytest.raises(ServiceError) as err:
            await engine.embed(engine.prepare([pb.EmbedInput(text="x")]))
        assert err.value.http.status == 503
        await engine.close()


async def test_readiness_follows_the_model_through_unload_and_load(triton):
    engine = TritonEngine(settings(triton.grpc_target))
    try:
        assert await engine.ready()
        await asyncio.to_thread(triton.unload, "minilm")
        await until(lambda: not triton.ready("minilm"), timeout=60)
        assert not await engine.ready()
        with pytest.raises(ServiceError) as err:
            await engine.embed(engine.prepare([pb.EmbedInput(text="x")]))
        assert err.value.http.status == 503
    finally:
        await asyncio.to_thread(triton.load, "minilm")
    assert await engine.ready()
    assert (await engine.embed(engine.prepare([pb.EmbedInput(text="x")]))).shape == (1, 384)
    await engine.close()


async def test_the_pool_reads_the_queue_from_tritons_metrics_port(triton):
    """A burst of full batches queues in Triton's scheduler (one model instance): the replica's load,
    scraped from the real metrics port, shows it waiting, then empty again once the burst is done."""
    engine = TritonEngine(settings(triton.grpc_target, pool_metrics_port=triton.metrics_port))
    long_texts = [" ".join(["weather"] * 24) + f" {i}" for i in range(64)]
    try:
        await engine.embed(engine.prepare([pb.EmbedInput(text="x")]))  # the pool finds its replica
        (replica,) = engine._pool.pool.replicas
        burst = asyncio.gather(
            *(engine.embed(engine.prepare([pb.EmbedInput(text=t) for t in long_texts])) for _ in range(6))
        )

        async def waiting() -> float:
            load = await replica.client.engine_load()
            assert load is not None, "Triton's metrics hold no queue figures"
            return load.waiting

        await until(waiting, timeout=60, interval=0.1, what="requests waiting in Triton's queue")
        await burst
        await until(lambda: _zero(waiting()), timeout=30, what="Triton's queue empty again")
    finally:
        await engine.close()


async def _zero(value) -> bool:
    return await value == 0


@pytest.fixture(scope="module")
def second_triton():
    """A second tritonserver holding only ``minilm``: an engine pool of two."""
    server = TritonServer(Path(tempfile.mkdtemp(prefix="modelplex-triton-second-")), models=("minilm",)).start()
    try:
        yield server.wait_ready(300)
    finally:
        server.stop()


async def test_a_pool_of_servers_shares_the_batches_and_a_dead_one_costs_no_error(triton, second_triton, local):
    targets = (triton.grpc_target, second_triton.grpc_target)
    dead = f"127.0.0.1:{free_port()}"
    engine = TritonEngine(settings(",".join([*targets, dead]), pool_policy="least_loaded"))
    want = await expected(local, SENTENCES)

    def picks(target: str) -> float:
        return sum(
            REGISTRY.get_sample_value(
                "modelplex_pool_picks_total", {"pool": "embeddings", "replica": target, "reason": reason}
            )
            or 0.0
            for reason in ("load", "retry")
        )

    before = {t: picks(t) for t in targets}
    try:
        for _ in range(3):
            batches = await asyncio.gather(
                *(engine.embed(engine.prepare([pb.EmbedInput(text=s) for s in SENTENCES])) for _ in range(4))
            )
            for vectors in batches:
                np.testing.assert_allclose(vectors, want, atol=1e-5)
        assert all(picks(t) - before[t] >= 2 for t in targets)
        assert not next(r for r in engine._pool.pool.replicas if r.key == dead).available
    finally:
        await engine.close()
