"""POST /v1/images/generations through the official openai SDK, against the procedural renderer."""

from __future__ import annotations

import base64
import io
import json

import httpx
import openai
import pytest
from PIL import Image

from tests.e2e.visual_stack import VISUAL_KEY, start_visual_stack
from tests.support.openapi import validate

pytestmark = pytest.mark.e2e
MODEL = "procedural-image"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    running = start_visual_stack(tmp_path_factory.mktemp("images"))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key=VISUAL_KEY, max_retries=0, timeout=60)


def _raw(stack, body: dict, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {VISUAL_KEY}"}
    return httpx.post(f"{stack.base_url}/images/generations", json=body, headers=headers, timeout=60, **kw)


def _image(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_generation_matches_openai_schema(stack, client):
    response = client.images.generate(model=MODEL, prompt="a lighthouse at dusk", size="1024x1024", n=2)
    assert len(response.data) == 2
    images = [_image(item.b64_json) for item in response.data]
    assert all(image.size == (1024, 1024) and image.format == "PNG" for image in images)
    assert response.data[0].b64_json != response.data[1].b64_json
    assert (response.output_format, response.size, response.quality) == ("png", "1024x1024", "medium")
    assert response.usage.input_tokens > 0
    raw = _raw(stack, {"model": MODEL, "prompt": "a lighthouse", "size": "1536x1024"})
    assert raw.status_code == 200
    validate(raw.json(), "ImagesResponse")


@pytest.mark.parametrize("size", ["256x256", "512x512", "1024x1536", "1536x1024", "auto"])
def test_sizes(client, size):
    response = client.images.generate(model=MODEL, prompt="dunes", size=size)
    expected = (1024, 1024) if size == "auto" else tuple(int(v) for v in size.split("x"))
    assert _image(response.data[0].b64_json).size == expected


@pytest.mark.parametrize(("fmt", "pil"), [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_formats(client, fmt, pil):
    response = client.images.generate(
        model=MODEL, prompt="a bowl of fruit", size="512x512", output_format=fmt, output_compression=80
    )
    assert _image(response.data[0].b64_json).format == pil
    assert response.output_format == fmt


def test_seed_gives_the_same_bytes(client):
    def make(seed: int, prompt: str = "a green door") -> str:
        response = client.images.generate(model=MODEL, prompt=prompt, size="256x256", extra_body={"seed": seed})
        return response.data[0].b64_json

    assert make(11) == make(11)
    assert make(11) != make(12)
    assert make(11) != make(11, "a red door")


def test_transparent_background(client):
    response = client.images.generate(model=MODEL, prompt="a kite", size="256x256", background="transparent")
    assert _image(response.data[0].b64_json).mode == "RGBA"
    assert response.background == "transparent"


def test_url_format_is_refused_with_advice(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(model=MODEL, prompt="x", response_format="url")
    error = caught.value.body
    assert error["param"] == "response_format"
    assert "b64_json" in error["message"]


def test_unsupported_size_lists_the_valid_ones(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(model=MODEL, prompt="x", size="1792x1024")
    assert caught.value.body["param"] == "size"
    assert "256x256" in caught.value.body["message"] and "auto" in caught.value.body["message"]


def test_prompt_limit(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(model=MODEL, prompt="x" * 1001)
    assert caught.value.body["param"] == "prompt"


def test_n_limit_and_missing_key(stack, client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(model=MODEL, prompt="x", n=5)
    assert caught.value.body["param"] == "n"
    # A bad body without a key: the key is checked first.
    assert httpx.post(f"{stack.base_url}/images/generations", json={"response_format": "url"}).status_code == 401


def test_streaming_partial_images(stack, client):
    events = list(
        client.images.generate(model=MODEL, prompt="a city at night", size="1024x1024", stream=True, partial_images=2)
    )
    assert [e.type for e in events] == [
        "image_generation.partial_image", "image_generation.partial_image", "image_generation.completed"
    ]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    assert all(_image(e.b64_json).size == (1024, 1024) for e in events)
    assert len({e.b64_json for e in events}) == 3  # each step refines the picture
    assert events[-1].usage.input_tokens > 0
    with httpx.stream(
        "POST", f"{stack.base_url}/images/generations",
        json={"model": MODEL, "prompt": "a city", "stream": True, "partial_images": 1, "size": "1024x1024"},
        headers={"Authorization": f"Bearer {VISUAL_KEY}"}, timeout=60,
    ) as raw:
        lines = [line for line in raw.iter_lines() if line.startswith("data: ")]
    payloads = [json.loads(line.removeprefix("data: ")) for line in lines]
    validate(payloads[0], "ImageGenPartialImageEvent")
    validate(payloads[-1], "ImageGenCompletedEvent")


def test_edits_and_variations_keep_their_advice(stack):
    headers = {"Authorization": f"Bearer {VISUAL_KEY}"}
    for path in ("edits", "variations"):
        reply = httpx.post(f"{stack.base_url}/images/{path}", headers=headers, data={"prompt": "x"})
        assert reply.status_code == 404
        assert "/v1/images/generations" in reply.json()["error"]["message"]


def test_images_are_counted_as_usage(stack, client):
    def counted() -> float:
        metrics = httpx.get(f"http://127.0.0.1:{stack.edge_port}/metrics").text
        prefix = 'modelplex_request_units_total{kind="images",model="procedural-image"}'
        lines = [line for line in metrics.splitlines() if line.startswith(prefix)]
        return float(lines[0].rsplit(" ", 1)[1]) if lines else 0.0

    before = counted()
    client.images.generate(model=MODEL, prompt="three birds", size="256x256", n=3)
    assert counted() - before == 3
