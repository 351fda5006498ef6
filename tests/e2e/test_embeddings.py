"""POST /v1/embeddings end to end: the official openai SDK -> edge -> embeddings backend (all-MiniLM-L6-v2)."""

from __future__ import annotations

import base64
import json

import httpx
import numpy as np
import openai
import pytest

from tests.support import stacks
from tests.support.openapi import validate
from tests.support.ports import free_port

pytestmark = pytest.mark.e2e

KEY = "sk-modelplex-embeddings-e2e"
MODEL = "all-minilm-l6-v2"
SENTENCES = ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]


def _catalog(tmp) -> str:
    backend = f"127.0.0.1:{free_port()}"
    minilm_caps = {"dimensions": 384, "matryoshka": False, "max_inputs": 2048, "max_input_tokens": 256}
    models = [
        {
            "id": MODEL,
            "aliases": ["minilm"],
            "modality": "embeddings",
            "backend": backend,
            "engine": {"kind": "local", "settings": {"batching__max_wait_ms": 2}},
            "capabilities": minilm_caps,
            "created": 1630281600,
        },
        # The same backend, listed with a lower per-request limit: the catalog's limit is enforced.
        {
            "id": "minilm-small-batches",
            "modality": "embeddings",
            "backend": backend,
            "engine": {"kind": "local", "settings": {"batching__max_wait_ms": 2}},
            "capabilities": {**minilm_caps, "max_inputs": 4},
            "created": 1630281600,
        },
        # A text model nobody calls: embeddings requests naming it are refused before routing.
        {
            "id": "some-chat-model",
            "modality": "text",
            "backend": f"127.0.0.1:{free_port()}",
            "engine": {"kind": "external"},
            "capabilities": ["chat"],
            "created": 1730419200,
        },
    ]
    path = stacks.write_catalog(tmp, models)
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("embeddings-stack")
    running = stacks.start_stack(_catalog(tmp), tmp, env={"MODELPLEX_DEV_API_KEY": KEY, "MODELPLEX_LOG_LEVEL": "info"})
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(stack):
    with httpx.Client(base_url=stack.base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
        yield c


def vectors(response) -> np.ndarray:
    return np.array([item.embedding for item in response.data], dtype=np.float32)


def raw_create(client, **kwargs):
    """The SDK call, plus the JSON body it sent and the JSON it got back."""
    raw = client.embeddings.with_raw_response.create(**kwargs)
    return raw.parse(), json.loads(raw.http_request.content), raw.http_response.json()


def test_single_string_input(client):
    response, _, body = raw_create(client, model=MODEL, input="Hello world", encoding_format="float")
    validate(body, "CreateEmbeddingResponse")
    assert body["model"] == MODEL and body["object"] == "list"
    assert len(response.data) == 1 and len(response.data[0].embedding) == 384
    assert abs(np.linalg.norm(response.data[0].embedding) - 1.0) < 1e-4
    assert response.usage.prompt_tokens == 4 == response.usage.total_tokens  # [CLS] hello world [SEP]


def test_batch_keeps_order_and_matches_single_requests(client):
    batch = client.embeddings.create(model=MODEL, input=SENTENCES, encoding_format="float")
    assert [item.index for item in batch.data] == [0, 1, 2]
    singles = np.stack(
        [vectors(client.embeddings.create(model=MODEL, input=s, encoding_format="float"))[0] for s in SENTENCES]
    )
    np.testing.assert_allclose(vectors(batch), singles, atol=1e-5)
    assert batch.usage.prompt_tokens == 8 + 9 + 8


def test_semantic_sanity_similar_sentences_are_closer(client):
    v = vectors(client.embeddings.create(model=MODEL, input=SENTENCES, encoding_format="float"))
    similar, unrelated = float(v[0] @ v[1]), float(v[0] @ v[2])
    assert similar > unrelated + 0.3
    # sentence-transformers' published figures for this model and these sentences.
    assert similar == pytest.approx(0.6660, abs=1e-3) and unrelated == pytest.approx(0.1046, abs=1e-3)


def test_base64_equals_float_explicit_and_when_the_sdk_omits_encoding_format(client):
    floats = vectors(client.embeddings.create(model=MODEL, input=SENTENCES, encoding_format="float"))
    _, sent, body = raw_create(client, model=MODEL, input=SENTENCES, encoding_format="base64")
    assert sent["encoding_format"] == "base64" and isinstance(body["data"][0]["embedding"], str)
    decoded = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in body["data"]])
    # The spec types `embedding` as a float array only (its base64 form is undocumented there):
    # the rest of the body is validated with the decoded vectors in place.
    for item, vector in zip(body["data"], decoded, strict=True):
        item["embedding"] = vector.tolist()
    validate(body, "CreateEmbeddingResponse")
    np.testing.assert_array_equal(decoded, floats)
    omitted, sent, _ = raw_create(client, model=MODEL, input=SENTENCES)
    # This SDK asks for base64 when the caller does not say, and decodes it itself.
    assert sent["encoding_format"] == "base64"
    np.testing.assert_array_equal(vectors(omitted), floats)


