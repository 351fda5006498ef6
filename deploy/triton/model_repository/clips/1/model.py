"""clips: Modelplex's procedural video renderer in Triton's Python backend, laid out as a
text-to-video model is served.

A stand-in renderer, NOT a video model: no text-to-video weights run on a CPU box, so the frames
come from the videos backend's packaged local engine (modelplex_videos.procedural: shapes drifting
on paths drawn from the prompt's words and the seed), encoded to H.264 MP4 with PyAV exactly as the
backend's own ``procedural`` engine encodes them. Same inputs, same bytes.

Per request (one clip, never batched):

    inputs   prompt BYTES[1], width INT32[1], height INT32[1], seconds INT32[1], fps INT32[1],
             seed INT64[1]; optional input_reference BYTES[1] (the first frame's guide image)
    outputs  progress FP32[1] in one response per second rendered, then video BYTES[1] (the MP4)
             in the last response, flagged final

A request the model cannot serve fails alone, as INVALID_ARG, with a message that starts with the
input's name ("width: ..."). A cancelled request (the job's worker went away) stops between seconds.
"""

import io

import numpy as np
import triton_python_backend_utils as pb_utils

# H.264 in yuv420p codes 16x16 macroblocks: sides are multiples of 16 up to what the model was built for.
SIDE_STEP, MAX_SIDE = 16, 4096
MAX_SECONDS, MAX_FPS = 60, 60
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class BadInput(ValueError):
    """A request this model refuses; the message starts with the input's name."""


class Cancelled(Exception):
    """The client cancelled the request."""


class TritonPythonModel:
    def initialize(self, args):
        # Imported here, from the model's execution environment (the project's packages).
        from modelplex_videos import media
        from modelplex_videos.engine import VideoSpec
        from modelplex_videos.procedural import FrameRenderer

        self._media, self._spec, self._renderer = media, VideoSpec, FrameRenderer

    def execute(self, requests):
        # Decoupled: every answer goes through the request's response sender; execute returns None.
        for request in requests:
            self._serve(request)
        return None

    def _serve(self, request):
        sender = request.get_response_sender()
        try:
            spec, fps = self._parse(request)
            video = self._render(spec, fps, sender)
        except BadInput as exc:
            sender.send(_error(str(exc), pb_utils.TritonError.INVALID_ARG), flags=FINAL)
        except Cancelled as exc:
            # Logged: a cancelled clip is a job deleted or a worker gone, worth seeing in the server's log.
            pb_utils.Logger.log_info(f"clips: cancelled after {exc} seconds")
            sender.send(_error("cancelled", pb_utils.TritonError.CANCELLED), flags=FINAL)
        except Exception as exc:  # a renderer or encoder fault: this request fails, the model serves on
            sender.send(_error(f"rendering failed: {exc}", pb_utils.TritonError.INTERNAL), flags=FINAL)
        else:
            clip = pb_utils.Tensor("video", np.array([video], dtype=np.object_))
            sender.send(pb_utils.InferenceResponse(output_tensors=[clip]), flags=FINAL)

    def _render(self, spec, fps, sender):
        """The MP4, rendered a second at a time: progress after each, and a cancelled request stops."""
        renderer = self._renderer(spec, fps)
        writer = self._media.Mp4Writer(spec.width, spec.height, fps)
        try:
            for start in range(0, renderer.frame_count, fps):
                if sender.is_cancelled():
                    raise Cancelled(f"{start // fps} of {spec.seconds}")
                end = min(start + fps, renderer.frame_count)
                writer.add(renderer.frame(i) for i in range(start, end))
                sender.send(_progress(end / renderer.frame_count))
            return writer.finish()
        except BaseException:
            writer.abandon()
            raise

    def _parse(self, request):
        prompt = _text(request, "prompt")
        if not prompt.strip():
            raise BadInput("prompt: must not be empty")
        width, height = _int(request, "width"), _int(request, "height")
        for name, side in (("width", width), ("height", height)):
            if not (SIDE_STEP <= side <= MAX_SIDE and side % SIDE_STEP == 0):
                raise BadInput(f"{name}: {side} is not a multiple of {SIDE_STEP} between {SIDE_STEP} and {MAX_SIDE}")
        seconds, fps = _int(request, "seconds"), _int(request, "fps")
        if not 1 <= seconds <= MAX_SECONDS:
            raise BadInput(f"seconds: must be between 1 and {MAX_SECONDS}")
        if not 1 <= fps <= MAX_FPS:
            raise BadInput(f"fps: must be between 1 and {MAX_FPS}")
        reference = _bytes(request, "input_reference")
        if reference:
            _check_image(reference)
        spec = self._spec(prompt, width, height, seconds, _int(request, "seed"), reference)
        return spec, fps


def _value(request, name):
    """The one element of an input, or None when absent."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    values = tensor.as_numpy().reshape(-1)
    if values.size != 1:
        raise BadInput(f"{name}: one value per request, got {values.size}")
    return values[0]


def _bytes(request, name):
    value = _value(request, name)
    return b"" if value is None else bytes(value)


def _text(request, name):
    value = _value(request, name)
    if value is None:
        raise BadInput(f"{name}: missing")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise BadInput(f"{name}: not UTF-8") from None


def _int(request, name):
    value = _value(request, name)
    if value is None:
        raise BadInput(f"{name}: missing")
    return int(value)


def _check_image(data):
    # Checked before any frame is drawn: a bad upload is the caller's mistake, not a renderer fault.
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise BadInput(f"input_reference: not a readable image ({exc})") from None


def _progress(fraction):
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("progress", np.array([fraction], np.float32))])


def _error(message, code):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
