"""An HTTP pool's load comes from each replica's /metrics, over real HTTP.

vLLM cannot run here, so two small aiohttp servers stand in for its pods: they publish vLLM's
metric names in Prometheus text, answer /health and /v1/models, and answer a chat completion
with their own name. What they publish is set by the test.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc
import pytest
from aiohttp import web

from modelplex_kit.errors import ServiceError
from modelplex_kit.pools.http import OpenAIPool, cache_use_of
from modelplex_kit.pools.picker import CacheUse
from modelplex_kit.pools.pool import ReplicaUnreachable
from modelplex_kit.pools.settings import PoolSettings
from modelplex_kit.pools.triton import TritonReplica
from tests.support.ports import free_port
from tests.support.until import until


@dataclass
class FakeVllm:
    name: str
    waiting: int = 0
    running: int = 0
    metrics: bool = True
    port: int = 0
    host: str = "127.0.0.1"  # another loopback address (127.0.0.2) where a test needs a host of its own

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def exposition(self) -> str:
        return (
            "# TYPE vllm:num_requests_waiting gauge\n"
            f'vllm:num_requests_waiting{{model_name="m"}} {self.waiting}.0\n'
            "# TYPE vllm:num_requests_running gauge\n"
            f'vllm:num_requests_running{{model_name="m"}} {self.running}.0\n'
            f'vllm:kv_cache_usage_perc{{model_name="m"}} 0.25\n'
        )

    def app(self) -> web.Application:
        async def ok(_: web.Request) -> web.Response:
            return web.Response(text="ok")

        async def models(_: web.Request) -> web.Response:
            return web.json_response({"data": [{"id": "m"}]})

        async def metrics(_: web.Request) -> web.Response:
            if not self.metrics:
                raise web.HTTPNotFound()
            return web.Response(text=self.exposition(), content_type="text/plain")

        async def chat(_: web.Request) -> web.Response:
            choice = {"index": 0, "message": {"role": "assistant", "content": self.name}, "finish_reason": "stop"}
            return web.json_response({"choices": [choice], "usage": {"prompt_tokens": 1, "total_tokens": 2}})

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/health", ok)
        app.router.add_get("/v1/models", models)
        app.router.add_post("/v1/chat/completions", chat)
        return app


@asynccontextmanager
async def serving(*replicas: FakeVllm) -> AsyncIterator[None]:
    runners = []
    for replica in replicas:
        runner = web.AppRunner(replica.app())
        await runner.setup()
        replica.port = free_port()
        await web.TCPSite(runner, replica.host, replica.port).start()
        runners.append(runner)
    try:
        yield
    finally:
        for runner in runners:
            await runner.cleanup()


def pool_of(urls: list[str], **overrides: object) -> OpenAIPool:
    values = {"upstream_url": ",".join(urls), "pool_policy": "least_loaded", "pool_scrape_interval_seconds": 0.05}
    settings = PoolSettings(**(values | overrides))  # type: ignore[arg-type]
    return OpenAIPool("http-test", settings, timeout_seconds=10)


def state(pool: OpenAIPool, replica: FakeVllm):
    return next(r for r in pool.pool.replicas if r.key == f"127.0.0.1:{replica.port}")


async def answer(pool: OpenAIPool) -> str:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    return (await pool.call("chat/completions", body))["choices"][0]["message"]["content"]


async def test_requests_go_where_the_engines_own_queue_is_shortest():
    a, b = FakeVllm("a", waiting=20, running=8), FakeVllm("b", running=2)
    async with serving(a, b):
        pool = pool_of([a.url, b.url])
        try:
            assert await pool.ready()
            await until(lambda: all(r.load.engine is not None for r in pool.pool.replicas), 10)
            assert {await answer(pool) for _ in range(5)} == {"b"}
            a.waiting, a.running, b.waiting = 0, 1, 30
            await until(lambda: state(pool, b).load.queue() >= 30, 10)
            assert {await answer(pool) for _ in range(5)} == {"a"}
        finally:
            await pool.close()


async def test_every_queue_full_is_a_503_with_retry_after_before_any_call():
    a, b = FakeVllm("a", waiting=100), FakeVllm("b", waiting=70)
    async with serving(a, b):
        pool = pool_of([a.url, b.url], pool_max_queue=64)
        try:
            assert await pool.ready()
            await until(lambda: all(r.load.engine is not None for r in pool.pool.replicas), 10)
            with pytest.raises(ServiceError) as full:
                await answer(pool)
            assert full.value.status == grpc.StatusCode.UNAVAILABLE and int(full.value.headers["retry-after"]) >= 1
        finally:
            await pool.close()


async def test_a_replica_without_metrics_is_judged_by_in_flight_and_a_dead_one_is_ejected_unused():
    quiet = FakeVllm("quiet", metrics=False)
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    async with serving(quiet):
        pool = pool_of([quiet.url, dead], pool_policy="affinity")
        try:
            assert await pool.ready()
            by_port = {r.key.rsplit(":", 1)[1]: r for r in pool.pool.replicas}
            await until(lambda: not by_port[dead.rsplit(":", 1)[1].removesuffix("/v1")].available, 10)
            assert {await answer(pool) for _ in range(4)} == {"quiet"}
            assert by_port[str(quiet.port)].load.engine is None
        finally:
            await pool.close()


async def test_a_triton_replicas_queue_is_read_from_its_metrics_port():
    async def metrics(_: web.Request) -> web.Response:
        text = (
            "# TYPE nv_inference_pending_request_count gauge\n"
            'nv_inference_pending_request_count{model="whisper",version="1"} 7\n'
            'nv_inference_pending_request_count{model="other",version="1"} 2\n'
        )
        return web.Response(text=text, content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    replica = TritonReplica(f"127.0.0.1:{free_port()}", "whisper", port)
    without = TritonReplica(f"127.0.0.1:{free_port()}", "whisper", 0)
    gone = TritonReplica(f"127.0.0.1:{free_port()}", "whisper", free_port())
    try:
        load = await replica.engine_load()
        assert load is not None and load.waiting == 9  # the server's whole queue: every model's
        assert await without.engine_load() is None  # no metrics port: in-flight counts only
        with pytest.raises(ReplicaUnreachable):
            await gone.engine_load()
    finally:
        for r in (replica, without, gone):
            await r.close()
        await runner.cleanup()


def test_an_answers_cached_tokens_are_read_where_the_engine_reports_them():
    usage = {"prompt_tokens": 100, "completion_tokens": 4, "prompt_tokens_details": {"cached_tokens": 64}}
    assert cache_use_of({"choices": [], "usage": usage}) == CacheUse(prompt_tokens=100, cached_tokens=64)
    assert cache_use_of({"usage": {"prompt_tokens": 100, "completion_tokens": 4}}) is None  # llama.cpp's server
    assert cache_use_of({"usage": {"prompt_tokens": 100, "prompt_tokens_details": None}}) is None
    assert cache_use_of({"choices": [{"delta": {"content": "a"}}]}) is None  # a stream's other events
