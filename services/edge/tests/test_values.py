"""Bad values are 400s naming their parameter, refused before admission where the model can never serve them.

The edge runs in-process with a catalog copy and a stand-in for the gatekeeper that answers any
reservation over its budget with a 429 (as a token-per-minute limit does); no backend is reachable,
so every request here must be settled by the edge itself.
"""

from __future__ import annotations

import grpc
import httpx
import pytest

from modelplex.v1 import catalog_pb2
from modelplex_edge.admission import Admitted, Ask, DevKeyAdmission
from modelplex_edge.app import create_app
from modelplex_edge.backends import Backends
from modelplex_edge.catalog_client import CatalogWatcher
from modelplex_edge.endpoints.chat import translate as chat_translate
from modelplex_edge.endpoints.chat.protocol import ChatCompletionRequest
from modelplex_edge.endpoints.responses.store import MemoryStore
from modelplex_edge.settings import EdgeSettings
from modelplex_edge.state import EdgeState
from modelplex_kit.catalog_view import CatalogView
from modelplex_kit.errors import ServiceError

KEY = "sk-values"
AUTH = {"Authorization": f"Bearer {KEY}"}
NOWHERE = "127.0.0.1:1"  # no backend: a request that got past the edge would fail with 503
BUDGET = 10_000  # tokens or units a reservation may take before the stand-in gatekeeper answers 429

TEXT = catalog_pb2.Model(
    id="tiny",
    modality=catalog_pb2.MODALITY_TEXT,
    backend_target=NOWHERE,
    context_length=2048,
    default_max_tokens=64,
    capabilities=catalog_pb2.Capabilities(text=catalog_pb2.TextCapabilities(chat=True, completions=True)),
)
IMAGES = catalog_pb2.Model(
    id="painter",
    modality=catalog_pb2.MODALITY_IMAGES,
    backend_target=NOWHERE,
    capabilities=catalog_pb2.Capabilities(
        images=catalog_pb2.ImagesCapabilities(sizes=["256x256"], max_n=4, output_formats=["png"])
    ),
)
VIDEOS = catalog_pb2.Model(
    id="filmer",
    modality=catalog_pb2.MODALITY_VIDEOS,
    backend_target=NOWHERE,
    capabilities=catalog_pb2.Capabilities(videos=catalog_pb2.VideosCapabilities(sizes=["64x64"], seconds=[4, 8])),
)
EMBEDDINGS = catalog_pb2.Model(
    id="vectors",
    modality=catalog_pb2.MODALITY_EMBEDDINGS,
    backend_target=NOWHERE,
    capabilities=catalog_pb2.Capabilities(embeddings=catalog_pb2.EmbeddingsCapabilities(dimensions=8)),
)
TRANSCRIPTION = catalog_pb2.Model(
    id="ears", modality=catalog_pb2.MODALITY_TRANSCRIPTION, backend_target=NOWHERE
)


class BudgetAdmission(DevKeyAdmission):
    """One key and a budget per request: a bigger reservation is a 429 that retrying cannot fix."""

    def __init__(self) -> None:
        super().__init__(KEY)
        self.asks: list[Ask] = []

    async def admit(self, ask: Ask) -> Admitted:
        admitted = await super().admit(ask)
        self.asks.append(ask)
        if ask.cost > BUDGET:
            raise ServiceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED, "Rate limit reached.", headers={"retry-after": "541"}
            )
        return admitted


@pytest.fixture
async def edge():
    settings = EdgeSettings(catalog_target=NOWHERE, backend_timeout_seconds=5)
    admission = BudgetAdmission()
    app = create_app(settings, admission)
    watcher = CatalogWatcher(grpc.aio.insecure_channel(NOWHERE))
    watcher.view = CatalogView.build([TEXT, IMAGES, VIDEOS, EMBEDDINGS, TRANSCRIPTION], 1)
    watcher.ready.set()
    backends = Backends(settings.backend_timeout_seconds)
    app.state.edge = EdgeState(settings, watcher, backends, admission, MemoryStore(retention_seconds=60))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://edge") as client:
        client.admission = admission  # type: ignore[attr-defined]
        yield client
    await app.state.edge.backends.close()


