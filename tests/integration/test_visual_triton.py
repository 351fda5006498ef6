"""The images Triton adapter against a model that answers encoded image bytes, served by KServe's Python
ModelServer (a real KServe v2 gRPC server; tests/support/kserve_visual_models.py), on loopback.

Everything else the images and videos Triton adapters do is tested against the real tritonserver
(tests/triton/test_visual_on_triton.py); the repository there has no model answering encoded bytes.
"""

from __future__ import annotations

import io

import pytest
from PIL import Image

from modelplex.v1 import catalog_pb2, images_pb2
from modelplex_images.adapters.triton import TritonImagesEngine
from modelplex_images.servicer import ImagesServicer
from modelplex_images.settings import ImagesSettings
from tests.support.kserve_visual import KServeVisual

pytestmark = pytest.mark.integration
SIZES = ["256x256", "512x256"]


@pytest.fixture(scope="module")
def kserve():
    server = KServeVisual().start()
    yield server
    server.stop()


def images_servicer(kserve, model: str) -> tuple[ImagesServicer, TritonImagesEngine]:
    engine = TritonImagesEngine(ImagesSettings(engine="triton", upstream_url=kserve.address, upstream_model=model))
    caps = catalog_pb2.ImagesCapabilities(sizes=SIZES, max_n=4, output_formats=["png", "jpeg", "webp"])
    return ImagesServicer(engine, caps), engine


def image_request(**fields) -> images_pb2.GenerateImagesRequest:
    base = {"model": "m", "prompt": "a harbour", "n": 1, "width": 256, "height": 256, "output_format": "png"}
    return images_pb2.GenerateImagesRequest(**(base | fields))


async def test_encoded_images_through_kserve(kserve):
    servicer, engine = images_servicer(kserve, "procedural-image-png")
    try:
        response = await servicer.GenerateImages(image_request(n=2, seed=4, width=512, output_format="webp"), None)
        again = await servicer.GenerateImages(image_request(n=2, seed=4, width=512, output_format="webp"), None)
    finally:
        await engine.close()
    assert len(response.images) == 2
    images = [Image.open(io.BytesIO(item.data)) for item in response.images]
    assert all(image.format == "WEBP" and image.size == (512, 256) for image in images)
    assert response.images[0].data != response.images[1].data  # seed + index per image
    assert [i.data for i in again.images] == [i.data for i in response.images]  # the seed reaches the model
