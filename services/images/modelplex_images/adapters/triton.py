"""triton: a text-to-image pipeline served by Triton (or any KServe v2 gRPC server).

The served model's contract (one request per image):

    inputs   prompt BYTES[1], width INT32[1], height INT32[1], seed INT64[1],
             quality BYTES[1], negative_prompt BYTES[1]
    output   image: UINT8[H, W, 3|4] (pixels) or BYTES[1] (an encoded png/jpeg/webp)

Both output forms are accepted; the backend re-encodes to the requested format.
No intermediate steps are streamed (partial_images is refused by the capability check).
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator

import grpc
import numpy as np
from PIL import Image, UnidentifiedImageError

from modelplex_images.engine import ImageSpec, Rendered
from modelplex_images.settings import ImagesSettings
from modelplex_kit.errors import ServiceError
from modelplex_kit.kserve_v2 import tensor
from modelplex_kit.pools.triton import TritonPool

OUTPUT = "image"


def image_inputs(spec: ImageSpec) -> list:
    return [
        tensor("prompt", spec.prompt.encode(), np.object_),
        tensor("width", spec.width, np.int32),
        tensor("height", spec.height, np.int32),
        tensor("seed", spec.seed % 2**63, np.int64),
        tensor("quality", spec.quality.encode(), np.object_),
        tensor("negative_prompt", spec.negative_prompt.encode(), np.object_),
    ]


def to_image(output: np.ndarray | None, spec: ImageSpec, model: str) -> Image.Image:
    try:
        if output is not None and output.dtype == np.object_:
            image = Image.open(io.BytesIO(output.reshape(-1)[0]))
            image.load()
        elif output is not None and output.dtype == np.uint8 and output.ndim == 3 and output.shape[2] in (3, 4):
            image = Image.fromarray(output)
        else:
            raise ValueError(f"unexpected `{OUTPUT}` output {None if output is None else (output.dtype, output.shape)}")
    except (ValueError, UnidentifiedImageError, OSError) as exc:
        raise ServiceError(grpc.StatusCode.INTERNAL, f"Model `{model}` returned no usable image: {exc}") from None
    if image.size != (spec.width, spec.height):
        raise ServiceError(
            grpc.StatusCode.INTERNAL,
            f"Model `{model}` returned {image.size[0]}x{image.size[1]} for {spec.width}x{spec.height}.",
        )
    return image if image.mode in ("RGB", "RGBA") else image.convert("RGB")


class TritonImagesEngine:
    max_partial_images = 0

    def __init__(self, settings: ImagesSettings) -> None:
        upstream = settings.triton()
        if not upstream.upstream_url or not upstream.upstream_model:
            raise SystemExit("images: engine triton needs upstream_url and upstream_model")
        self._model, self._timeout = upstream.upstream_model, upstream.upstream_timeout_seconds
        self._pool = TritonPool("images", settings, self._model)

    async def render(self, spec: ImageSpec) -> AsyncIterator[Rendered]:
        result = await self._pool.infer(self._model, image_inputs(spec), client_timeout=self._timeout)
        yield Rendered(to_image(result.as_numpy(OUTPUT), spec, self._model), final=True)

    async def ready(self) -> bool:
        return await self._pool.ready()

    async def close(self) -> None:
        await self._pool.close()
