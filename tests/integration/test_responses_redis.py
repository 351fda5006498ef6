"""Stored responses in a real Redis: the store's contract, and two edges sharing it (create on one,
continue and retrieve on the other)."""

from __future__ import annotations

import asyncio
import time

import openai
import pytest

from modelplex_edge.endpoints.responses.store import RedisStore, StoredResponse
from tests.support.redis_server import RedisServer
from tests.support.scripted_text import scripted_edge
from tests.support.until import until

pytestmark = pytest.mark.integration
KEY = "sk-responses-redis"


@pytest.fixture(scope="module")
def redis_server():
    server = RedisServer().start()
    yield server
    server.stop()


def record(scope: str = "alpha") -> StoredResponse:
    return StoredResponse("resp_r", scope, {"id": "resp_r", "output": []}, [{"id": "msg_1"}], depth=1)


async def test_the_redis_store_scopes_deletes_and_expires(redis_server):
    store = RedisStore(redis_server.url, retention_seconds=1)
    await store.put(record())
    assert await store.get("alpha", "resp_r") == record()
    assert await store.get("beta", "resp_r") is None
    assert await store.delete("beta", "resp_r") is False
    deadline = time.monotonic() + 15
    while await store.get("alpha", "resp_r") is not None:  # Redis expires the key itself
        assert time.monotonic() < deadline, "the record did not expire"
        await asyncio.sleep(0.1)
    await store.put(record())
    assert await store.delete("alpha", "resp_r") is True and await store.get("alpha", "resp_r") is None
    await store.close()


async def test_two_edges_sharing_redis_continue_each_others_conversations(redis_server):
    shared = {"dev_api_key": KEY, "responses_store": "redis", "responses_redis_url": redis_server.url}
    async with scripted_edge(**shared) as edge_a, scripted_edge(**shared) as edge_b:
        on_a = openai.AsyncOpenAI(base_url=edge_a.base_url, api_key=KEY, max_retries=0)
        on_b = openai.AsyncOpenAI(base_url=edge_b.base_url, api_key=KEY, max_retries=0)
        first = await on_a.responses.create(model="scripted", input="my name is Ada")
        second = await on_b.responses.create(model="scripted", input="who am I?", previous_response_id=first.id)
        sent = edge_b.engine.requests[-1].chat.messages
        assert [m.content[0].text for m in sent] == ["my name is Ada", "echo: my name is Ada", "who am I?"]
        assert (await on_b.responses.retrieve(first.id)).output_text == "echo: my name is Ada"
        assert (await on_a.responses.retrieve(second.id)).previous_response_id == first.id


async def test_another_projects_key_finds_nothing_on_either_edge(redis_server, tmp_path, monkeypatch):
    from modelplex_gatekeeper.keys import KeyRecord, KeysFile

    keys = KeysFile()
    keys.add("sk-ada-1", KeyRecord(name="ada-1", hash="", project="alpha"))
    keys.add("sk-bob-1", KeyRecord(name="bob-1", hash="", project="beta"))
    keys.save(tmp_path / "keys.yaml")
    monkeypatch.setenv("MODELPLEX_KEYS_FILE", str(tmp_path / "keys.yaml"))
    monkeypatch.setenv("MODELPLEX_GATEKEEPER_USAGE_FILE", str(tmp_path / "usage.jsonl"))
    shared = {"gatekeeper_target": "embedded", "responses_store": "redis", "responses_redis_url": redis_server.url}
    async with scripted_edge(**shared) as edge_a, scripted_edge(**shared) as edge_b:
        ada_on_a = openai.AsyncOpenAI(base_url=edge_a.base_url, api_key="sk-ada-1", max_retries=0)
        created = await ada_on_a.responses.create(model="scripted", input="alpha's secret")
        for edge in (edge_a, edge_b):
            bob = openai.AsyncOpenAI(base_url=edge.base_url, api_key="sk-bob-1", max_retries=0)
            with pytest.raises(openai.NotFoundError):
                await bob.responses.retrieve(created.id)
            with pytest.raises(openai.BadRequestError) as refused:
                await bob.responses.create(model="scripted", input="steal", previous_response_id=created.id)
            assert refused.value.body["param"] == "previous_response_id"
        ada_on_b = openai.AsyncOpenAI(base_url=edge_b.base_url, api_key="sk-ada-1", max_retries=0)
        assert (await ada_on_b.responses.retrieve(created.id)).output_text == "echo: alpha's secret"


async def test_a_background_response_on_a_killed_jobs_process_completes_on_another(redis_server):
    """A jobs process (its own process) runs a background response the edge queued and is SIGKILLed
    mid-generation; another jobs runner, sharing the Redis, takes the job over once the first one's lease
    lapses and completes it."""
    import os
    import signal
    import subprocess
    import sys

    import httpx

    from modelplex_edge.jobs.runner import JobsRunner
    from tests.support.ports import free_port
    from tests.support.scripted_text import edge_on, scripted_backend

    shared = {"dev_api_key": KEY, "responses_store": "redis", "responses_redis_url": redis_server.url,
              "responses_background_lease_seconds": 2.0}
    async with scripted_backend() as backend, edge_on(backend, jobs=False, **shared) as edge:
        port = free_port()
        env = {**os.environ, **{f"MODELPLEX_EDGE_{name.upper()}": str(value) for name, value in shared.items()},
               "MODELPLEX_JOBS_PORT": str(port), "MODELPLEX_EDGE_CATALOG_TARGET": backend.target}
        jobs_a = subprocess.Popen([sys.executable, "-m", "modelplex_edge.jobs"], env=env)
        client = openai.AsyncOpenAI(base_url=edge.base_url, api_key=KEY, max_retries=0)
        try:
            async def ready():
                try:
                    async with httpx.AsyncClient() as http:
                        return (await http.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200
                except httpx.HTTPError:
                    return False

            await until(ready, 60)
            created = await client.responses.create(model="scripted", input="SLOW survive the kill", background=True)

            async def running_on_a():
                return backend.engine.requests and (await client.responses.retrieve(created.id)).status == "in_progress"

            await until(running_on_a, 60)
            os.kill(jobs_a.pid, signal.SIGKILL)  # no shutdown: its claim is simply never renewed
            jobs_a.wait(timeout=30)
        finally:
            if jobs_a.poll() is None:
                jobs_a.kill()
        runner_b = JobsRunner(edge.state).start()
        try:
            async def completed():
                response = await client.responses.retrieve(created.id)
                return response if response.status == "completed" else None

            done = await until(completed, 60)
            assert done.output_text == "echo: SLOW survive the kill"
            assert len(backend.engine.requests) == 2  # started on A, re-run from the start on B
            # Its stream, resumed from the start, is the re-run's: numbered without gaps to the end.
            stream = await client.responses.retrieve(created.id, stream=True, starting_after=0)
            numbers = [event.sequence_number async for event in stream]
            assert numbers == list(range(1, numbers[-1] + 1))
        finally:
            await runner_b.stop()
