"""Every failure is OpenAI's error envelope with the right status (SDK exceptions prove it)."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.support.openapi import validate

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m-instruct"
HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def http(stack, client):
    with httpx.Client(
        base_url=stack.base_url, headers={"Authorization": f"Bearer {client.api_key}"}, timeout=60
    ) as session:
        yield session


def envelope(response: httpx.Response) -> dict:
    body = response.json()
    validate(body, "ErrorResponse")
    return body["error"]


def test_wrong_key_is_401(stack):
    bad = openai.OpenAI(base_url=stack.base_url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.models.list()
    assert err.value.code == "invalid_api_key"
    assert "sk-wrong" not in str(err.value)


def test_missing_key_is_401_with_code_null_as_openai_sends_it(stack):
    response = httpx.get(f"{stack.base_url}/models")
    error = envelope(response)
    assert response.status_code == 401 and error["code"] is None
    assert "didn't provide an API key" in error["message"] and "Bearer" in error["message"]
    assert response.headers["x-request-id"]


def test_keys_never_reach_the_logs(stack, client):
    bad = openai.OpenAI(base_url=stack.base_url, api_key="sk-secret-should-not-leak", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    for log in stack.logs.glob("*.log"):
        text = log.read_text()
        assert "sk-secret-should-not-leak" not in text and client.api_key not in text, log.name


def test_malformed_json_is_400(http):
    response = http.post("/chat/completions", content=b'{"model": ', headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert "could not parse the JSON body" in envelope(response)["message"]


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"model": MODEL, "messages": HELLO, "temperature": 5}, "temperature"),
        ({"model": MODEL}, "messages"),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        (
            {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "video", "x": 1}]}]},
            "messages[0].content",
        ),
        ({"model": MODEL, "messages": HELLO, "stream_options": {"include_usage": True}}, "stream_options"),
        ({"model": MODEL, "messages": HELLO, "tool_choice": "required"}, "tool_choice"),
        ({"model": MODEL, "messages": HELLO, "frobnicate": 1}, "frobnicate"),
        ({"model": MODEL, "messages": HELLO, "max_tokens": 0}, "max_tokens"),
    ],
)
def test_schema_violations_are_400_with_param(http, payload, param):
    response = http.post("/chat/completions", json=payload)
    assert response.status_code == 400
    assert envelope(response)["param"] == param


def test_logprobs_on_a_model_without_them_is_400_naming_it(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="chat-only", messages=HELLO, logprobs=True, max_tokens=2)
    assert err.value.param == "logprobs"


def test_n_on_a_model_without_it_is_400_naming_it(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="chat-only", messages=HELLO, n=2, max_tokens=2)
    assert err.value.param == "n"


def test_image_content_on_a_text_only_model_is_400(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=MODEL,
            max_tokens=2,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is this?"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                    ],
                }
            ],
        )
    assert err.value.param == "messages[0].content[1]"


def test_logit_bias_is_refused_by_name(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=HELLO, logit_bias={"42": 5}, max_tokens=2)
    assert err.value.param == "logit_bias"


def test_a_model_of_another_modality_is_400_model_not_supported(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="minilm", messages=HELLO)
    assert err.value.code == "model_not_supported" and err.value.param == "model"


def test_unknown_model_is_404_model_not_found(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-17", messages=HELLO)
    assert err.value.code == "model_not_found" and err.value.param == "model"


def test_unknown_route_is_404(http):
    response = http.get("/nothing/here")
    assert response.status_code == 404 and envelope(response)["code"] == "unknown_url"


def test_wrong_method_is_405(http):
    response = http.get("/chat/completions")
    assert response.status_code == 405 and envelope(response)["type"] == "invalid_request_error"


def test_body_too_large_is_413(http):
    from tests.e2e.conftest import MAX_BODY

    big = [{"role": "user", "content": "x" * (MAX_BODY + 1)}]
    response = http.post("/chat/completions", json={"model": MODEL, "messages": big})
    assert response.status_code == 413 and envelope(response)["code"] == "request_too_large"


def test_chunked_body_too_large_is_413(http):
    from tests.e2e.conftest import MAX_BODY

    def body():
        yield b'{"model": "smollm2", "messages": [{"role": "user", "content": "'
        for _ in range(MAX_BODY // 1024 + 2):
            yield b"y" * 1024
        yield b'"}]}'

    response = http.post("/chat/completions", content=body(), headers={"content-type": "application/json"})
    assert response.status_code == 413 and envelope(response)["code"] == "request_too_large"


def test_engine_unavailable_is_503(client):
    # The catalog sees that nothing answers at the backend's address: the model is not ready.
    with pytest.raises(openai.InternalServerError) as err:
        client.chat.completions.create(model="offline", messages=HELLO, max_tokens=2)
    assert err.value.status_code == 503 and err.value.code == "service_unavailable"
    assert err.value.response.headers["retry-after"] == "5" and "`offline` is loading" in err.value.message


def test_engine_unavailable_while_streaming_is_503_before_the_stream(client):
    with pytest.raises(openai.InternalServerError) as err:
        client.chat.completions.create(model="offline", messages=HELLO, max_tokens=2, stream=True)
    assert err.value.status_code == 503 and err.value.code == "service_unavailable"


def test_context_length_exceeded_is_400(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "word " * 3000}])
    assert err.value.code == "context_length_exceeded"


@pytest.mark.parametrize(
    ("method", "path", "advice"),
    [
        ("POST", "/images/edits", "generations"),
        ("POST", "/images/variations", "generations"),
        ("POST", "/fine_tuning/jobs", "Fine-tuning"),
        ("POST", "/assistants", "chat/completions"),
        ("POST", "/threads/abc/runs", "chat/completions"),
    ],
)
def test_unsupported_endpoints_say_what_to_use(http, method, path, advice):
    response = http.request(method, path, json={})
    assert response.status_code == 404
    error = envelope(response)
    assert error["code"] == "unsupported_endpoint" and advice in error["message"]


def test_every_response_carries_a_request_id(http):
    assert http.get("/models").headers["x-request-id"]
    assert http.get("/nothing").headers["x-request-id"]
    assert http.get("/models", headers={"x-request-id": "trace-me-123"}).headers["x-request-id"] == "trace-me-123"
    for unsafe in ("a b<>", "x" * 200):  # not echoed: a fresh id instead
        replaced = http.get("/models", headers={"x-request-id": unsafe}).headers["x-request-id"]
        assert replaced != unsafe and len(replaced) == 32


def test_cors_is_closed_by_default(http):
    response = http.options(
        "/chat/completions", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    )
    assert "access-control-allow-origin" not in response.headers
