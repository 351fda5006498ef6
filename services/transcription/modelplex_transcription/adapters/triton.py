"""engine=triton: Whisper on Triton (or any KServe v2 / Open Inference Protocol server) over gRPC with
``tritonclient.grpc.aio``.

Layout (TensorRT-LLM's ``whisper_bls``; tensor names are settings): FP32 ``WAV`` [1, samples] at
16 kHz with INT32 ``WAV_LENS`` [1, 1] and BYTES ``TEXT_PREFIX`` [1, 1] (Whisper's task tokens:
language, transcribe/translate, no timestamps; a prompt goes before them as ``<|startofprev|>``) in,
BYTES ``TRANSCRIPTS`` [1, 1] out (without a batch dimension, ``triton_batched`` false: [samples],
[1], [1] and [1]). Whisper sees 30 seconds at a time, so the file is cut into ``WINDOW_SECONDS``
windows, each one call and one segment (timed by its window), yielded as it comes back: a long file
streams window by window. The layout carries no timings finer than that: no word timestamps.

The transcript's language is the one asked for, else the model's only one (``languages``), else
unknown (""): the layout does not say what Whisper detected. A refusal names ``language`` when the
model's message begins with the prefix input's name (the language is what a client chooses in it),
else ``file``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import numpy as np
import tritonclient.grpc.aio as triton
from tritonclient.utils import InferenceServerException

from modelplex.v1 import transcription_pb2 as pb
from modelplex_kit.errors import ServiceError, unavailable
from modelplex_kit.kserve_v2 import upstream_error
from modelplex_kit.pools.triton import TritonPool
from modelplex_transcription.adapters.upstream import Decoding, upstream_capabilities
from modelplex_transcription.decode import SAMPLE_RATE, AudioSource
from modelplex_transcription.engine import EngineEvent, Finished
from modelplex_transcription.settings import UpstreamSettings

WINDOW_SECONDS = 30  # Whisper's receptive field


def task_prefix(request: pb.TranscribeRequest) -> str:
    language = f"<|{request.language.lower()}|>" if request.language else ""
    task = "<|translate|>" if request.translate else "<|transcribe|>"
    previous = f"<|startofprev|> {request.prompt.strip()}" if request.prompt.strip() else ""
    return f"{previous}<|startoftranscript|>{language}{task}<|notimestamps|>"


class TritonEngine:
    def __init__(self, settings: UpstreamSettings) -> None:
        if not settings.upstream_url or not settings.upstream_model:
            raise ValueError("engine=triton needs MODELPLEX_TRANSCRIPTION_UPSTREAM_URL (host:port) and _UPSTREAM_MODEL")
        self._pool = TritonPool("transcription", settings, settings.upstream_model)
        self._settings = settings
        self._decoding = Decoding(settings, "triton-decode")
        # One transcript per window: no word timings whatever the settings say.
        self.capabilities = upstream_capabilities(settings)
        self.capabilities.word_timestamps = False

    async def transcribe(
        self, request: pb.TranscribeRequest, audio: AudioSource, *, incremental: bool = False
    ) -> AsyncIterator[EngineEvent]:
        samples = await self._decoding.samples(audio)
        prefix = task_prefix(request)
        window = WINDOW_SECONDS * SAMPLE_RATE
        index = 0
        for offset in range(0, len(samples), window):
            text = (await self._infer(samples[offset : offset + window], prefix)).strip()
            if not text:
                continue
            start, end = offset / SAMPLE_RATE, min(offset + window, len(samples)) / SAMPLE_RATE
            yield pb.TranscriptSegment(
                id=index, seek=offset // 160, start=start, end=end, text=(" " if index else "") + text
            )
            index += 1
        yield Finished(language=self._language(request), duration_seconds=audio.seconds)

    def _language(self, request: pb.TranscribeRequest) -> str:
        # An empty language reads as "not English" at the edge, which would send an English-only
        # model's transcript to the translation model.
        languages = self._settings.language_list()
        return request.language.lower() or (languages[0] if len(languages) == 1 else "")

    def inputs(self, pcm: np.ndarray, prefix: str) -> list[triton.InferInput]:
        """One window's input tensors: [1, ...] each with a batch dimension, else without."""
        s = self._settings

        def row(values: np.ndarray) -> np.ndarray:
            return values.reshape(1, -1) if s.triton_batched else values.reshape(-1)

        inputs = [_tensor(s.triton_audio_input, row(pcm.astype(np.float32) / 32768.0), "FP32")]
        if s.triton_lengths_input:
            inputs.append(_tensor(s.triton_lengths_input, row(np.array([len(pcm)], dtype=np.int32)), "INT32"))
        if s.triton_prefix_input:
            inputs.append(_tensor(s.triton_prefix_input, row(np.array([prefix.encode()], dtype=np.object_)), "BYTES"))
        return inputs

    async def _infer(self, pcm: np.ndarray, prefix: str) -> str:
        s = self._settings
        inputs = self.inputs(pcm, prefix)

        async def send(client: triton.InferenceServerClient):
            try:
                return await client.infer(
                    s.upstream_model,
                    inputs,
                    outputs=[triton.InferRequestedOutput(s.triton_text_output)],
                    client_timeout=s.upstream_timeout_seconds,
                )
            except InferenceServerException as exc:
                raise self._failure(exc) from exc

        result = await self._pool.call(send)
        texts = result.as_numpy(s.triton_text_output)
        if texts is None or texts.size != 1:
            raise unavailable("The model server's answer holds no transcript.")
        value = texts.reshape(-1)[0]
        return value.decode() if isinstance(value, bytes) else str(value)

    def _failure(self, error: InferenceServerException) -> ServiceError:
        prefix = self._settings.triton_prefix_input
        param = "language" if prefix and str(error.message()).startswith(f"{prefix}:") else "file"
        return upstream_error(error, self._settings.upstream_model, param)

    async def ready(self) -> bool:
        return await self._pool.ready()

    async def close(self) -> None:
        await self._pool.close()
        self._decoding.close()


def _tensor(name: str, data: np.ndarray, datatype: str) -> triton.InferInput:
    tensor = triton.InferInput(name, list(data.shape), datatype)
    tensor.set_data_from_numpy(data)
    return tensor
