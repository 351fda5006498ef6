"""triton: a text-to-image pipeline served by Triton (or any KServe v2 gRPC server).

The served model's contract (one request per image):

    inputs   prompt BYTES[1], width INT32[1], height INT32[1], seed INT64[1]; and quality,
             negative_prompt, style, background BYTES[1], partial_images INT32[1] where the model
             declares them (all of them to a server without Triton's model config, e.g. KServe's)
    output   image: UINT8[H, W, 3|4] (pixels) or BYTES[1] (an encoded png/jpeg/webp)

The model's Triton config decides how it is called (read once, ``Layout``):

- ``max_batch_size`` > 0 (a batching pipeline, NVIDIA's Stable Diffusion layout): every input gets
  a leading batch dimension of 1 ([1, 1]), and the image comes back as [1, H, W, C];
- ``decoupled`` (partial images): ModelStreamInfer, with ``partial_images`` sent; the model answers
  with that many coarser images, then the finished one (flagged ``triton_final_response``). Triton
  refuses ModelInfer for such a model. Any other model answers once over ModelInfer, and so streams
  no partial image (the engine contract's "at most").

A request the model refuses (INVALID_ARGUMENT, or a decoupled model's in-band error) is a 400 whose
``param`` is the request field behind the input its message starts with ("width: ..." -> size).
Both output forms are accepted; the backend re-encodes to the requested format.
"""

from __future__ import annotations

import io
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from PIL import Image, UnidentifiedImageError
from tritonclient.grpc.aio import InferenceServerClient, InferResult
from tritonclient.utils import InferenceServerException

from modelplex_images.engine import ImageSpec, Rendered
from modelplex_images.settings import ImagesSettings
from modelplex_kit.errors import ServiceError, invalid
from modelplex_kit.kserve_v2 import stream_end, tensor, upstream_error
from modelplex_kit.pools.triton import TritonPool

OUTPUT = "image"
# Optional inputs: sent only where the model declares them (when its config says).
OPTIONAL = ("negative_prompt", "quality", "style", "background", "partial_images")
# The request field behind each input, for the param of a refusal.
PARAMS = {
    "prompt": "prompt",
    "negative_prompt": "negative_prompt",
    "width": "size",
    "height": "size",
    "seed": "seed",
    "quality": "quality",
    "style": "style",
    "background": "background",
    "partial_images": "partial_images",
}
# "width: ..." or "[request id: x] width: ...": the input a model's refusal names first.
_NAMED_INPUT = re.compile(r"^(?:\[request id: [^\]]*\]\s*)?(\w+):")


@dataclass(frozen=True, slots=True)
class Layout:
    """How the served model is called, from its Triton model config."""

    batched: bool = False  # max_batch_size > 0: inputs [1, 1], the image [1, H, W, C]
    decoupled: bool = False  # ModelStreamInfer, partial images first
    inputs: frozenset[str] | None = None  # declared inputs; None: unknown (no model config), send all


def signed_int64(value: int) -> int:
    """``value`` as INT64 carries it: unchanged in range (so the model draws what the procedural engine
    draws for the same seed, negative ones included), wrapped only beyond it."""
    return (value + 2**63) % 2**64 - 2**63


def image_inputs(spec: ImageSpec, layout: Layout = Layout()) -> list:
    values: dict[str, tuple[Any, Any]] = {
        "prompt": (spec.prompt.encode(), np.object_),
        "width": (spec.width, np.int32),
        "height": (spec.height, np.int32),
        "seed": (signed_int64(spec.seed), np.int64),
        "quality": (spec.quality.encode(), np.object_),
        "negative_prompt": (spec.negative_prompt.encode(), np.object_),
        "style": (spec.style.encode(), np.object_),
        "background": (spec.background.encode(), np.object_),
        "partial_images": (spec.partial_images if layout.decoupled else 0, np.int32),
    }
    wanted = [n for n in values if n not in OPTIONAL or layout.inputs is None or n in layout.inputs]
    shape = (1, 1) if layout.batched else (1,)
    return [tensor(n, np.full(shape, values[n][0], dtype=values[n][1]), values[n][1]) for n in wanted]


def to_image(output: np.ndarray | None, spec: ImageSpec, model: str) -> Image.Image:
    if output is not None and output.ndim == 4 and output.shape[0] == 1:
        output = output[0]  # a batching model's [1, H, W, C]
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


