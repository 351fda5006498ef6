"""The Triton embeddings adapter against KServe's Python ModelServer hosting all-MiniLM-L6-v2.

The server is KServe's own (the ``kserve`` package, pinned in constraints.txt; it
installs alongside our grpcio/protobuf/fastapi pins), run as a subprocess on
loopback; see tests/support/kserve_minilm.py.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
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

pytestmark = pytest.mark.integration

SENTENCES = ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]


@pytest.fixture(scope="module")
def kserve(tmp_path_factory):
    with kserve_minilm(tmp_path_factory) as target:
        yield target


@pytest.fixture(scope="module")
def kserve_replica(tmp_path_factory):
    """A second server, for an engine pool of two."""
    with kserve_minilm(tmp_path_factory) as target:
        yield target


@contextmanager
def kserve_minilm(tmp_path_factory) -> Iterator[str]:
    grpc_port, http_port = free_port(), free_port()
    log = tmp_path_factory.mktemp("kserve") / "kserve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.support.kserve_minilm",
                "--grpc-port",
                str(grpc_port),
                "--http-port",
                str(http_port),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                grpc.channel_ready_future(grpc.insecure_channel(f"127.0.0.1:{grpc_port}")).result(timeout=1)
                break
            except grpc.FutureTimeoutError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"KServe ModelServer did not start:\n{log.read_text()[-3000:]}")
        yield f"127.0.0.1:{grpc_port}"
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def triton_settings(target: str, **extra) -> RemoteSettings:
    return RemoteSettings(upstream_url=target, upstream_model="minilm", **extra)


async def test_vectors_equal_the_local_engines(kserve):
    local = LocalEngine(LocalSettings())
    engine = TritonEngine(triton_settings(kserve))
    servicer = EmbeddingsServicer(engine, BatchingSettings(max_wait_ms=20))
    responses = await asyncio.gather(
        *(servicer.Embed(pb.EmbedRequest(model="m", inputs=[pb.EmbedInput(text=s)]), None) for s in SENTENCES)
    )
    expected = await local.embed(local.prepare([pb.EmbedInput(text=s) for s in SENTENCES]))
    got = np.array([r.embeddings[0].values for r in responses], dtype=np.float32)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert [r.usage.prompt_tokens for r in responses] == [8, 9, 8]
    await servicer.close()


async def test_token_arrays_and_unknown_models_are_refused_clearly(kserve):
    engine = TritonEngine(triton_settings(kserve))
    with pytest.raises(ServiceError) as refused:
        engine.prepare([pb.EmbedInput(text="x"), pb.EmbedInput(tokens=pb.TokenIds(ids=[1]))])
    assert refused.value.param == "input[1]"
    missing = TritonEngine(RemoteSettings(upstream_url=kserve, upstream_model="nope"))
    with pytest.raises(ServiceError) as err:
        await missing.embed(missing.prepare([pb.EmbedInput(text="x")]))
    assert err.value.http.status == 503
    await engine.close()
    await missing.close()


async def test_an_unreachable_server_is_503():
    engine = TritonEngine(triton_settings(f"127.0.0.1:{free_port()}", upstream_timeout_seconds=5))
    with pytest.raises(ServiceError) as err:
        await engine.embed(engine.prepare([pb.EmbedInput(text="x")]))
    assert err.value.http.status == 503
    await engine.close()


async def test_a_pool_of_servers_shares_the_batches_and_a_dead_one_costs_no_error(kserve, kserve_replica):
    dead = f"127.0.0.1:{free_port()}"
    engine = TritonEngine(triton_settings(f"{kserve},{kserve_replica},{dead}", pool_policy="least_loaded"))
    local = LocalEngine(LocalSettings())
    expected = await local.embed(local.prepare([pb.EmbedInput(text=s) for s in SENTENCES]))

    def picks(target: str) -> float:
        return sum(
            REGISTRY.get_sample_value(
                "modelplex_pool_picks_total", {"pool": "embeddings", "replica": target, "reason": reason}
            )
            or 0.0
            for reason in ("load", "retry")
        )

    before = {t: picks(t) for t in (kserve, kserve_replica)}
    try:
        for _ in range(3):
            batches = await asyncio.gather(
                *(engine.embed(engine.prepare([pb.EmbedInput(text=s) for s in SENTENCES])) for _ in range(4))
            )
            for vectors in batches:
                np.testing.assert_allclose(vectors, expected, atol=1e-6)
        assert all(picks(t) - before[t] >= 2 for t in (kserve, kserve_replica))
        assert not next(r for r in engine._pool.pool.replicas if r.key == dead).available
    finally:
        await engine.close()
