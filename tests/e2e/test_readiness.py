"""Readiness follows the engine, end to end: a text model on an `openai` engine whose server
(llama-cpp-python's, standing in for vLLM) starts after the stack, then stops again.

While the upstream is down the backend is NOT_SERVING, the catalog marks the model not ready,
/v1/models still lists it and a request gets 503 + Retry-After saying it is loading.
"""

from __future__ import annotations

import time

import grpc
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support import stacks
from tests.support.llama_server import llama_server, smollm2_gguf
from tests.support.ports import free_port

pytestmark = pytest.mark.e2e

KEY = "sk-modelplex-readiness"
HELLO = [{"role": "user", "content": "Say hi."}]


def _health(target: str) -> int | None:
    with grpc.insecure_channel(target) as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1).status
        except grpc.RpcError:
            return None


def _eventually(check, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while True:
        try:
            result = check()
        except openai.APIStatusError as exc:
            result, last = None, exc
        else:
            last = result
        if result:
            return result
        assert time.monotonic() < deadline, f"{what}: still {last!r}"
        time.sleep(0.25)


@pytest.fixture(scope="module")
def late(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("readiness")
    upstream_port, backend = free_port(), f"127.0.0.1:{free_port()}"
    entry = {
        "id": "late-llama",
        "modality": "text",
        "backend": backend,
        "engine": {
            "kind": "openai",
            "settings": {"upstream_url": f"http://127.0.0.1:{upstream_port}/v1", "upstream_model": smollm2_gguf()},
        },
        "capabilities": ["chat"],
        "context_length": 2048,
    }
    catalog = stacks.write_catalog(tmp, [entry])
    env = {"MODELPLEX_DEV_API_KEY": KEY, "MODELPLEX_READY_POLL_SECONDS": "0.2"}
    stack = stacks.start_stack(catalog, tmp, env=env, wait_for_engines=False)
    try:
        yield stack, backend, upstream_port, tmp
    finally:
        stack.stop()


def test_a_model_whose_engine_is_not_up_is_listed_but_answers_503_until_it_is(late):
    stack, backend, upstream_port, tmp = late
    client = openai.OpenAI(base_url=stack.base_url, api_key=KEY, max_retries=0, timeout=60)
    assert _health(backend) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert [m.id for m in client.models.list().data] == ["late-llama"]  # listed while loading

    with pytest.raises(openai.InternalServerError) as err:
        client.chat.completions.create(model="late-llama", messages=HELLO, max_tokens=4)
    assert err.value.status_code == 503 and err.value.code == "service_unavailable"
    assert err.value.response.headers["retry-after"] == "5"
    assert "late-llama" in err.value.message and "loading" in err.value.message
    assert str(upstream_port) not in err.value.message  # the reason names no internal address

    with llama_server(tmp / "llama.log", port=upstream_port):
        _eventually(lambda: _health(backend) == health_pb2.HealthCheckResponse.SERVING, 10, "backend health")
        reply = _eventually(
            lambda: client.chat.completions.create(model="late-llama", messages=HELLO, max_tokens=4),
            10,
            "the edge routing to the ready model",
        )
        assert reply.choices[0].message.content and reply.usage.completion_tokens > 0

    # The engine went away: the backend leaves SERVING and the edge says so again.
    _eventually(lambda: _health(backend) == health_pb2.HealthCheckResponse.NOT_SERVING, 10, "backend health")
    refused = _eventually(lambda: _loading_error(client), 5, "a 503 for a model whose engine stopped")
    assert refused.status_code == 503 and refused.response.headers["retry-after"] == "5"


def _loading_error(client: openai.OpenAI) -> openai.APIStatusError | None:
    try:
        client.chat.completions.create(model="late-llama", messages=HELLO, max_tokens=4)
    except openai.InternalServerError as exc:
        return exc if "loading" in exc.message else None
    return None
