"""What only a real vLLM shows: each defect found by putting one behind the openai adapter, and the
chart's pod conditions (uid, caches, weights) under which it runs."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import grpc
import httpx
import jsonschema
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.e2e.test_chat import WEATHER_TOOL
from tests.support.until import wait_until
from tests.support.vllm_server import VllmServer, chart_pod, smollm2_folder
from tests.vllm.conftest import TEXT_MODEL, chart_entries

pytestmark = pytest.mark.vllm

TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"]},
    },
}


def test_plain_chat_without_tools_is_answered(client):
    # The adapter used to send tool_choice on every request; vLLM answers that with a 400
    # ("When using `tool_choice`, `tools` must be set.").
    completion = client.chat.completions.create(
        model=TEXT_MODEL, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8
    )
    assert completion.choices[0].message.content


@pytest.mark.parametrize("parallel_tool_calls", [True, False])
def test_required_tool_choice_is_one_schema_valid_call(client, parallel_tool_calls):
    # vLLM's hermes parser returned the model's raw <tool_call> text as content for `required`,
    # and with parallel_tool_calls false generation ran to the context limit (minutes).
    started = time.monotonic()
    completion = client.chat.completions.create(
        model=TEXT_MODEL,
        messages=[{"role": "user", "content": "What's the weather in Paris, in celsius?"}],
        tools=[WEATHER_TOOL, TIME_TOOL],
        tool_choice="required",
        parallel_tool_calls=parallel_tool_calls,
        temperature=0,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    (call,) = choice.message.tool_calls
    tool = {"get_weather": WEATHER_TOOL, "get_time": TIME_TOOL}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
    assert time.monotonic() - started < 120


def test_named_tool_choice_arguments_are_an_object_valid_against_the_schema(client):
    # vLLM returned a named call's arguments as a JSON *string* (double-encoded), not an object.
    completion = client.chat.completions.create(
        model=TEXT_MODEL,
        messages=[{"role": "user", "content": "Weather in Rome?"}],
        tools=[WEATHER_TOOL, TIME_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        temperature=0,
    )
    (call,) = completion.choices[0].message.tool_calls
    assert call.function.name == "get_time"
    arguments = json.loads(call.function.arguments)
    assert isinstance(arguments, dict)
    jsonschema.validate(arguments, TIME_TOOL["function"]["parameters"])


def test_client_disconnect_aborts_the_vllm_request(client, vllm_text: VllmServer):
    running = "vllm:num_requests_running"
    wait_until(lambda: vllm_text.metric(running) == 0, 60)  # idle before the test
    stream = client.chat.completions.create(
        model=TEXT_MODEL,
        messages=[{"role": "user", "content": "Write a very long story about the sea."}],
        max_tokens=1500,
        stream=True,
    )
    for i, _ in enumerate(stream):
        if i == 3:
            break
    assert vllm_text.metric(running) >= 1
    stream.close()
    # The edge cancels the backend call, the adapter closes its HTTP response, vLLM aborts.
    wait_until(lambda: vllm_text.metric(running) == 0, 30)


def test_max_tokens_beyond_the_context_is_a_400_naming_max_tokens(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=TEXT_MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=100_000
        )
    assert caught.value.status_code == 400
    assert caught.value.body["param"] == "max_tokens"


def test_a_prompt_beyond_the_context_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=TEXT_MODEL, messages=[{"role": "user", "content": "hello " * 4000}], max_tokens=4
        )
    assert "context" in caught.value.message


def test_cached_tokens_come_from_vllms_prefix_cache(client):
    messages = [{"role": "system", "content": "You answer in one word. " * 30}, {"role": "user", "content": "Sky?"}]
    first = client.chat.completions.create(model=TEXT_MODEL, messages=messages, max_tokens=2)
    again = client.chat.completions.create(model=TEXT_MODEL, messages=messages, max_tokens=2)
    assert again.usage.prompt_tokens == first.usage.prompt_tokens
    # vLLM caches whole blocks (32 tokens here): all but the last, partial, block is a hit.
    assert again.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 32


def test_the_text_backend_is_serving_while_vllm_is_healthy(stack):
    target = next(t for name, t in _backend_targets(stack) if name.startswith("text"))
    with grpc.insecure_channel(target) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def _backend_targets(stack) -> list[tuple[str, str]]:
    return [(p.name, p.name.split("@", 1)[1]) for p in stack.processes if "@" in p.name]


# -- the chart's pod --------------------------------------------------------------------------
def _proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


@pytest.mark.parametrize("name", ["text", "embeddings"])
def test_vllm_runs_with_the_charts_args_as_its_non_root_uid(name, request):
    server: VllmServer = request.getfixturevalue(f"vllm_{name}")
    pod = chart_pod(chart_entries()[name])
    assert pod.uid == 10001 and pod.gid == 10001
    cmdline = Path(f"/proc/{server.process.pid}/cmdline").read_bytes().decode().split("\0")[:-1]
    args = cmdline[cmdline.index("vllm.entrypoints.openai.api_server") + 1 :]
    # Where it listens, and where it publishes its KV-cache events: free ports here, the rest as the chart's.
    replaced = {"--host": lambda _: "127.0.0.1", "--port": lambda _: str(server.port)}
    replaced["--kv-events-config"] = server.kv_events_config
    assert args == [
        replaced[pod.args[i - 1]](a) if i and pod.args[i - 1] in replaced else a for i, a in enumerate(pod.args)
    ]
    uids = set(_proc_status(server.process.pid)["Uid"].split())
    # As the pod's uid where the suite may switch to it (as root, as in CI); else as this non-root user.
    assert uids == ({"10001"} if os.geteuid() == 0 else {str(os.getuid())})


def test_vllm_writes_only_under_the_charts_cache_and_cannot_write_the_weights(vllm_text: VllmServer):
    environ = dict(
        item.split("=", 1)
        for item in Path(f"/proc/{vllm_text.process.pid}/environ").read_bytes().decode().split("\0")
        if "=" in item
    )
    cache = vllm_text.cache
    for variable in ("HOME", "HF_HOME", "XDG_CACHE_HOME", "VLLM_CACHE_ROOT"):
        assert Path(environ[variable]).is_relative_to(cache), variable
    # vLLM wrote its compile cache there, as the pod's uid.
    written = [p for p in cache.rglob("*") if p.is_file()]
    assert written and all(p.stat().st_uid == vllm_text.process_uid() for p in written)
    if os.geteuid() != 0:
        pytest.skip("the weights are this user's own: only as root does vLLM run as another uid than their owner")
    weights = smollm2_folder()
    for path in [weights, *weights.iterdir()]:
        mode = path.stat().st_mode
        assert path.stat().st_uid != vllm_text.process_uid() and not mode & 0o002, f"{path} is writable by the engine"


def test_the_models_endpoint_lists_what_the_chart_serves(vllm_text: VllmServer):
    listed = httpx.get(f"{vllm_text.base_url}/models", timeout=10).json()["data"]
    # Its one base model; the LoRA adapters the suite loaded at run time (test_lora_on_vllm.py) list it as parent.
    assert [m["id"] for m in listed if m.get("parent") is None] == [TEXT_MODEL]
    assert all(m["parent"] == TEXT_MODEL for m in listed if m.get("parent") is not None)