def assert_invalid(response: httpx.Response, param: str) -> dict:
    assert response.status_code == 400, response.text
    assert set(response.json()) == {"error"}, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    return error


def chat(**fields) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], **fields}


# -- defect 3: out-of-range numbers were 500s -------------------------------------------------------


@pytest.mark.parametrize("size", ["-1x-1", "0x-5", "99999999999x1", "0x0", "12x", "x12"])
async def test_an_image_size_out_of_range_is_a_400_naming_size(edge, size):
    response = await edge.post("/v1/images/generations", json={"model": "painter", "prompt": "p", "size": size},
                               headers=AUTH)
    assert_invalid(response, "size")


async def test_a_video_size_out_of_range_is_a_400_naming_size(edge):
    response = await edge.post("/v1/videos", json={"model": "filmer", "prompt": "p", "size": "-1x-1"}, headers=AUTH)
    assert_invalid(response, "size")


@pytest.mark.parametrize("seconds", ["-4", "0", "99999999999", "four", -4, 0, 2**70])
async def test_video_seconds_the_model_does_not_serve_are_a_400_before_admission(edge, seconds):
    response = await edge.post("/v1/videos", json={"model": "filmer", "prompt": "p", "seconds": seconds},
                               headers=AUTH)
    assert_invalid(response, "seconds")
    assert all(ask.cost <= BUDGET for ask in edge.admission.asks)  # never reserved, so never a 429


@pytest.mark.parametrize(
    ("field", "value"), [("seed", 10**23), ("seed", 1e23), ("seed", -(2**64)), ("max_tokens", 2**40)]
)
async def test_chat_integers_beyond_the_wire_types_are_a_400(edge, field, value):
    assert_invalid(await edge.post("/v1/chat/completions", json=chat(**{field: value}), headers=AUTH), field)


@pytest.mark.parametrize("body", [{"seed": 2**64}, {"max_tokens": 2**33}])
async def test_completions_integers_beyond_the_wire_types_are_a_400(edge, body):
    response = await edge.post("/v1/completions", json={"model": "tiny", "prompt": "Hi", **body}, headers=AUTH)
    assert_invalid(response, next(iter(body)))


@pytest.mark.parametrize("kind", [[], {}, ["text"], 3])
@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", lambda kind: chat(messages=[{"role": "user", "content": [{"type": kind}]}]),
         "messages"),
        ("/v1/responses", lambda kind: {"model": "tiny", "input": [{"role": "user", "content": [{"type": kind}]}]},
         "input[0].content[0].type"),
        ("/v1/responses", lambda kind: {"model": "tiny", "input": [{"type": kind}]}, "input[0].type"),
        ("/v1/responses", lambda kind: {"model": "tiny", "input": "Hi", "tools": [{"type": kind}]}, "tools[0].type"),
    ],
    ids=["chat part", "responses part", "responses item", "responses tool"],
)
async def test_a_type_that_is_not_a_string_is_a_400_naming_it(edge, path, body, param, kind):
    # Schemathesis found these: a list or an object where a part's, item's or tool's type goes was a 500.
    response = await edge.post(path, json=body(kind), headers=AUTH)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"].startswith(param), response.text


@pytest.mark.parametrize("key", ["None", "Model", "str"])
async def test_an_unknown_argument_is_named_whatever_it_looks_like(edge, key):
    # Found by the spec property test: keys that look like pydantic's type tags were dropped from `param`.
    error = assert_invalid(await edge.post("/v1/chat/completions", json=chat(**{key: 1}), headers=AUTH), key)
    assert error["message"] == f"Unrecognized request argument supplied: {key}"


