"""Images: ImageGenerationRequest -> GenerateImagesRequest, and results -> OpenAI's ImagesResponse / stream events."""

from __future__ import annotations

import base64
import time
from typing import Any

from modelplex.v1 import catalog_pb2, common_pb2, images_pb2
from modelplex_edge.admission import Consumption
from modelplex_edge.endpoints.images.protocol import ImageGenerationRequest
from modelplex_kit.errors import invalid
from modelplex_kit.modalities.images import parse_size, valid_sizes

# What OpenAI's ImagesResponse may report (gpt-image sizes; other sizes are dall-e's, reported without `size`).
_REPORTED_SIZES = {"1024x1024", "1024x1536", "1536x1024"}
# The quality an image was rendered at, as OpenAI names it.
_QUALITY = {"low": "low", "medium": "medium", "high": "high", "hd": "high", "standard": "medium", "auto": "medium"}


def meter(message: Any, used: Consumption) -> None:
    """Images are counted as units; prompt tokens as usage."""
    if isinstance(message, images_pb2.GenerateImagesResponse):
        used.units += len(message.images)
    elif isinstance(message, images_pb2.ImageStreamEvent) and not message.partial:
        used.units += 1
    else:
        return
    used.unit_kind = "images"
    if message.HasField("usage"):
        used.add_usage(message.usage)


def refusal(body: ImageGenerationRequest):
    """A request this edge refuses whatever the model: only b64_json is offered."""
    if body.response_format == "url":
        return invalid(
            "response_format 'url' is not supported: Modelplex does not host generated files. "
            "Use response_format 'b64_json' (the default), which returns the image in the response.",
            "response_format",
            code="unsupported_parameter",
        )
    return None


def _size(body: ImageGenerationRequest, caps: catalog_pb2.ImagesCapabilities) -> tuple[int, int]:
    size = body.size or "auto"
    if size == "auto":
        size = caps.sizes[0]
    try:
        return parse_size(size)
    except ValueError:
        raise invalid(
            f"Invalid size '{body.size}'. Supported sizes for this model: {', '.join(valid_sizes(caps))}.", "size"
        ) from None


def to_proto(
    body: ImageGenerationRequest, model: catalog_pb2.Model, meta: common_pb2.RequestMeta
) -> images_pb2.GenerateImagesRequest:
    width, height = _size(body, model.capabilities.images)
    request = images_pb2.GenerateImagesRequest(
        meta=meta,
        model=model.id,
        prompt=body.prompt,
        n=body.n or 1,
        width=width,
        height=height,
        quality=body.quality or "auto",
        style=body.style or "",
        output_format=body.output_format or "png",
        background=body.background or "auto",
        output_compression=100 if body.output_compression is None else body.output_compression,
        partial_images=body.partial_images or 0,
        moderation=body.moderation or "auto",
    )
    if body.seed is not None:
        request.seed = body.seed
    return request


def _settings(request: images_pb2.GenerateImagesRequest) -> dict[str, Any]:
    """The fields OpenAI echoes about how the images were made."""
    reported = {
        "output_format": request.output_format,
        "quality": _QUALITY[request.quality],
        "background": "transparent" if request.background == "transparent" else "opaque",
    }
    size = f"{request.width}x{request.height}"
    if size in _REPORTED_SIZES:
        reported["size"] = size
    return reported


def usage(usage: common_pb2.Usage) -> dict[str, Any]:
    # A renderer has no image tokens: output is 0, input is the prompt's text tokens.
    return {
        "input_tokens": usage.prompt_tokens,
        "output_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "input_tokens_details": {"text_tokens": usage.prompt_tokens, "image_tokens": 0},
    }


def _datum(image: images_pb2.GeneratedImage) -> dict[str, Any]:
    datum = {"b64_json": base64.b64encode(image.data).decode()}
    if image.revised_prompt:
        datum["revised_prompt"] = image.revised_prompt
    return datum


def from_proto(response: images_pb2.GenerateImagesResponse, request: images_pb2.GenerateImagesRequest) -> dict:
    return {
        "created": response.created,
        "data": [_datum(image) for image in response.images],
        **_settings(request),
        "usage": usage(response.usage),
    }


def stream_event(event: images_pb2.ImageStreamEvent, request: images_pb2.GenerateImagesRequest) -> tuple[str, dict]:
    """(SSE event name, data) for one backend stream event, as OpenAI streams image generation."""
    settings = _settings(request)
    settings.setdefault("size", "auto")  # required in stream events; "auto" where the size has no name there
    data = {"b64_json": base64.b64encode(event.image.data).decode(), "created_at": int(time.time()), **settings}
    if event.partial:
        name = "image_generation.partial_image"
        data["partial_image_index"] = event.partial_image_index
    else:
        name = "image_generation.completed"
        data["usage"] = usage(event.usage)
    return name, {"type": name, **data}
