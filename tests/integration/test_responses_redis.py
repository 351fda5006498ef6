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
