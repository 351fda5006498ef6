"""The speech Triton adapter against KServe's Python ModelServer on loopback: the one-response path.

The server is KServe's own (the ``kserve`` package, pinned in constraints.txt), run as a subprocess
hosting espeak-ng as a non-decoupled TTS model (tests/support/kserve_audio.py). KServe has no
ModelStreamInfer and no ModelConfig, so this covers the one-response path and the adapter's fallback
when the server cannot say whether a model is decoupled. Everything else the speech and transcription
Triton adapters do is tested against the real tritonserver (tests/triton/test_audio_on_triton.py).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time

import grpc
import pytest

from modelplex.v1 import speech_pb2
from modelplex_speech.adapters.espeak import EspeakEngine
from modelplex_speech.adapters.triton import TritonEngine as SpeechTriton
from modelplex_speech.servicer import SpeechServicer
from modelplex_speech.settings import EspeakSettings, TritonSettings
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
    # The same engine behind KServe, the same resampling and encoding here; not byte-equal: espeak-ng's output
    # depends on what the process synthesized before (this test failed after the Triton suite's local espeak).
    assert len(remote) == pytest.approx(len(local), rel=0.005)
    assert messages[0].mime_type == "audio/pcm" and messages[-1].characters == len(text)
    assert messages[-1].audio_seconds == pytest.approx(len(local) / 2 / 24000, rel=0.01)


async def test_speech_speed_without_a_speed_input_is_applied_here(kserve):
    normal, _ = await synthesize(speech_servicer(kserve), SENTENCE)
    fast, _ = await synthesize(speech_servicer(kserve), SENTENCE, speed=2.0)
    assert len(fast) == pytest.approx(len(normal) / 2, rel=0.05)
