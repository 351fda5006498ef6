"""engine=triton: a TTS model on Triton (or any KServe v2 / Open Inference Protocol server) over gRPC with
``tritonclient.grpc.aio``.

Layout (tensor names are settings): BYTES ``text`` [1], BYTES ``voice`` [1] (unless the model has
one voice) and FP32 ``speed`` [1] (when named) in; mono PCM ``audio`` [samples] out, INT16 or FP32,
at ``upstream_sample_rate``. A decoupled model (``model_transaction_policy.decoupled``) streams
several responses per request over ModelStreamInfer, each yielded as it arrives, until the one
flagged ``triton_final_response``; any other model answers once over ModelInfer (the servicer
already calls once per sentence, so audio still leaves sentence by sentence). A model without a
speed input gets FFmpeg's atempo here.

A refusal names the request field the model refused when its message begins with that input's
tensor name (``voice: 'x' is not one of this model's voices``: param ``voice``), else ``input``.
A decoupled model's failures arrive in-band on the stream, as text without Triton's status code.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
import tritonclient.grpc.aio as triton
from tritonclient.utils import InferenceServerException

from modelplex.v1 import catalog_pb2
from modelplex_kit.errors import ServiceError, unavailable
from modelplex_kit.kserve_v2 import stream_end, upstream_error
from modelplex_kit.pools.triton import TritonPool
from modelplex_speech.audio import Tempo
from modelplex_speech.settings import TritonSettings


class TritonEngine:
    def __init__(self, settings: TritonSettings) -> None:
        if not settings.upstream_url or not settings.upstream_model:
            raise ValueError("engine=triton needs MODELPLEX_SPEECH_UPSTREAM_URL (host:port) and _UPSTREAM_MODEL")
        self._pool = TritonPool("speech", settings, settings.upstream_model)
        self._settings = settings
        self._decoupled = settings.triton_decoupled
        self.sample_rate = settings.upstream_sample_rate
        self.capabilities = catalog_pb2.SpeechCapabilities(
            voices=settings.voice_list(), voice_aliases=settings.alias_map(), max_input_chars=settings.max_input_chars
        )

    async def synthesize(self, text: str, *, voice: str, speed: float, instructions: str) -> AsyncIterator[np.ndarray]:
        s = self._settings
        tempo = TempoChain(speed, self.sample_rate) if not s.triton_speed_input and abs(speed - 1.0) > 0.01 else None
        request = {
            "model_name": s.upstream_model,
            "inputs": self._inputs(text, voice, speed),
            "outputs": [triton.InferRequestedOutput(s.triton_audio_output)],
            "request_id": uuid.uuid4().hex,
        }
        chunks = self._stream(request) if await self._is_decoupled() else self._infer(request)
        async for pcm in chunks:
            if len(out := tempo.process(pcm) if tempo is not None else pcm):
                yield out
        if tempo is not None and len(tail := tempo.process(None)):
            yield tail

    def _inputs(self, text: str, voice: str, speed: float) -> list[triton.InferInput]:
        s = self._settings
        inputs = [_tensor(s.triton_text_input, np.array([text.encode()], dtype=np.object_), "BYTES")]
        if s.triton_voice_input:
            inputs.append(_tensor(s.triton_voice_input, np.array([voice.encode()], dtype=np.object_), "BYTES"))
        if s.triton_speed_input:
            inputs.append(_tensor(s.triton_speed_input, np.array([speed], dtype=np.float32), "FP32"))
        return inputs

    async def _is_decoupled(self) -> bool:
        """Asked once: Triton reports it in the model config; servers without ModelConfig (KServe) are not."""
        if self._decoupled is None:
            self._decoupled = await self._pool.call(self._config_is_decoupled)
        return self._decoupled

    async def _config_is_decoupled(self, client: triton.InferenceServerClient) -> bool:
        try:
            config = await client.get_model_config(
                self._settings.upstream_model, client_timeout=self._settings.upstream_timeout_seconds
            )
        except InferenceServerException as exc:
            if "UNIMPLEMENTED" not in (exc.status() or ""):
                raise self._failure(exc) from exc
            return False
        return config.config.model_transaction_policy.decoupled

    async def _infer(self, request: dict[str, Any]) -> AsyncIterator[np.ndarray]:
        timeout = self._settings.upstream_timeout_seconds

        async def send(client: triton.InferenceServerClient):
            try:
                return await client.infer(**request, client_timeout=timeout)
            except InferenceServerException as exc:
                raise self._failure(exc) from exc

        yield self._pcm(await self._pool.call(send))

    def _stream(self, request: dict[str, Any]) -> AsyncIterator[np.ndarray]:
        return self._pool.stream(lambda client: self._stream_on(client, request))

    async def _stream_on(
        self, client: triton.InferenceServerClient, request: dict[str, Any]
    ) -> AsyncIterator[np.ndarray]:
        async def one_request() -> AsyncIterator[dict[str, Any]]:
            yield request  # then half-close: Triton ends the stream after the last response

        responses = client.stream_infer(
            inputs_iterator=one_request(), stream_timeout=self._settings.upstream_timeout_seconds
        )
        try:
            async for result, error in responses:
                if error is not None:  # in-band, and final: the request is over
                    await stream_end(responses)
                    raise self._failure(error)
                if result.as_numpy(self._settings.triton_audio_output) is not None:
                    yield self._pcm(result)
                parameters = result.get_response().parameters
                if "triton_final_response" in parameters and parameters["triton_final_response"].bool_param:
                    await stream_end(responses)  # cancelling before Triton ends it can wedge the model
                    break
        except grpc.aio.AioRpcError as exc:
            raise unavailable("The speech model server is unreachable or failed; retry shortly.") from exc
        finally:
            responses.cancel()  # ends the call; when the consumer left early, Triton aborts the request

    def _failure(self, error: Exception) -> ServiceError:
        return upstream_error(error, self._settings.upstream_model, self._param(error))

    def _param(self, error: Exception) -> str:
        """The request field a refusal is about: the one whose input the model's message begins with."""
        s = self._settings
        message = str(error.message() if isinstance(error, InferenceServerException) else error)
        fields = ((s.triton_voice_input, "voice"), (s.triton_speed_input, "speed"), (s.triton_text_input, "input"))
        return next((param for name, param in fields if name and message.startswith(f"{name}:")), "input")

    def _pcm(self, result) -> np.ndarray:
        audio = result.as_numpy(self._settings.triton_audio_output)
        if audio is None:
            raise unavailable("The model server's answer holds no audio.")
        audio = audio.reshape(-1)
        if audio.dtype.kind == "f":  # FP32 in [-1, 1]
            return (np.clip(audio, -1.0, 1.0) * 32767).astype(np.int16)
        return audio.astype(np.int16, copy=False)

    async def ready(self) -> bool:
        return await self._pool.ready()

    async def close(self) -> None:
        await self._pool.close()


class TempoChain:
    """FFmpeg's atempo for any speed the API allows: one filter takes 0.5 at the slowest, so slower
    speeds are halvings chained before the rest (0.25 = 0.5 x 0.5)."""

    def __init__(self, speed: float, rate: int) -> None:
        factors = []
        while speed < 0.5:
            factors.append(0.5)
            speed /= 0.5
        self._stages = [Tempo(factor, rate) for factor in [*factors, speed]]

    def process(self, pcm: np.ndarray | None) -> np.ndarray:
        """As ``Tempo.process``: None flushes, each stage's tail going through the stages after it."""
        out = np.zeros(0, np.int16)
        for stage in self._stages:
            if pcm is None:
                out = np.concatenate([stage.process(out), stage.process(None)]) if len(out) else stage.process(None)
            else:
                out = pcm = stage.process(pcm) if len(pcm) else pcm
        return out


def _tensor(name: str, data: np.ndarray, datatype: str) -> triton.InferInput:
    tensor = triton.InferInput(name, list(data.shape), datatype)
    tensor.set_data_from_numpy(data)
    return tensor
