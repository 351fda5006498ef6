"""An engine pool end to end: the official openai SDK, the edge, and a text backend whose `openai`
engine is two llama.cpp servers (llama-cpp-python's, standing in for vLLM pods).

What the client names as its session (`prompt_cache_key`, `user`) reaches the backend's picker, and
a pool whose every replica's queue is full answers 503 with a Retry-After at once.
"""

from __future__ import annotations

import asyncio
from contextlib import ExitStack

import openai
import pytest
import yaml

from modelplex_kit.devstack import Stack
from tests.support.llama_server import llama_server, smollm2_gguf
from tests.support.ports import free_port

pytestmark = pytest.mark.e2e

KEY = "sk-modelplex-pool"


@pytest.fixture(scope="module")
def pooled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pool-e2e")
    with ExitStack() as servers:
        replicas = [servers.enter_context(llama_server(tmp / f"llama{i}.log")) for i in range(2)]
        entry = {
            "id": "pooled-llama",
            "modality": "text",
            "backend": f"127.0.0.1:{free_port()}",
            "engine": {
                "kind": "openai",
                "settings": {
                    "upstream_url": ",".join(r.base_url for r in replicas),
                    "upstream_model": smollm2_gguf(),
                    # llama-cpp-python's server runs one request at a time: a second in flight is queued.
                    "pool_max_queue": 1,
                },
            },
            "capabilities": ["chat"],
            "context_length": 2048,
        }
        catalog = tmp / "catalog.yaml"
        catalog.write_text(yaml.safe_dump({"models": [entry]}))
        stack = Stack(
            catalog,
            catalog_listen=f"127.0.0.1:{free_port()}",
            edge_port=free_port(),
            env={"MODELPLEX_DEV_API_KEY": KEY},
            log_dir=tmp,
        ).start()
        try:
            yield stack, replicas
        finally:
            stack.stop()


def served(replicas) -> list[int]:
    return [r.log.read_text(errors="replace").count("POST /v1/chat/completions") for r in replicas]


def test_requests_of_one_session_go_to_one_replica(pooled):
    stack, replicas = pooled
    client = openai.OpenAI(base_url=stack.base_url, api_key=KEY, max_retries=0, timeout=120)
    for key, field in (("prompt_cache_key", "thread-1"), ("user", "user-7")):
        before = served(replicas)
        for i in range(4):
            client.chat.completions.create(
                model="pooled-llama",
                messages=[{"role": "user", "content": f"Say a number: {i}."}],
                max_tokens=4,
                **{key: field},
            )
        gained = [after - b for after, b in zip(served(replicas), before, strict=True)]
        assert sorted(gained) == [0, 4], (key, gained)


async def test_a_pool_whose_every_queue_is_full_answers_503_with_retry_after(pooled):
    stack, _ = pooled
    client = openai.AsyncOpenAI(base_url=stack.base_url, api_key=KEY, max_retries=0, timeout=120)
    outcomes = await asyncio.gather(
        *(
            client.chat.completions.create(
                model="pooled-llama", messages=[{"role": "user", "content": f"Count to {i + 20}."}], max_tokens=24
            )
            for i in range(6)
        ),
        return_exceptions=True,
    )
    refused = [o for o in outcomes if isinstance(o, openai.APIStatusError)]
    answered = [o for o in outcomes if not isinstance(o, BaseException)]
    assert len(answered) >= 2 and refused, outcomes  # each replica took one; the rest found every queue full
    for error in refused:
        assert error.status_code == 503 and error.code == "service_unavailable"
        assert int(error.response.headers["retry-after"]) >= 1
        assert "saturated" in error.message
    await client.close()
