"""engine=triton: Whisper on Triton (or any KServe v2 / Open Inference Protocol server) over gRPC with
``tritonclient.grpc.aio``.

Layout (TensorRT-LLM's ``whisper_bls``; tensor names are settings): FP32 ``WAV`` [1, samples] at
16 kHz with INT32 ``WAV_LENS`` [1, 1] and BYTES ``TEXT_PREFIX`` [1, 1] (Whisper's task tokens:
language, transcribe/translate, no timestamps; a prompt goes before them as ``<|startofprev|>``) in,
BYTES ``TRANSCRIPTS`` [1, 1] out. Whisper sees 30 seconds at a time, so the file is cut into
``WINDOW_SECONDS`` windows, each one call and one segment (timed by its window), yielded as it
comes back: a long file streams window by window.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import numpy as np
import tritonclient.grpc.aio as triton

from modelplex.v1 import transcription_pb2 as pb
from modelplex_kit.errors import unavailable
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
            raise ValueError(
                "engine=triton needs MODELPLEX_TRANSCRIPTION_UPSTREAM_URL (host:port) and _UPSTREAM_MODEL"
            )
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
        yield Finished(language=request.language, duration_seconds=audio.seconds)

    async def _infer(self, pcm: np.ndarray, prefix: str) -> str:
        s = self._settings
        wav = (pcm.astype(np.float32) / 32768.0).reshape((1, -1) if s.triton_batched else (-1,))
        inputs = [_tensor(s.triton_audio_input, wav, "FP32")]
        if s.triton_lengths_input:
            inputs.append(_tensor(s.triton_lengths_input, np.array([[len(pcm)]], dtype=np.int32), "INT32"))
        if s.triton_prefix_input:
            inputs.append(_tensor(s.triton_prefix_input, np.array([[prefix.encode()]], dtype=np.object_), "BYTES"))
        result = await self._pool.infer(
            s.upstream_model,
            inputs,
            outputs=[triton.InferRequestedOutput(s.triton_text_output)],
            client_timeout=s.upstream_timeout_seconds,
            param="file",
        )
        texts = result.as_numpy(s.triton_text_output)
        if texts is None or texts.size != 1:
            raise unavailable("The model server's answer holds no transcript.")
        value = texts.reshape(-1)[0]
        return value.decode() if isinstance(value, bytes) else str(value)

    async def ready(self) -> bool:
        return await self._pool.ready()

    async def close(self) -> None:
        await self._pool.close()
        self._decoding.close()


def _tensor(name: str, data: np.ndarray, datatype: str) -> triton.InferInput:
    tensor = triton.InferInput(name, list(data.shape), datatype)
    tensor.set_data_from_numpy(data)
    return tensor

