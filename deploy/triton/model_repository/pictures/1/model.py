"""pictures: Modelplex's procedural image renderer in Triton's Python backend, laid out as a
text-to-image diffusion pipeline is served.

A stand-in renderer, NOT a diffusion model: no text-to-image weights run on a CPU box, so the
pictures come from the images backend's packaged local engine (modelplex_images.procedural), which
draws a deterministic composition from the prompt's words and the seed. Same inputs, same pixels:
the very pixels the backend's own ``procedural`` engine draws.

Per request (one row; the server batches up to 4 requests, so each tensor is [1, 1]):

    inputs   prompt BYTES, width INT32, height INT32, seed INT64; optional negative_prompt,
             quality, style, background BYTES and partial_images INT32 (0 to 3)
    output   image UINT8 [1, H, W, 3] (RGB), or [1, H, W, 4] (RGBA) for a transparent background

Decoupled: with ``partial_images`` N, N coarser steps are sent first, then the finished image, the
response flagged final. A request the model cannot serve fails alone, as INVALID_ARG, with a message
that starts with the input's name ("width: ..."). A cancelled request stops between steps.
"""

import numpy as np
import triton_python_backend_utils as pb_utils

# What the renderer (and OpenAI's API) knows; anything else is the caller's mistake.
QUALITIES = ("auto", "low", "medium", "high", "standard", "hd")
STYLES = ("", "vivid", "natural")
BACKGROUNDS = ("auto", "opaque", "transparent")
MAX_PARTIAL_IMAGES = 3
# A pipeline's latents are 1/8 of the picture: its sides are multiples of 8 within what it was built for.
SIDE_STEP, MAX_SIDE = 8, 4096
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class BadInput(ValueError):
    """A request this model refuses; the message starts with the input's name."""


class TritonPythonModel:
    def initialize(self, args):
        # Imported here, from the model's execution environment (the project's packages).
        from modelplex_images.engine import ImageSpec
        from modelplex_images.procedural import render_step

        self._spec, self._render_step = ImageSpec, render_step

    def execute(self, requests):
        # Decoupled: every answer goes through the request's response sender; execute returns None.
        # The batch's requests are rendered one after another: each may differ in size and steps.
        for request in requests:
            self._serve(request)
        return None

    def _serve(self, request):
        sender = request.get_response_sender()
        try:
            spec = self._parse(request)
        except BadInput as exc:
            sender.send(_error(str(exc), pb_utils.TritonError.INVALID_ARG), flags=FINAL)
            return
        steps = spec.partial_images + 1
        for step in range(steps):
            if sender.is_cancelled():  # the client went away: stop drawing for nobody
                sender.send(_error("cancelled", pb_utils.TritonError.CANCELLED), flags=FINAL)
                return
            try:
                image = self._render_step(spec, step, steps)
            except Exception as exc:  # a renderer fault: this request fails, the model serves on
                sender.send(_error(f"rendering failed: {exc}", pb_utils.TritonError.INTERNAL), flags=FINAL)
                return
            response = pb_utils.InferenceResponse(output_tensors=[_pixels(image)])
            sender.send(response, flags=FINAL if step == steps - 1 else 0)

    def _parse(self, request):
        prompt = _text(request, "prompt")
        if not prompt.strip():
            raise BadInput("prompt: must not be empty")
        width, height = _int(request, "width"), _int(request, "height")
        for name, side in (("width", width), ("height", height)):
            if not (SIDE_STEP <= side <= MAX_SIDE and side % SIDE_STEP == 0):
                raise BadInput(f"{name}: {side} is not a multiple of {SIDE_STEP} between {SIDE_STEP} and {MAX_SIDE}")
        partial_images = _int(request, "partial_images", 0)
        if not 0 <= partial_images <= MAX_PARTIAL_IMAGES:
            raise BadInput(f"partial_images: must be between 0 and {MAX_PARTIAL_IMAGES}")
        return self._spec(
            prompt=prompt,
            width=width,
            height=height,
            seed=_int(request, "seed"),
            quality=_choice(request, "quality", QUALITIES, "auto"),
            style=_choice(request, "style", STYLES, ""),
            background=_choice(request, "background", BACKGROUNDS, "auto"),
            negative_prompt=_text(request, "negative_prompt", ""),
            partial_images=partial_images,
        )


def _value(request, name):
    """The one element of an input ([1, 1] batched, [1] from any other shape), or None when absent."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    values = tensor.as_numpy().reshape(-1)
    if values.size != 1:
        raise BadInput(f"{name}: one value per request, got {values.size}")
    return values[0]


def _text(request, name, default=None):
    value = _value(request, name)
    if value is None:
        if default is None:
            raise BadInput(f"{name}: missing")
        return default
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise BadInput(f"{name}: not UTF-8") from None


def _int(request, name, default=None):
    value = _value(request, name)
    if value is None:
        if default is None:
            raise BadInput(f"{name}: missing")
        return default
    return int(value)


def _choice(request, name, known, default):
    value = _text(request, name, default) or default
    if value not in known:
        raise BadInput(f"{name}: {value!r} is not one of {', '.join(k for k in known if k)}")
    return value


def _pixels(image):
    # A leading batch dimension of 1: this response answers one row of the batch.
    return pb_utils.Tensor("image", np.ascontiguousarray(np.asarray(image, dtype=np.uint8)[None]))


def _error(message, code):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
