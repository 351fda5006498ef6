"""pocketsphinx in Triton's Python backend, in TensorRT-LLM's Whisper layout (``whisper_bls``).

In: FP32 ``WAV`` [batch, samples] (16 kHz mono in [-1, 1]), optional INT32 ``WAV_LENS`` [batch, 1]
(how many samples of each row are audio; the rest is padding) and BYTES ``TEXT_PREFIX`` [batch, 1]
(Whisper's decoder prompt, e.g. ``<|startoftranscript|><|en|><|transcribe|><|notimestamps|>``,
perhaps after ``<|startofprev|>`` and a prompt; empty: that default). Out: BYTES ``TRANSCRIPTS``
[batch, 1], the plain text of each row (no special tokens, no timestamps: the layout has none).

The recognition is Modelplex's packaged local engine (modelplex_transcription's pocketsphinx
adapter: pocketsphinx's bundled en-us model, its endpointer cutting a window into utterances),
imported from the model's execution environment, so a window is recognised as the local engine
recognises it. It is no Whisper: it transcribes English only and cannot translate, so a prefix
asking for another language or for ``<|translate|>`` fails its request alone, in-band, as
INVALID_ARG (as does audio past Whisper's 30-second window or lengths that do not fit the rows),
each message starting with the input's name. A prompt (``<|startofprev|>``) is accepted and unused.
"""

import asyncio
import io
import re
import wave

import numpy as np
import triton_python_backend_utils as pb_utils

SAMPLE_RATE = 16000
WINDOW_SECONDS = 30  # Whisper's receptive field: a client cuts longer audio into windows
START = "<|startoftranscript|>"
DEFAULT_PREFIX = START + "<|en|><|transcribe|><|notimestamps|>"  # what whisper_bls assumes when empty
TOKEN = re.compile(r"<\|([^|>]*)\|>")
# Task and timestamp tokens after <|startoftranscript|>; any other token names a language.
TASKS = {"transcribe", "translate", "notimestamps", "nocaptions", "nospeech"}


class Refused(Exception):
    """A client's mistake: its request fails alone with INVALID_ARG."""


class TritonPythonModel:
    def initialize(self, args):
        from modelplex.v1 import transcription_pb2
        from modelplex_transcription.adapters.pocketsphinx import PocketsphinxEngine
        from modelplex_transcription.decode import AudioSource, Limits
        from modelplex_transcription.settings import PocketsphinxSettings

        # One decoder: one instance recognises one window at a time (more instances, more at once).
        self._engine = PocketsphinxEngine(PocketsphinxSettings(max_concurrency=1))
        self._source = AudioSource
        # A second over the window: rows were checked against it already; rounding in the header must not refuse.
        self._limits = Limits(max_audio_seconds=WINDOW_SECONDS + 1, decode_timeout_seconds=60)
        self._request = transcription_pb2.TranscribeRequest
        self._segment = transcription_pb2.TranscriptSegment
        # The engine is asyncio-based; this instance drives it on a loop of its own.
        self._loop = asyncio.new_event_loop()

    def execute(self, requests):
        # Dynamic batching hands over several requests at once: each is answered (or refused) alone.
        return [self._answer(request) for request in requests]

    def _answer(self, request):
        try:
            texts = [self._loop.run_until_complete(self._transcribe(pcm)) for pcm in self._rows(request)]
        except Refused as exc:
            return _error(str(exc), pb_utils.TritonError.INVALID_ARG)
        except Exception as exc:  # the engine failed: the server's fault, not the client's
            pb_utils.Logger.log_error(f"whisper_bls: recognition failed: {exc!r}")
            return _error(f"pocketsphinx failed: {exc}", pb_utils.TritonError.INTERNAL)
        transcripts = np.array([[text.encode("utf-8")] for text in texts], dtype=np.object_)
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("TRANSCRIPTS", transcripts)])

    def _rows(self, request):
        """Each row's audio as 16-bit PCM, after checking its prefix and length."""
        wav = pb_utils.get_input_tensor_by_name(request, "WAV").as_numpy()
        prefixes = pb_utils.get_input_tensor_by_name(request, "TEXT_PREFIX").as_numpy().reshape(-1)
        lens = pb_utils.get_input_tensor_by_name(request, "WAV_LENS")  # optional: whole rows
        lengths = lens.as_numpy().reshape(-1) if lens is not None else np.full(len(wav), wav.shape[1])
        if not len(prefixes) == len(lengths) == len(wav):
            raise Refused(f"TEXT_PREFIX: {len(prefixes)} rows and WAV_LENS {len(lengths)} for WAV's {len(wav)}")
        rows = []
        for row, prefix, length in zip(wav, prefixes, lengths, strict=True):
            _check_prefix(prefix)
            if not 0 <= length <= len(row):
                raise Refused(f"WAV_LENS: {length} samples, but the row holds {len(row)}")
            if length > WINDOW_SECONDS * SAMPLE_RATE:
                raise Refused(f"WAV: {length / SAMPLE_RATE:.1f} s of audio; the window is {WINDOW_SECONDS} s")
            # The client's int16 / 32768 back to int16 exactly: the samples the local engine would see.
            rows.append(np.clip(np.round(row[:length] * 32768.0), -32768, 32767).astype(np.int16))
        return rows

    async def _transcribe(self, pcm):
        if not len(pcm):
            return ""
        # The engine takes a file (it decodes and endpoints as it goes): the window as a WAV file.
        audio = self._source(_wav_file(pcm), "window.wav", self._limits)
        texts = [
            event.text
            async for event in self._engine.transcribe(self._request(), audio)
            if isinstance(event, self._segment)
        ]
        return "".join(texts).strip()  # segments after the first begin with their separating space

    def finalize(self):
        self._loop.run_until_complete(self._engine.close())
        self._loop.close()


def _check_prefix(value):
    try:
        prefix = (value.decode("utf-8") if isinstance(value, bytes) else str(value)) or DEFAULT_PREFIX
    except UnicodeDecodeError:
        raise Refused("TEXT_PREFIX: is not UTF-8") from None
    if START not in prefix:
        raise Refused(f"TEXT_PREFIX: no {START} in {prefix[:200]!r}")
    # What comes before <|startoftranscript|> is the previous text (a prompt): not used here.
    for token in TOKEN.findall(prefix.split(START, 1)[1]):
        if token == "translate":
            raise Refused("TEXT_PREFIX: <|translate|>: this model transcribes; it cannot translate")
        if token not in TASKS and token != "en":
            raise Refused(f"TEXT_PREFIX: language <|{token}|>: this model transcribes English (en) only")


def _wav_file(pcm):
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(pcm.astype("<i2").tobytes())
    return out.getvalue()


def _error(message, code):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
