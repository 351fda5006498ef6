"""ImagesServicer over the procedural engine, in process."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from modelplex.v1 import images_pb2
from modelplex_images.__main__ import capabilities
from modelplex_images.adapters import load_engine
from modelplex_images.servicer import ImagesServicer
from modelplex_images.settings import ImagesSettings
from modelplex_kit.errors import ServiceError


@pytest.fixture
def servicer() -> ImagesServicer:
    settings = ImagesSettings()
    engine = load_engine(settings)
    return ImagesServicer(engine, capabilities(settings, engine.max_partial_images))


def request(**fields) -> images_pb2.GenerateImagesRequest:
    base = {"model": "m", "prompt": "a red fox in the snow", "n": 1, "width": 256, "height": 256,
            "output_format": "png"}
    return images_pb2.GenerateImagesRequest(**(base | fields))


async def test_same_seed_same_bytes_other_seed_other_bytes(servicer):
    one = await servicer.GenerateImages(request(seed=7), None)
    again = await servicer.GenerateImages(request(seed=7), None)
    other = await servicer.GenerateImages(request(seed=8), None)
    other_prompt = await servicer.GenerateImages(request(seed=7, prompt="a blue whale"), None)
    assert one.images[0].data == again.images[0].data
    assert one.images[0].data != other.images[0].data
    assert one.images[0].data != other_prompt.images[0].data


@pytest.mark.parametrize(("fmt", "pil"), [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
async def test_formats_and_sizes(servicer, fmt, pil):
    response = await servicer.GenerateImages(request(output_format=fmt, width=1536, height=1024, n=2), None)
    assert len(response.images) == 2
    assert response.images[0].data != response.images[1].data
    for item in response.images:
        image = Image.open(io.BytesIO(item.data))
        assert (image.format, image.size) == (pil, (1536, 1024))
        assert item.mime_type == f"image/{fmt}"


async def test_compression_shrinks_jpeg(servicer):
    best = await servicer.GenerateImages(request(output_format="jpeg", seed=1, output_compression=100), None)
    small = await servicer.GenerateImages(request(output_format="jpeg", seed=1, output_compression=10), None)
    assert len(small.images[0].data) < len(best.images[0].data)


async def test_transparent_background_has_alpha(servicer):
    response = await servicer.GenerateImages(request(background="transparent", seed=3), None)
    image = Image.open(io.BytesIO(response.images[0].data))
    assert image.mode == "RGBA"
    assert image.getextrema()[3][0] == 0  # some pixels fully transparent


async def test_stream_partials_then_final(servicer):
    events = [e async for e in servicer.StreamImages(request(partial_images=2, seed=5), None)]
    assert [(e.partial, e.partial_image_index) for e in events] == [(True, 0), (True, 1), (False, 0)]
    unary = await servicer.GenerateImages(request(seed=5), None)
    assert events[-1].image.data == unary.images[0].data  # the streamed final is the same picture
    assert events[0].image.data != events[-1].image.data
    assert events[-1].usage.prompt_tokens > 0


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"width": 300}, "size"),
        ({"n": 11}, "n"),
        ({"prompt": ""}, "prompt"),
        ({"output_format": "gif"}, "output_format"),
        ({"partial_images": 4}, "partial_images"),
        ({"background": "transparent", "output_format": "jpeg"}, "background"),
    ],
)
async def test_bad_requests_name_the_param(servicer, fields, param):
    with pytest.raises(ServiceError) as caught:
        await servicer.GenerateImages(request(**fields), None)
    assert caught.value.param == param