def refused_param(error: Exception) -> str | None:
    """The request field a model's refusal names (its message starts with the input's name)."""
    message = error.message() if isinstance(error, InferenceServerException) else str(error)
    named = _NAMED_INPUT.match(message or "")
    return PARAMS.get(named[1]) if named else None


class TritonImagesEngine:
    # What a decoupled model streams; a model answering once yields none (the contract's "at most").
    max_partial_images = 3

    def __init__(self, settings: ImagesSettings) -> None:
        upstream = settings.triton()
        if not upstream.upstream_url or not upstream.upstream_model:
            raise SystemExit("images: engine triton needs upstream_url and upstream_model")
        self._model, self._timeout = upstream.upstream_model, upstream.upstream_timeout_seconds
        self._pool = TritonPool("images", settings, self._model)
        self._layout: Layout | None = None

    async def render(self, spec: ImageSpec) -> AsyncIterator[Rendered]:
        layout = await self.layout()
        if spec.background == "transparent" and layout.inputs is not None and "background" not in layout.inputs:
            raise invalid(f"Model `{self._model}` cannot draw a transparent background.", "background")
        inputs = image_inputs(spec, layout)
        if not layout.decoupled:
            result = await self._pool.call(lambda client: self._infer_on(client, inputs))
            yield Rendered(to_image(result.as_numpy(OUTPUT), spec, self._model), final=True)
            return
        partials = min(spec.partial_images, self.max_partial_images)
        async for step in self._pool.stream(lambda client: self._stream_on(client, inputs, spec, partials)):
            yield step

    async def layout(self) -> Layout:
        """The model's layout, asked once (not kept while the model cannot be asked: it may be loading)."""
        if self._layout is None:
            self._layout = await self._pool.call(self._read_layout)
        return self._layout

    async def _read_layout(self, client: InferenceServerClient) -> Layout:
        try:
            reply = await client.get_model_config(self._model, client_timeout=self._timeout)
        except InferenceServerException as exc:
            if "UNIMPLEMENTED" in str(exc.status() or ""):
                return Layout()  # no model config (KServe's ModelServer): one answer, every input
            raise upstream_error(exc, self._model) from exc
        config = reply.config
        return Layout(
            batched=config.max_batch_size > 0,
            decoupled=config.model_transaction_policy.decoupled,
            inputs=frozenset(i.name for i in config.input),
        )

    async def _infer_on(self, client: InferenceServerClient, inputs: list) -> InferResult:
        try:
            return await client.infer(self._model, inputs, client_timeout=self._timeout)
        except InferenceServerException as exc:
            raise upstream_error(exc, self._model, refused_param(exc)) from exc

    async def _stream_on(
        self, client: InferenceServerClient, inputs: list, spec: ImageSpec, partials: int
    ) -> AsyncIterator[Rendered]:
        async def one_request() -> AsyncIterator[dict[str, Any]]:
            yield {"model_name": self._model, "inputs": inputs, "request_id": uuid.uuid4().hex}

        responses = client.stream_infer(inputs_iterator=one_request(), stream_timeout=self._timeout)
        images = 0
        try:
            async for result, error in responses:
                if error is not None:  # in-band, and final: the request is over
                    await stream_end(responses)
                    raise upstream_error(error, self._model, refused_param(error))
                final = _is_final(result)
                if result.as_numpy(OUTPUT) is not None:
                    images += 1
                    # The last image is the finished one: flagged final, or the one after the partials.
                    done = final or images > partials
                    if done:  # before the last yield: the consumer may close this generator right after it
                        await stream_end(responses)  # cancelling before Triton ends it can wedge the model
                    yield Rendered(to_image(result.as_numpy(OUTPUT), spec, self._model), final=done)
                    if done:
                        return
                elif final:
                    await stream_end(responses)
                    break
        except grpc.aio.AioRpcError as exc:  # the stream itself failed: connection, deadline, server
            raise upstream_error(exc, self._model) from exc
        finally:
            responses.cancel()  # ends the call; when the consumer left early, Triton cancels the request
        raise ServiceError(grpc.StatusCode.INTERNAL, f"Model `{self._model}` finished without a final image.")

    async def ready(self) -> bool:
        return await self._pool.ready()

    async def close(self) -> None:
        await self._pool.close()


def _is_final(result: InferResult) -> bool:
    parameters = result.get_response().parameters
    return "triton_final_response" in parameters and parameters["triton_final_response"].bool_param