# -- defect 4: FastAPI's own 422 for query parameters -------------------------------------------------


@pytest.mark.parametrize(
    ("path", "param"),
    [
        ("/v1/videos?order=sideways", "order"),
        ("/v1/videos?limit=abc", "limit"),
        ("/v1/videos?limit=0", "limit"),
        ("/v1/videos?limit=101", "limit"),
        ("/v1/videos/video_1/content?variant=x", "variant"),
    ],
)
async def test_a_bad_query_parameter_is_a_400_envelope_naming_it(edge, path, param):
    response = await edge.get(path, headers=AUTH)
    assert "detail" not in response.json()
    assert_invalid(response, param)


async def test_a_bad_query_parameter_without_a_key_is_a_401(edge):
    assert (await edge.get("/v1/videos?order=sideways")).status_code == 401


async def test_fastapis_own_parameter_errors_are_openai_envelopes():
    # The net under pipeline.query: a route that types a query parameter the FastAPI way.
    app = create_app(EdgeSettings(catalog_target=NOWHERE))

    @app.get("/typed")
    async def typed(count: int) -> dict:
        return {"count": count}

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://edge") as client:
        response = await client.get("/typed?count=many")
    assert_invalid(response, "count")


# -- defect 5: wrong answers to bad values -------------------------------------------------------------


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
async def test_max_tokens_beyond_the_context_is_a_400_before_admission_not_a_429(edge, field):
    response = await edge.post("/v1/chat/completions", json=chat(**{field: 99_999}), headers=AUTH)
    error = assert_invalid(response, field)
    assert "'max_tokens' or 'max_completion_tokens' is too large: 99999" in error["message"]
    assert "maximum context length is 2048 tokens" in error["message"]
    assert "retry-after" not in response.headers
    assert [ask.model for ask in edge.admission.asks] == [""]  # only the key was checked


async def test_legacy_max_tokens_beyond_the_context_is_a_400_before_admission(edge):
    response = await edge.post("/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 2048},
                               headers=AUTH)
    assert_invalid(response, "max_tokens")


async def test_a_json_body_on_transcriptions_says_it_needs_multipart(edge):
    response = await edge.post("/v1/audio/transcriptions", json={"model": "ears"}, headers=AUTH)
    error = assert_invalid(response, "file")
    assert "multipart/form-data" in error["message"] and "application/json" in error["message"]


async def test_2049_embedding_inputs_name_the_2048_limit(edge):
    response = await edge.post("/v1/embeddings", json={"model": "vectors", "input": ["a"] * 2049}, headers=AUTH)
    error = assert_invalid(response, "input")
    assert "2048" in error["message"] and "2049" in error["message"]


# -- defect 9: a default output limit from the catalog -------------------------------------------------


async def test_the_models_endpoint_shows_the_default_output_limit(edge):
    details = (await edge.get("/v1/models/tiny", headers=AUTH)).json()
    assert details["default_max_tokens"] == 64
    assert "default_max_tokens" not in (await edge.get("/v1/models/painter", headers=AUTH)).json()


def test_the_default_output_limit_applies_only_when_the_client_sets_none():
    unset = chat_translate.to_proto(ChatCompletionRequest(**chat()), TEXT, None)
    assert unset.sampling.default_max_tokens == 64 and not unset.sampling.HasField("max_tokens")
    set_ = chat_translate.to_proto(ChatCompletionRequest(**chat(max_tokens=500)), TEXT, None)
    assert set_.sampling.max_tokens == 500 and not set_.sampling.HasField("default_max_tokens")
    # Admission reserves the default, not the whole context.
    assert chat_translate.cost(ChatCompletionRequest(**chat()), TEXT) < 100
    no_default = catalog_pb2.Model(id="big", context_length=2048)
    assert chat_translate.cost(ChatCompletionRequest(**chat()), no_default) > 2000
