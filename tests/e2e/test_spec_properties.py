"""Property: whatever a client sends to an endpoint we serve, it gets no 5xx, and every error is OpenAI's envelope.

Schemathesis generates the requests from the vendored OpenAI spec (tests/spec/openai-openapi.yaml):
bodies, path and query parameters, both ones the spec allows and ones that violate it, sent to the
whole local stack with every modality running. Most cases name a model the stack serves, so they get
past routing into each modality's checks and backend. Bounded: a fixed number of examples per
operation, a fixed seed (derandomized), no example database, outputs kept tiny by the catalog and by
clamping valid output bounds, so the whole module runs in a couple of minutes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from modelplex_edge.endpoints.batches.protocol import CreateBatchRequest
from modelplex_edge.endpoints.chat.protocol import ChatCompletionRequest
from modelplex_edge.endpoints.completions.protocol import CompletionRequest
from modelplex_edge.endpoints.embeddings.protocol import EmbeddingRequest
from modelplex_edge.endpoints.files.protocol import UploadForm
from modelplex_edge.endpoints.images.protocol import ImageGenerationRequest
from modelplex_edge.endpoints.responses.protocol import CreateResponseRequest
from modelplex_edge.endpoints.speech.protocol import SpeechRequest
from modelplex_edge.endpoints.transcriptions.protocol import TranscriptionForm, TranslationForm
from modelplex_edge.endpoints.videos.protocol import VideoCreateRequest, VideoRemixRequest
from tests.support import stacks
from tests.support.openapi import SPEC
from tests.support.ports import free_port

pytestmark = pytest.mark.e2e

KEY = "sk-modelplex-properties"
EXAMPLES = int(os.environ.get("MODELPLEX_PROPERTY_EXAMPLES", "30"))
CONTEXT = 1024
# Whatever the client asks within the context, the test generates at most this many tokens: it is about
# how requests are answered, not about generation.
MAX_OUTPUT = 4

TEXT, EMBEDDINGS, SPEECH, TRANSCRIPTION = ["smollm2", "chat-only"], ["minilm"], ["espeak"], ["pocketsphinx"]
IMAGES, VIDEOS = ["procedural-image"], ["procedural-video"]
ALL_MODELS = [*TEXT, *EMBEDDINGS, *SPEECH, *TRANSCRIPTION, *IMAGES, *VIDEOS]

# Every operation of the spec the edge serves, with the models its requests should name and the fields
# the edge knows (the spec allows any other field, which the edge refuses as OpenAI does: most cases
# keep only known ones, to get past that check into the modality's).
OPERATIONS = [
    ("POST", "/chat/completions", TEXT, ChatCompletionRequest),
    ("POST", "/completions", TEXT, CompletionRequest),
    ("POST", "/embeddings", EMBEDDINGS, EmbeddingRequest),
    ("POST", "/images/generations", IMAGES, ImageGenerationRequest),
    ("POST", "/audio/speech", SPEECH, SpeechRequest),
    ("POST", "/audio/transcriptions", TRANSCRIPTION, TranscriptionForm),
    ("POST", "/audio/translations", TRANSCRIPTION, TranslationForm),
    ("POST", "/videos", VIDEOS, VideoCreateRequest),
    ("GET", "/videos", [], None),
    ("GET", "/videos/{video_id}", [], None),
    ("DELETE", "/videos/{video_id}", [], None),
    ("GET", "/videos/{video_id}/content", [], None),
    ("POST", "/videos/{video_id}/remix", [], VideoRemixRequest),
    ("GET", "/models", [], None),
    ("GET", "/models/{model}", [], None),
    ("POST", "/responses", TEXT, CreateResponseRequest),
    ("GET", "/responses/{response_id}", [], None),
    ("DELETE", "/responses/{response_id}", [], None),
    ("POST", "/responses/{response_id}/cancel", [], None),
    ("GET", "/responses/{response_id}/input_items", [], None),
    ("POST", "/files", [], UploadForm),
    ("GET", "/files", [], None),
    ("GET", "/files/{file_id}", [], None),
    ("DELETE", "/files/{file_id}", [], None),
    ("GET", "/files/{file_id}/content", [], None),
    ("POST", "/batches", [], CreateBatchRequest),
    ("GET", "/batches", [], None),
    ("GET", "/batches/{batch_id}", [], None),
    ("POST", "/batches/{batch_id}/cancel", [], None),
]

# Values at the edges of what the backends' 32- and 64-bit fields and size strings hold, and beyond: one of
# them replaces one numeric field (or the size) of many cases; the spec's enums and formats rarely make them.
EDGE_INTEGERS = [-1, 0, 2**31, 2**32, 2**63, 2**64, 10**23, 1e23, -(2**63) - 1, "-4", "0", "99999999999"]
EDGE_SIZES = ["-1x-1", "0x-5", "99999999999x1", "0x0", "1x", ""]
INTEGER_FIELDS = {
    "seconds", "seed", "n", "max_tokens", "max_completion_tokens", "dimensions", "output_compression",
    "partial_images", "top_logprobs", "logprobs", "best_of",
}

PROPERTY = settings(
    max_examples=EXAMPLES,
    derandomize=True,  # a fixed seed: the same cases every run
    database=None,
    deadline=None,
    phases=[Phase.explicit, Phase.generate, Phase.shrink],
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def spec() -> Any:
    return schemathesis.openapi.from_path(SPEC)


def _catalog(tmp: Path) -> Path:
    text_backend = f"127.0.0.1:{free_port()}"
    text = {"kind": "llamacpp", "settings": {"context_length": CONTEXT}}
    models = [
        {"id": "smollm2", "modality": "text", "backend": text_backend, "engine": text, "context_length": CONTEXT,
         "default_max_tokens": MAX_OUTPUT,
         "capabilities": ["chat", "completions", "tool_use", "json_schema", "prompt_caching", "multiple_choices"]},
        {"id": "chat-only", "modality": "text", "backend": text_backend, "engine": text, "context_length": CONTEXT,
         "default_max_tokens": MAX_OUTPUT, "capabilities": ["chat"]},
        {"id": "minilm", "modality": "embeddings", "backend": f"127.0.0.1:{free_port()}",
         "engine": {"kind": "local", "settings": {"batching__max_wait_ms": 2}},
         "capabilities": {"dimensions": 384, "max_inputs": 64, "max_input_tokens": 256}},
        {"id": "espeak", "modality": "speech", "backend": f"127.0.0.1:{free_port()}", "engine": {"kind": "espeak"},
         "capabilities": {"voices": ["en-us", "en"], "voice_aliases": {"alloy": "en-us", "echo": "en"},
                          "max_input_chars": 120}},
        {"id": "pocketsphinx", "modality": "transcription", "backend": f"127.0.0.1:{free_port()}",
         "engine": {"kind": "pocketsphinx", "settings": {"max_audio_seconds": 10, "max_concurrency": 1}},
         "capabilities": {"languages": ["en"], "max_audio_seconds": 10, "translation_model": "smollm2"}},
        {"id": "procedural-image", "modality": "images", "backend": f"127.0.0.1:{free_port()}",
         "engine": {"kind": "procedural"},
         "capabilities": {"sizes": ["256x256"], "max_n": 2, "max_prompt_chars": 200, "max_partial_images": 1}},
        {"id": "procedural-video", "modality": "videos", "backend": f"127.0.0.1:{free_port()}",
         "engine": {"kind": "procedural"},
         "capabilities": {"sizes": ["64x64"], "seconds": [4], "max_prompt_chars": 200, "input_reference": True}},
    ]
    path = stacks.write_catalog(tmp, models)
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("properties")
    stack = stacks.start_stack(_catalog(tmp), tmp, env={"MODELPLEX_DEV_API_KEY": KEY, "MODELPLEX_LOG_LEVEL": "info"})
    yield stack
    stack.stop()


def _clamped(body: Any) -> Any:
    """Valid output bounds cut to MAX_OUTPUT tokens, `n` to 2: invalid ones are left as generated."""
    if not isinstance(body, dict):
        return body
    for field in ("max_tokens", "max_completion_tokens"):
        value = body.get(field)
        if type(value) is int and 1 <= value < CONTEXT:
            body[field] = min(value, MAX_OUTPUT)
    if type(body.get("n")) is int and 1 <= body["n"] <= 128:
        body["n"] = min(body["n"], 2)
    return body


def assert_answered_properly(case: Any, status: int, headers: dict[str, str], text: str) -> None:
    where = f"{case.method} {case.formatted_path} {case.query} {str(case.body)[:300]} -> {status}: {text[:500]}"
    # 503 is for an overloaded or absent backend, and says when to come back; any other 5xx is a bug.
    assert status < 500 or (status == 503 and "retry-after" in headers), where
    if status >= 400:
        body = json.loads(text)
        assert set(body) == {"error"}, where  # OpenAI's envelope, never FastAPI's {"detail": ...}
        error = body["error"]
        assert set(error) >= {"message", "type", "param", "code"}, where
        assert isinstance(error["message"], str) and error["message"], where
        assert error["param"] is None or isinstance(error["param"], str), where
    if headers.get("content-type", "").startswith("text/event-stream"):
        # A failure after the stream started is an `error` event: never an internal one.
        assert '"type":"server_error"' not in text.replace(" ", ""), where


def _call(base_url: str, case: Any) -> None:
    """Sends the case as Schemathesis serialises it (JSON, multipart, parameters) and checks the answer."""
    response = case.call(base_url=base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    headers = {name.lower(): values[0] for name, values in response.headers.items() if values}
    assert_answered_properly(case, response.status_code, headers, response.content.decode(errors="replace"))


@pytest.mark.parametrize(
    ("method", "path", "models", "known"), OPERATIONS, ids=[f"{row[0]} {row[1]}" for row in OPERATIONS]
)
def test_every_operation_answers_every_case_without_a_5xx(stack, spec, method, path, models, known):
    operation = spec[path][method]
    cases = st.one_of(
        operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
        operation.as_strategy(generation_mode=GenerationMode.NEGATIVE),
    )

    @PROPERTY
    # Hypothesis favours the simplest draws (0, False, the first branch): those take the deep path.
    @given(
        case=cases,
        model=st.sampled_from(models or ALL_MODELS),
        generated_model=st.integers(0, 3),
        unknown_fields=st.booleans(),
        edge_value=st.tuples(st.integers(0, 50), st.integers(0, 50)) | st.none(),
    )
    def prop(case, model, generated_model, unknown_fields, edge_value):
        if isinstance(case.body, dict) and known is not None and not unknown_fields:
            case.body = {key: value for key, value in case.body.items() if key in known.model_fields}
        if isinstance(case.body, dict) and known is not None and edge_value is not None:
            fields = sorted((INTEGER_FIELDS | {"size"}) & set(known.model_fields))
            if fields:
                field = fields[edge_value[0] % len(fields)]
                pool = EDGE_SIZES if field == "size" else EDGE_INTEGERS
                case.body[field] = pool[edge_value[1] % len(pool)]
        if isinstance(case.body, dict) and models and generated_model < 3:
            case.body["model"] = model  # past routing, into the modality's checks and backend
        case.body = _clamped(case.body)
        _call(stack.base_url, case)

    prop()


def test_a_request_without_max_tokens_gets_the_catalogs_default_output_limit(stack):
    edge = httpx.Client(base_url=stack.base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    assert edge.get("/models/smollm2").json()["default_max_tokens"] == MAX_OUTPUT
    # Greedy: a sampled answer may end by itself within the bound and prove nothing (it did, once).
    story = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": "Tell me a very long story."}],
        "temperature": 0,
    }
    usage = edge.post("/chat/completions", json=story).json()["usage"]
    assert 1 <= usage["completion_tokens"] <= MAX_OUTPUT
    asked = edge.post("/chat/completions", json={**story, "max_tokens": MAX_OUTPUT + 4}).json()["usage"]
    assert asked["completion_tokens"] > MAX_OUTPUT  # the client's own bound wins over the default