def test_float_is_the_default_for_clients_that_omit_encoding_format(http):
    body = http.post("/embeddings", json={"model": MODEL, "input": "Hello"}).json()
    validate(body, "CreateEmbeddingResponse")
    assert isinstance(body["data"][0]["embedding"], list) and len(body["data"][0]["embedding"]) == 384


def test_token_array_inputs_equal_their_text(client):
    text = vectors(client.embeddings.create(model=MODEL, input="Hello world", encoding_format="float"))
    ids = [101, 7592, 2088, 102]  # MiniLM's WordPiece ids for "[CLS] hello world [SEP]"
    one = client.embeddings.create(model=MODEL, input=ids, encoding_format="float")
    many = client.embeddings.create(model=MODEL, input=[ids, ids[:3]], encoding_format="float")
    np.testing.assert_allclose(vectors(one)[0], text[0], atol=1e-5)
    assert one.usage.prompt_tokens == 4 and many.usage.prompt_tokens == 7 and len(many.data) == 2
    np.testing.assert_allclose(vectors(many)[0], text[0], atol=1e-5)


def test_dimensions_equal_to_the_native_size_is_accepted(client):
    response = client.embeddings.create(model="minilm", input="x", dimensions=384, encoding_format="float")
    assert len(response.data[0].embedding) == 384 and response.model == MODEL


def test_concurrent_requests_each_get_their_own_vectors(client):
    from concurrent.futures import ThreadPoolExecutor

    expected = vectors(client.embeddings.create(model=MODEL, input=SENTENCES, encoding_format="float"))
    with ThreadPoolExecutor(8) as pool:
        results = list(
            pool.map(
                lambda i: vectors(
                    client.embeddings.create(model=MODEL, input=SENTENCES[i % 3], encoding_format="float")
                ),
                range(24),
            )
        )
    for i, got in enumerate(results):
        np.testing.assert_allclose(got[0], expected[i % 3], atol=1e-5)


# -- errors: each a 400 (or 404) naming the parameter -------------------------------------------
def bad_request(client, **kwargs) -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(**{"model": MODEL, "encoding_format": "float", **kwargs})
    body = err.value.body
    assert set(body) >= {"message", "type", "param", "code"} and body["type"] == "invalid_request_error"
    return err.value


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"input": []}, "input"),
        ({"input": ""}, "input[0]"),
        ({"input": ["fine", ""]}, "input[1]"),
        ({"input": [[]]}, "input"),
        ({"input": ["x"] * 2049}, "input"),
        ({"input": "x", "dimensions": 0}, "dimensions"),
        ({"input": "x", "encoding_format": "hex"}, "encoding_format"),
    ],
)
def test_malformed_requests_are_400_naming_the_parameter(client, payload, param):
    assert bad_request(client, **payload).param == param


def test_more_inputs_than_the_model_allows_is_400(client):
    err = bad_request(client, model="minilm-small-batches", input=["a"] * 5)
    assert err.param == "input" and "at most 4" in err.message


def test_an_input_over_the_context_is_400_naming_its_index(client):
    err = bad_request(client, input=["short", "word " * 300])
    assert err.param == "input[1]" and err.code == "context_length_exceeded"


def test_a_token_id_outside_the_vocabulary_is_400(client):
    assert bad_request(client, input=[[101, 999999]]).param == "input[0]"


def test_dimensions_on_a_non_matryoshka_model_is_400(client):
    err = bad_request(client, input="x", dimensions=128)
    assert err.param == "dimensions" and err.code == "unsupported_parameter"


def test_a_text_model_is_400_model_not_supported(client):
    err = bad_request(client, model="some-chat-model", input="x")
    assert err.param == "model" and err.code == "model_not_supported"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.embeddings.create(model="text-embedding-9", input="x")
    assert err.value.code == "model_not_found" and err.value.param == "model"


def test_no_key_is_401_before_the_body_is_judged(stack):
    response = httpx.post(f"{stack.base_url}/embeddings", json={"model": MODEL, "input": []})
    assert response.status_code == 401
