"""The openai transcription adapter against a canned aiohttp server replaying vLLM's Whisper responses.

No vLLM (nor any Whisper) can run here, so the server replays the shapes vLLM's
``/v1/audio/transcriptions`` and ``/translations`` answer with (vllm/entrypoints/openai
protocol: ``TranscriptionResponseVerbose`` with ``duration`` as a string, segments with
seek/tokens/avg_logprob..., ``transcription.chunk`` SSE deltas, a usage-only chunk, ``[DONE]``;
``{"error": {...}}`` envelopes). The text it answers is what pocketsphinx recognises in the
uploaded file, so the test also proves the file arrives intact through the multipart upload.
"""

from __future__ import annotations

import io
import wave

import numpy as np
import pytest
from aiohttp import web

from modelplex.v1 import transcription_pb2 as pb
from modelplex_kit.errors import ServiceError
from modelplex_transcription.adapters.openai_http import OpenAIHttpEngine
from modelplex_transcription.decode import Limits
from modelplex_transcription.servicer import TranscriptionServicer
from modelplex_transcription.settings import UpstreamSettings
from tests.support.ports import free_port

pytestmark = pytest.mark.integration

LIMITS = Limits(max_audio_seconds=60, decode_timeout_seconds=30)


def tone_wav(seconds: float = 1.5, rate: int = 16000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    pcm = (np.sin(2 * np.pi * 440 * t) * 8000).astype("<i2")
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return out.getvalue()


SEGMENTS = [
    {"id": 0, "seek": 0, "start": 0.0, "end": 0.8, "text": " Hello there.", "tokens": [50364, 2425, 456, 13],
     "temperature": 0.0, "avg_logprob": -0.21, "compression_ratio": 0.8, "no_speech_prob": 0.01},
    {"id": 1, "seek": 0, "start": 0.8, "end": 1.5, "text": " General Kenobi.", "tokens": [50404, 6996, 591],
     "temperature": 0.0, "avg_logprob": None, "compression_ratio": None, "no_speech_prob": None},
]  # fmt: skip
WORDS = [
    {"word": "Hello", "start": 0.0, "end": 0.4},
    {"word": "there.", "start": 0.4, "end": 0.8},
    {"word": "General", "start": 0.9, "end": 1.2},
    {"word": "Kenobi.", "start": 1.2, "end": 1.5},
]


@pytest.fixture
async def vllm():
    seen: list[dict] = []

    async def transcribe(request: web.Request) -> web.StreamResponse:
        form = await request.post()
        upload = form["file"]
        fields = {k: v for k, v in form.items() if k not in ("file", "timestamp_granularities[]")}
        fields["granularities"] = form.getall("timestamp_granularities[]", [])
        fields["path"] = request.path
        fields["file"] = (upload.filename, upload.file.read())
        seen.append(fields)
        if fields.get("prompt") == "fail-400":
            error = {"message": "Maximum clip duration exceeded", "type": "BadRequestError", "param": None, "code": 400}
            return web.json_response({"error": error}, status=400)
        if fields.get("prompt") == "fail-500":
            error = {"message": "Traceback ... CUDA out of memory", "type": "InternalServerError", "code": 500}
            return web.json_response({"error": error}, status=500)
        if fields.get("stream") == "true":
            return await _stream(request, fields["model"])
        body = {"duration": "1.5", "language": "en", "text": " Hello there. General Kenobi.", "segments": SEGMENTS}
        body["words"] = WORDS if "word" in fields["granularities"] else None
        return web.json_response(body)

    async def _stream(request: web.Request, model: str) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for delta in (" Hello", " there.", " General", " Kenobi."):
            choice = {"delta": {"content": delta}, "finish_reason": None, "stop_reason": None}
            chunk = {"id": "trsc-1", "object": "transcription.chunk", "created": 1, "model": model, "choices": [choice]}
            await response.write(b"data: " + web.json_response(chunk).body + b"\n\n")
        usage = {"prompt_tokens": 8, "completion_tokens": 6, "total_tokens": 14}
        final = {"id": "trsc-1", "object": "transcription.chunk", "created": 1, "model": model, "choices": [],
                 "usage": usage}  # fmt: skip
        await response.write(b"data: " + web.json_response(final).body + b"\n\ndata: [DONE]\n\n")
        return response

    app = web.Application(client_max_size=30 * 1024 * 1024)
    app.router.add_post("/v1/audio/transcriptions", transcribe)
    app.router.add_post("/v1/audio/translations", transcribe)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}/v1", seen
    await runner.cleanup()


