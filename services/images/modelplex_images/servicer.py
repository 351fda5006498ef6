"""The ImagesService: checks, seeds, the ``n`` loop, encoding and usage around an engine."""

from __future__ import annotations

import asyncio
import io
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import aclosing

import grpc
from PIL import Image

from modelplex.v1 import catalog_pb2, common_pb2, images_pb2, images_pb2_grpc
from modelplex_images.engine import ImagesEngine, ImageSpec, Rendered
from modelplex_kit.errors import ServiceError
from modelplex_kit.modalities.images import check_images_request

MIME_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
# Pillow's useful top quality; output_compression 100 (OpenAI's default) means "as good as it gets".
_BEST_QUALITY = 95


def encode(image: Image.Image, output_format: str, compression: int) -> bytes:
    """Encodes with Pillow. Deterministic: no timestamps or other metadata are written."""
    buffer = io.BytesIO()
    quality = min(_BEST_QUALITY, compression or 100)
    if output_format == "jpeg":
        image.convert("RGB").save(buffer, "JPEG", quality=quality)
    elif output_format == "webp":
        image.save(buffer, "WEBP", quality=quality, method=4)
    else:
        image.save(buffer, "PNG", compress_level=6)
    return buffer.getvalue()


def prompt_tokens(prompt: str) -> int:
    # No tokenizer behind a renderer: OpenAI's rule of thumb of ~4 characters per token.
    return max(1, (len(prompt) + 3) // 4)


def image_specs(request: images_pb2.GenerateImagesRequest) -> list[ImageSpec]:
    """One spec per image of ``n``; image i uses seed + i, so each differs and each is reproducible."""
    seed = request.seed if request.HasField("seed") else secrets.randbits(62)
    return [
        ImageSpec(
            prompt=request.prompt,
            width=request.width,
            height=request.height,
            seed=seed + i,
            quality=request.quality or "auto",
            style=request.style,
            background=request.background or "auto",
            negative_prompt=request.negative_prompt,
            partial_images=request.partial_images,
        )
        for i in range(max(1, request.n))
    ]


class _Gate:
    """At most ``limit`` renders at once; beyond ``max_queue`` waiting requests, a 503."""

    def __init__(self, limit: int, max_queue: int) -> None:
        self._semaphore = asyncio.Semaphore(limit)
        self._max_queue = max_queue
        self._waiting = 0

    async def __aenter__(self) -> None:
        if self._semaphore.locked() and self._waiting >= self._max_queue:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "The image model is busy; please retry shortly.")
        self._waiting += 1
        try:
            await self._semaphore.acquire()
        finally:
            self._waiting -= 1

    async def __aexit__(self, *exc: object) -> None:
        self._semaphore.release()


class ImagesServicer(images_pb2_grpc.ImagesServiceServicer):
    def __init__(
        self, engine: ImagesEngine, capabilities: catalog_pb2.ImagesCapabilities, max_concurrency: int = 2,
        max_queue: int = 64,
    ) -> None:
        self._engine = engine
        self._capabilities = catalog_pb2.Capabilities(images=capabilities)
        self._gate = _Gate(max_concurrency, max_queue)

    def _check(self, request: images_pb2.GenerateImagesRequest) -> None:
        check_images_request(request, self._capabilities)

    async def _render(self, spec: ImageSpec) -> AsyncIterator[Rendered]:
        async with self._gate, aclosing(self._engine.render(spec)) as steps:
            async for step in steps:
                yield step

    async def _encoded(self, request, step: Rendered) -> images_pb2.GeneratedImage:
        data = await asyncio.to_thread(encode, step.image, request.output_format, request.output_compression)
        return images_pb2.GeneratedImage(
            data=data, mime_type=MIME_TYPES[request.output_format], revised_prompt=step.revised_prompt
        )

    async def GenerateImages(self, request, context: grpc.aio.ServicerContext) -> images_pb2.GenerateImagesResponse:
        self._check(request)
        request.partial_images = 0
        images = []
        for spec in image_specs(request):
            async with aclosing(self._render(spec)) as steps:
                async for step in steps:
                    if step.final:
                        images.append(await self._encoded(request, step))
        tokens = prompt_tokens(request.prompt)
        usage = common_pb2.Usage(prompt_tokens=tokens, total_tokens=tokens)
        return images_pb2.GenerateImagesResponse(created=int(time.time()), images=images, usage=usage)

    async def StreamImages(
        self, request, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[images_pb2.ImageStreamEvent]:
        self._check(request)
        tokens = prompt_tokens(request.prompt)
        for index, spec in enumerate(image_specs(request)):
            partial_index = 0
            async with aclosing(self._render(spec)) as steps:
                async for step in steps:
                    event = images_pb2.ImageStreamEvent(
                        index=index, partial=not step.final, image=await self._encoded(request, step)
                    )
                    if step.final:
                        # The prompt is read once per request: its tokens count on the first image only.
                        counted = tokens if index == 0 else 0
                        event.usage.CopyFrom(common_pb2.Usage(prompt_tokens=counted, total_tokens=counted))
                    else:
                        event.partial_image_index = partial_index
                        partial_index += 1
                    yield event
