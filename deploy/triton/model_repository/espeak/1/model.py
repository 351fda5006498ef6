"""espeak-ng in Triton's Python backend as a decoupled (streaming) TTS model.

BYTES ``text`` [1], BYTES ``voice`` [1] and optional FP32 ``speed`` [1] in; INT16 ``audio``
[samples] out, mono at espeak-ng's 22050 Hz. Each request is answered by a stream of responses,
one per piece of audio espeak-ng hands over while it speaks (about 100 ms), the last one flagged
final; a request whose client has gone (cancelled) stops espeak-ng at its next piece.

The synthesis is Modelplex's packaged local engine (modelplex_speech's espeak adapter: espeak-ng
from the espeakng-loader wheel), imported from the model's execution environment, so it sounds
as the local engine does; a speed beyond espeak-ng's own range is finished by FFmpeg's atempo
there too. A client's mistake (empty or non-UTF-8 text, an unknown voice, a speed out of range)
fails its request alone, in-band, as INVALID_ARG, its message starting with the input's name.
"""

import asyncio

import numpy as np
import triton_python_backend_utils as pb_utils

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
MIN_SPEED, MAX_SPEED = 0.25, 4.0  # OpenAI's `speed` range
MAX_CHARS = 4096  # OpenAI's `input` limit; the speech service sends one sentence at a time anyway


class Refused(Exception):
    """A client's mistake: its request fails alone with INVALID_ARG."""


class TritonPythonModel:
    def initialize(self, args):
        from modelplex_speech.adapters.espeak import EspeakEngine
        from modelplex_speech.settings import EspeakSettings

        settings = EspeakSettings()
        self._engine = EspeakEngine(settings)
        self._voices = settings.voice_list()
        # The engine is asyncio-based; this instance drives it on a loop of its own, one synthesis
        # at a time (espeak-ng has one synthesiser per process; more instances speak in parallel).
        self._loop = asyncio.new_event_loop()

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                text, voice, speed = self._read(request)
                self._loop.run_until_complete(self._stream(sender, text, voice, speed))
            except Refused as exc:
                sender.send(_error(str(exc), pb_utils.TritonError.INVALID_ARG), flags=FINAL)
            except Exception as exc:  # espeak-ng itself failed: the server's fault, not the client's
                pb_utils.Logger.log_error(f"espeak: synthesis failed: {exc!r}")
                # A stream's error reaches the client as text alone (no status code): "unavailable"
                # is the wording by which clients tell a server's failure from a refusal.
                sender.send(_error(f"espeak-ng unavailable: {exc}", pb_utils.TritonError.INTERNAL), flags=FINAL)
        return None  # decoupled: every response went through the request's sender

    def _read(self, request):
        text = _string(request, "text")
        if not text.strip():
            raise Refused("text: is empty")
        if len(text) > MAX_CHARS:
            raise Refused(f"text: {len(text)} characters; this model takes at most {MAX_CHARS}")
        voice = _string(request, "voice")
        if voice not in self._voices:
            raise Refused(f"voice: {voice!r} is not one of this model's voices ({', '.join(self._voices)})")
        speed = 1.0
        tensor = pb_utils.get_input_tensor_by_name(request, "speed")
        if tensor is not None:  # optional: absent means espeak-ng's normal rate
            speed = float(tensor.as_numpy().reshape(-1)[0])
            if not MIN_SPEED <= speed <= MAX_SPEED:
                raise Refused(f"speed: {speed:g} is outside {MIN_SPEED} to {MAX_SPEED}")
        return text, voice, speed

    async def _stream(self, sender, text, voice, speed):
        # One piece is held back so that the last one carries the final flag: the client learns
        # the stream is over from the last audio, without waiting for an empty final response.
        held = None
        pieces = self._engine.synthesize(text, voice=voice, speed=speed, instructions="")
        try:
            async for pcm in pieces:
                if sender.is_cancelled():
                    sender.send(flags=FINAL)  # closes the cancelled request; espeak-ng stops below
                    return
                if held is not None:
                    sender.send(_audio(held))
                held = pcm
        finally:
            await pieces.aclose()  # a synthesis left early is aborted at espeak-ng's next callback
        sender.send(_audio(held if held is not None else np.zeros(0, np.int16)), flags=FINAL)

    def finalize(self):
        self._loop.run_until_complete(self._engine.close())
        self._loop.close()


def _string(request, name):
    value = pb_utils.get_input_tensor_by_name(request, name).as_numpy().reshape(-1)[0]
    try:
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)
    except UnicodeDecodeError:
        raise Refused(f"{name}: is not UTF-8") from None


def _audio(pcm):
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("audio", pcm.astype(np.int16, copy=False))])


def _error(message, code):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
