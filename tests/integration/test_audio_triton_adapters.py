"""The speech and transcription Triton adapters against KServe's Python ModelServer on loopback.

The server is KServe's own (the ``kserve`` package, pinned in constraints.txt), run as a
subprocess hosting two small real models (tests/support/kserve_audio.py): espeak-ng as a
non-decoupled TTS model and pocketsphinx behind TensorRT-LLM's Whisper tensor layout. KServe
has no ModelStreamInfer, so this covers the one-response path (and the adapter's fallback when
the server has no ModelConfig to say whether a model is decoupled).
"""

from __future__ import annotations

import asyncio
import io
import re
import subprocess
import sys
import time
import wave

import grpc
import numpy as np
import pytest
from pocketsphinx import Decoder

from modelplex.v1 import speech_pb2, transcription_pb2
from modelplex_kit.errors import ServiceError
from modelplex_speech.adapters.espeak import EspeakEngine
from modelplex_speech.adapters.triton import TritonEngine as SpeechTriton
from modelplex_speech.servicer import SpeechServicer
from modelplex_speech.settings import EspeakSettings, TritonSettings
from modelplex_transcription.adapters.triton import TritonEngine as WhisperTriton
from modelplex_transcription.adapters.triton import task_prefix
from modelplex_transcription.decode import AudioSource, Limits
from modelplex_transcription.servicer import TranscriptionServicer
from modelplex_transcription.settings import UpstreamSettings
from tests.support.ports import free_port

pytestmark = pytest.mark.integration

SENTENCE = "Please call me tomorrow morning."
VOICES = "en-us+klatt4,en-us"


@pytest.fixture(scope="module")
def kserve(tmp_path_factory):
    grpc_port, http_port = free_port(), free_port()
    log = tmp_path_factory.mktemp("kserve") / "kserve.log"
    with log.open("wb") as out:
        command = ["-m", "tests.support.kserve_audio", "--grpc-port", str(grpc_port), "--http-port", str(http_port)]
        proc = subprocess.Popen([sys.executable, *command], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                grpc.channel_ready_future(grpc.insecure_channel(f"127.0.0.1:{grpc_port}")).result(timeout=1)
                break
            except grpc.FutureTimeoutError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"KServe ModelServer did not start:\n{log.read_text()[-3000:]}")
        yield f"127.0.0.1:{grpc_port}"
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def speech_servicer(target: str, **extra) -> SpeechServicer:
    fields = {"upstream_model": "espeak", "upstream_sample_rate": 22050, "voices": VOICES} | extra
    settings = TritonSettings(upstream_url=target, **fields)
    return SpeechServicer(SpeechTriton(settings))


async def synthesize(servicer: SpeechServicer, text: str, **fields) -> tuple[bytes, list]:
    request = speech_pb2.SynthesizeRequest(model="m", input=text, voice="en-us+klatt4", response_format="pcm", **fields)
    messages = [m async for m in servicer.Synthesize(request, None)]
    return b"".join(m.audio for m in messages), messages


def words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


async def test_speech_equals_the_local_engines_audio(kserve):
    text = "Good morning. This is a second sentence."
    remote, messages = await synthesize(speech_servicer(kserve), text)
    local, _ = await synthesize(SpeechServicer(EspeakEngine(EspeakSettings(voices=VOICES))), text)
    assert len(remote) > 24000 * 2  # over a second of 24 kHz 16-bit audio
    assert remote == local  # same engine behind KServe, same resampling and encoding here
    assert messages[0].mime_type == "audio/pcm" and messages[-1].characters == len(text)
    assert messages[-1].audio_seconds == pytest.approx(len(local) / 2 / 24000, rel=0.01)


async def test_speech_speed_without_a_speed_input_is_applied_here(kserve):
    normal, _ = await synthesize(speech_servicer(kserve), SENTENCE)
    fast, _ = await synthesize(speech_servicer(kserve), SENTENCE, speed=2.0)
    assert len(fast) == pytest.approx(len(normal) / 2, rel=0.05)


async def test_speech_unknown_model_is_503(kserve):
    servicer = speech_servicer(kserve, upstream_model="nope")
    with pytest.raises(ServiceError) as failed:
        await synthesize(servicer, SENTENCE)
    assert failed.value.http.status == 503