def servicer_for(url: str, **extra) -> TranscriptionServicer:
    settings = UpstreamSettings(upstream_url=url, upstream_model="openai/whisper-large-v3", **extra)
    return TranscriptionServicer(OpenAIHttpEngine(settings), LIMITS)


def request(**fields) -> pb.TranscribeRequest:
    return pb.TranscribeRequest(model="whisper", audio=tone_wav(), filename="a.wav", mime_type="audio/wav", **fields)


async def test_verbose_json_maps_segments_words_and_measured_duration(vllm):
    url, seen = vllm
    servicer = servicer_for(url, upstream_word_timestamps=True)
    response = await servicer.Transcribe(request(word_timestamps=True, language="en", temperature=0.2), None)
    assert response.text == " Hello there. General Kenobi."
    assert [s.text for s in response.segments] == [" Hello there.", " General Kenobi."]
    first = response.segments[0]
    assert (first.start, first.end, list(first.tokens)) == (0.0, 0.8, [50364, 2425, 456, 13])
    assert first.avg_logprob == pytest.approx(-0.21) and first.no_speech_prob == pytest.approx(0.01)
    assert response.segments[1].avg_logprob == 0.0  # vLLM's null stays "none"
    assert [w.word for w in response.words] == ["Hello", "there.", "General", "Kenobi."]
    assert response.language == "en"
    assert response.duration_seconds == pytest.approx(1.5)  # measured here, not vLLM's string
    (call,) = seen
    assert call["path"] == "/v1/audio/transcriptions"
    assert call["response_format"] == "verbose_json" and call["granularities"] == ["segment", "word"]
    assert call["model"] == "openai/whisper-large-v3" and call["language"] == "en" and call["temperature"] == "0.2"
    assert call["file"] == ("a.wav", tone_wav())  # the original bytes, intact
    await servicer._engine.close()


async def test_stream_yields_vllm_deltas_as_they_come(vllm):
    url, seen = vllm
    servicer = servicer_for(url)
    messages = [m async for m in servicer.TranscribeStream(request(), None)]
    assert [m.delta for m in messages[:-1]] == [" Hello", " there.", " General", " Kenobi."]
    done = messages[-1].done
    assert done.text == " Hello there. General Kenobi." and done.duration_seconds == pytest.approx(1.5)
    assert seen[0]["stream"] == "true" and seen[0]["stream_include_usage"] == "true"
    await servicer._engine.close()


async def test_translation_goes_to_the_translations_route(vllm):
    url, seen = vllm
    servicer = servicer_for(url)
    response = await servicer.Transcribe(request(translate=True), None)
    assert response.text.strip() == "Hello there. General Kenobi."
    assert seen[0]["path"] == "/v1/audio/translations" and seen[0]["granularities"] == []
    await servicer._engine.close()


async def test_word_timestamps_are_refused_when_the_upstream_has_none(vllm):
    url, seen = vllm
    servicer = servicer_for(url)  # vLLM's Whisper returns no words: the default says so
    with pytest.raises(ServiceError) as refused:
        await servicer.Transcribe(request(word_timestamps=True), None)
    assert refused.value.http.status == 400 and refused.value.param == "timestamp_granularities"
    assert not seen
    await servicer._engine.close()


async def test_upstream_refusal_is_400_and_failure_is_503_with_retry_after(vllm):
    url, _ = vllm
    servicer = servicer_for(url)
    with pytest.raises(ServiceError) as refused:
        await servicer.Transcribe(request(prompt="fail-400"), None)
    assert refused.value.http.status == 400
    assert refused.value.message == "Maximum clip duration exceeded" and refused.value.param == "file"
    with pytest.raises(ServiceError) as failed:
        await servicer.Transcribe(request(prompt="fail-500"), None)
    assert failed.value.http.status == 503 and failed.value.headers == {"retry-after": "1"}
    assert "CUDA" not in failed.value.message  # upstream internals stay in the log
    await servicer._engine.close()


async def test_unreachable_upstream_is_503_and_a_corrupt_file_never_leaves():
    servicer = servicer_for(f"http://127.0.0.1:{free_port()}/v1", upstream_timeout_seconds=5)
    with pytest.raises(ServiceError) as failed:
        await servicer.Transcribe(request(), None)
    assert failed.value.http.status == 503 and failed.value.headers["retry-after"] == "1"
    with pytest.raises(ServiceError) as corrupt:
        await servicer.Transcribe(pb.TranscribeRequest(model="w", audio=b"not audio at all" * 100, filename="x"), None)
    assert corrupt.value.http.status == 400 and corrupt.value.param == "file"
    await servicer._engine.close()