@pytest.fixture(scope="module")
def spoken() -> bytes:
    """SENTENCE spoken by espeak-ng here and encoded as WAV: what a client would upload."""

    async def speak() -> bytes:
        servicer = SpeechServicer(EspeakEngine(EspeakSettings()))
        request = speech_pb2.SynthesizeRequest(model="m", input=SENTENCE, voice="en-us+klatt4", response_format="wav")
        return b"".join([m.audio async for m in servicer.Synthesize(request, None)])

    return asyncio.run(speak())


def whisper_servicer(target: str, **extra) -> TranscriptionServicer:
    settings = UpstreamSettings(upstream_url=target, **({"upstream_model": "whisper"} | extra))
    return TranscriptionServicer(WhisperTriton(settings), Limits(max_audio_seconds=600, decode_timeout_seconds=60))


async def test_whisper_layout_transcribes_a_spoken_sentence(kserve, spoken):
    servicer = whisper_servicer(kserve)
    request = transcription_pb2.TranscribeRequest(model="w", audio=spoken, filename="s.wav", language="en")
    response = await servicer.Transcribe(request, None)
    # The model saw exactly the samples decoded here: pocketsphinx on them, in this process, says the same.
    decoder = Decoder(samprate=16000, loglevel="FATAL")
    decoder.start_utt()
    decoder.process_raw(AudioSource(spoken, "s.wav", Limits(600, 60)).decode_all().tobytes(), False, True)
    decoder.end_utt()
    assert response.text == decoder.hyp().hypstr
    # And it is the sentence: whole-window decoding (no endpointer) is pocketsphinx's weaker mode, hence a
    # looser bound than the e2e round trip's 0.2: at most two words in five wrong.
    hypothesis, reference = words(response.text), words(SENTENCE)
    errors = sum(a != b for a, b in zip(reference, hypothesis, strict=False)) + abs(len(reference) - len(hypothesis))
    assert errors <= 2, response.text
    (segment,) = response.segments
    assert segment.start == 0.0 and segment.end == pytest.approx(response.duration_seconds)
    assert 1.0 < response.duration_seconds < 5.0


async def test_whisper_windows_long_audio_into_timed_segments(kserve, spoken):
    with wave.open(io.BytesIO(spoken)) as w:
        rate, pcm = w.getframerate(), np.frombuffer(w.readframes(w.getnframes()), "<i2")
    gap = np.zeros(int(rate * 30), np.int16)  # the sentence again, 30 s + its length later: a second window
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.concatenate([pcm, gap, pcm]).tobytes())
    response = await whisper_servicer(kserve).Transcribe(
        transcription_pb2.TranscribeRequest(model="w", audio=out.getvalue(), filename="l.wav"), None
    )
    first, second = response.segments
    assert (first.start, first.end, second.start) == (0.0, 30.0, 30.0)
    assert second.end == pytest.approx(response.duration_seconds) and response.duration_seconds > 31
    assert "morning" in first.text.lower() and "morning" in second.text.lower()


def test_task_prefix_is_whispers():
    request = transcription_pb2.TranscribeRequest(language="DE", translate=True, prompt="Names: Zoë.")
    assert task_prefix(request) == "<|startofprev|> Names: Zoë.<|startoftranscript|><|de|><|translate|><|notimestamps|>"
    assert task_prefix(transcription_pb2.TranscribeRequest()) == "<|startoftranscript|><|transcribe|><|notimestamps|>"


async def test_whisper_failures_are_503_and_word_timestamps_a_400(kserve, spoken):
    missing = whisper_servicer(kserve, upstream_model="nope")
    request = transcription_pb2.TranscribeRequest(model="w", audio=spoken, filename="s.wav")
    with pytest.raises(ServiceError) as failed:
        await missing.Transcribe(request, None)
    assert failed.value.http.status == 503
    unreachable = whisper_servicer(f"127.0.0.1:{free_port()}", upstream_timeout_seconds=5)
    with pytest.raises(ServiceError) as failed:
        await unreachable.Transcribe(request, None)
    assert failed.value.http.status == 503 and failed.value.headers["retry-after"] == "1"
    with pytest.raises(ServiceError) as refused:
        await whisper_servicer(kserve, upstream_word_timestamps=True).Transcribe(
            transcription_pb2.TranscribeRequest(model="w", audio=spoken, word_timestamps=True), None
        )
    assert refused.value.http.status == 400 and refused.value.param == "timestamp_granularities"
