"""The audio acceptance tests (tests/e2e/test_audio.py), unchanged, with speech and transcription served
by a real Triton: espeak-ng as the decoupled ``espeak`` model and pocketsphinx behind TensorRT-LLM's
``whisper_bls`` layout (deploy/triton/model_repository/), each behind its Triton adapter as the
example catalog (docs/examples/catalog-triton.yaml) sets it up; translations' text model is Triton's
too. Then what only a real Triton shows: the model's own refusals, models unloaded through model
control, a stream the client leaves, and the adapters' calls as the KServe stand-in's tests made them.

One acceptance test is replaced, not re-run: ``test_verbose_json_with_words``. The whisper_bls
layout returns text alone (TensorRT-LLM's model strips Whisper's timestamp tokens), so this entry
claims no word timestamps and a request for them is a 400 naming ``timestamp_granularities``.
"""

from __future__ import annotations

import asyncio
import io
import time
import wave
from contextlib import aclosing

import numpy as np
import openai
import pytest
import yaml

from modelplex.v1 import speech_pb2, transcription_pb2
from modelplex_kit.errors import ServiceError
from modelplex_speech.adapters.espeak import EspeakEngine
from modelplex_speech.adapters.triton import TritonEngine as SpeechTriton
from modelplex_speech.servicer import SpeechServicer
from modelplex_speech.settings import EspeakSettings, TritonSettings
from modelplex_transcription.adapters.pocketsphinx import PocketsphinxEngine
from modelplex_transcription.adapters.triton import TritonEngine as WhisperTriton
from modelplex_transcription.adapters.triton import task_prefix
from modelplex_transcription.decode import Limits
from modelplex_transcription.servicer import TranscriptionServicer
from modelplex_transcription.settings import PocketsphinxSettings, UpstreamSettings
from tests.e2e import test_audio as e2e
from tests.e2e.test_audio import *  # noqa: F403 - the same tests, collected again here
from tests.e2e.test_audio import KEY, ROUND_TRIP, wer
from tests.support.ports import free_port
from tests.triton.conftest import example_model, start_stack

pytestmark = pytest.mark.triton

SENTENCE = "Please call me tomorrow morning."
VOICES = "en-us+klatt4,en-us"
# Model control: a model unloaded and loaded again takes a few seconds to be served again.
RELOAD_TIMEOUT_S = 120


def _on_triton(entry: dict, example: dict, settings: dict | None = None, **capabilities) -> dict:
    """The e2e's catalog entry, served by the example catalog's Triton engine instead of its local one."""
    engine = example["engine"] | {"settings": example["engine"]["settings"] | (settings or {})}
    return entry | {"engine": engine, "capabilities": entry["capabilities"] | capabilities}


def _models(tmp, triton) -> list[dict]:
    (tmp / "e2e").mkdir()
    local = {m["id"]: m for m in yaml.safe_load(e2e._catalog(tmp / "e2e").read_text())["models"]}
    speech = _on_triton(local["espeak-ng"], example_model("espeak-ng", triton))
    # The e2e's limits; no word timestamps (the layout returns text alone).
    transcription = _on_triton(
        local["pocketsphinx-en-us"],
        example_model("pocketsphinx-en-us", triton),
        {"max_audio_seconds": 60, "max_concurrency": 1},
        word_timestamps=False,
    )
    text = example_model("smollm2-135m-instruct", triton) | {"id": "smollm2", "aliases": []}
    # Entries that promise more than the models do (a voice espeak lacks, French), so requests reach
    # the models and are refused there; also the entries whose models the unload test takes away.
    more_voices = speech | {"id": "espeak-ng-de", "aliases": [], "backend": f"127.0.0.1:{free_port()}"}
    voices = speech["engine"]["settings"]["voices"] + ",de"
    more_voices["engine"] = speech["engine"] | {"settings": speech["engine"]["settings"] | {"voices": voices}}
    more_voices["capabilities"] = speech["capabilities"] | {"voices": [*speech["capabilities"]["voices"], "de"]}
    french = transcription | {"id": "pocketsphinx-fr", "aliases": [], "backend": f"127.0.0.1:{free_port()}"}
    french["engine"] = transcription["engine"] | {
        "settings": transcription["engine"]["settings"] | {"languages": "en,fr"}
    }
    french["capabilities"] = transcription["capabilities"] | {"languages": ["en", "fr"]}
    return [speech, transcription, text, more_voices, french]


@pytest.fixture(scope="module")
def client(triton, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("audio-on-triton")
    stack = start_stack(tmp, _models(tmp, triton), KEY)
    yield openai.OpenAI(base_url=stack.base_url, api_key=KEY, max_retries=0, timeout=120)
    stack.stop()


def test_verbose_json_with_words(client, spoken):
    """Replaces the e2e test of that name: segments, yes; words, a 400 naming the parameter."""
    with pytest.raises(openai.BadRequestError) as caught:
        client.audio.transcriptions.create(
            model="whisper-1",
            file=("speech.mp3", spoken),
            response_format="verbose_json",
            timestamp_granularities=["word", "segment"],
        )
    assert caught.value.body["param"] == "timestamp_granularities"
    result = client.audio.transcriptions.create(
        model="whisper-1",
        file=("speech.mp3", spoken),
        response_format="verbose_json",
        timestamp_granularities=["segment"],
        language="en",
        prompt="A phone call.",
        temperature=0.0,
    )
    e2e.validate(result.model_dump(exclude_none=True), "CreateTranscriptionResponseVerboseJson")
    assert result.segments and result.segments[0].end > result.segments[0].start
    assert wer(ROUND_TRIP, result.text) <= e2e.MAX_WER, result.text


def test_english_transcript_is_english_and_not_translated_again(client, spoken):
    """Regression: the adapter reported no language ("") when none was asked, so the edge sent an English
    transcript to the text model to be "translated" (the local engine says english)."""
    result = client.audio.transcriptions.create(
        model="whisper-1", file=("s.mp3", spoken), response_format="verbose_json"
    )
    assert result.language == "en"
    translated = client.audio.translations.create(model="whisper-1", file=("s.mp3", spoken))
    assert translated.text == result.text  # the transcript itself: no text model rewrote it


def test_the_models_refusal_is_a_400_naming_the_param(client, spoken):
    """The catalog promises what the models lack; the models' INVALID_ARG refusals name the field
    (regression: the adapters named `input` and `file` whatever the model refused)."""
    with pytest.raises(openai.BadRequestError) as caught:
        client.audio.speech.create(model="espeak-ng-de", voice="de", input="Hallo.", response_format="pcm")
    assert caught.value.body["param"] == "voice"
    assert "not one of this model's voices" in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.audio.transcriptions.create(model="pocketsphinx-fr", file=("s.mp3", spoken), language="fr")
    assert caught.value.body["param"] == "language"
    assert "English (en) only" in caught.value.body["message"]


# The adapters called directly, as the KServe stand-in's tests call them (tests/integration/
# test_audio_triton_adapters.py), now against the real server.


def speech_servicer(target: str, **extra) -> SpeechServicer:
    fields = {"upstream_model": "espeak", "upstream_sample_rate": 22050, "voices": VOICES} | extra
    return SpeechServicer(SpeechTriton(TritonSettings(upstream_url=target, **fields)))


async def synthesize(servicer: SpeechServicer, text: str, **fields) -> tuple[bytes, list]:
    request = speech_pb2.SynthesizeRequest(model="m", input=text, voice="en-us+klatt4", response_format="pcm", **fields)
    messages = [m async for m in servicer.Synthesize(request, None)]
    return b"".join(m.audio for m in messages), messages


async def test_speech_is_the_local_engines_audio(triton):
    """espeak-ng inside Triton, streamed piece by piece, against espeak-ng here. Not byte for byte:
    consecutive syntheses of one text in one process differ (by a few samples' length, and in the
    Klatt voices' noise), and Triton's instances have spoken before; the stand-in's test compared
    each process's first synthesis."""
    text = "Good morning. This is a second sentence."
    remote, messages = await synthesize(speech_servicer(triton.grpc_target, triton_speed_input="speed"), text)
    local, _ = await synthesize(SpeechServicer(EspeakEngine(EspeakSettings(voices=VOICES))), text)
    assert len(remote) > 24000 * 2  # over a second of 24 kHz 16-bit audio
    assert len(remote) == pytest.approx(len(local), rel=0.005)  # the same engine, resampling and encoding
    assert messages[0].mime_type == "audio/pcm" and messages[-1].characters == len(text)
    assert messages[-1].audio_seconds == pytest.approx(len(remote) / 2 / 24000, rel=0.01)


@pytest.mark.parametrize("speed_input", ["speed", ""])
async def test_speech_speed_by_the_model_or_here(triton, speed_input):
    """The model's optional speed input, or (none named) FFmpeg's atempo in the adapter, over the API's
    whole range (regression: the adapter's atempo refused speeds under 0.5, a 500)."""
    servicer = speech_servicer(triton.grpc_target, triton_speed_input=speed_input)
    normal, _ = await synthesize(servicer, SENTENCE)
    fast, _ = await synthesize(servicer, SENTENCE, speed=2.0)
    slow, _ = await synthesize(servicer, SENTENCE, speed=0.25)
    assert len(fast) == pytest.approx(len(normal) / 2, rel=0.1)
    assert len(slow) == pytest.approx(len(normal) * 4, rel=0.1)


async def test_speech_streams_within_a_sentence_and_stops_when_left(triton):
    """Decoupled: pieces arrive while espeak-ng speaks; a stream left early is cancelled in Triton, and
    the model stops espeak-ng there (Triton's request time, against the same request run to its end)."""
    engine = SpeechTriton(
        TritonSettings(
            upstream_url=triton.grpc_target, upstream_model="espeak", voices=VOICES, triton_speed_input="speed"
        )
    )
    pieces = [p async for p in engine.synthesize(SENTENCE, voice="en-us", speed=1.0, instructions="")]
    assert len(pieces) > 3  # ~100 ms each, not one answer at the end
    text = f"{SENTENCE} " * 120  # minutes of audio at a quarter speed: seconds of espeak-ng and atempo

    async def seconds_in_triton(leave_early: bool) -> float:
        before = triton.metric("nv_inference_request_duration_us", "espeak")
        async with aclosing(engine.synthesize(text, voice="en-us", speed=0.25, instructions="")) as audio:
            async for _ in audio:
                if leave_early:
                    break
        deadline = time.monotonic() + 60
        while (spent := triton.metric("nv_inference_request_duration_us", "espeak") - before) == 0:
            assert time.monotonic() < deadline, "the request never finished in Triton"
            await asyncio.sleep(0.1)
        return spent / 1e6

    whole = await seconds_in_triton(leave_early=False)
    left = await seconds_in_triton(leave_early=True)
    assert left < whole / 3, f"espeak-ng went on for {left:.2f} s of a {whole:.2f} s synthesis after the client left"
    await engine.close()


async def test_speech_refusals_name_the_input(triton):
    engine = SpeechTriton(
        TritonSettings(
            upstream_url=triton.grpc_target, upstream_model="espeak", voices=VOICES, triton_speed_input="speed"
        )
    )
    for fields, param in (({"voice": "nobody", "speed": 1.0}, "voice"), ({"voice": "en-us", "speed": 9.0}, "speed")):
        with pytest.raises(ServiceError) as refused:
            [p async for p in engine.synthesize("Hello.", instructions="", **fields)]
        assert refused.value.http.status == 400 and refused.value.param == param
    await engine.close()


async def test_speech_unknown_model_is_503(triton):
    with pytest.raises(ServiceError) as failed:
        await synthesize(speech_servicer(triton.grpc_target, upstream_model="nope"), SENTENCE)
    assert failed.value.http.status == 503


@pytest.fixture(scope="module")
def wav_sentence() -> bytes:
    """SENTENCE spoken by espeak-ng here and encoded as WAV: what a client would upload."""

    async def speak() -> bytes:
        servicer = SpeechServicer(EspeakEngine(EspeakSettings()))
        request = speech_pb2.SynthesizeRequest(model="m", input=SENTENCE, voice="en-us+klatt4", response_format="wav")
        return b"".join([m.audio async for m in servicer.Synthesize(request, None)])

    return asyncio.run(speak())


def whisper_servicer(target: str, **extra) -> TranscriptionServicer:
    settings = UpstreamSettings(upstream_url=target, **({"upstream_model": "whisper_bls"} | extra))
    return TranscriptionServicer(WhisperTriton(settings), Limits(max_audio_seconds=600, decode_timeout_seconds=60))


async def test_whisper_layout_transcribes_as_the_local_engine(triton, wav_sentence):
    request = transcription_pb2.TranscribeRequest(model="w", audio=wav_sentence, filename="s.wav", language="en")
    response = await whisper_servicer(triton.grpc_target).Transcribe(request, None)
    local = TranscriptionServicer(PocketsphinxEngine(PocketsphinxSettings()), Limits(600, 60))
    expected = await local.Transcribe(request, None)
    # The model saw exactly the samples decoded here (FP32 / 32768 back to int16) and recognised them
    # with the local engine: the same words.
    assert response.text == expected.text and response.text
    (segment,) = response.segments
    assert segment.start == 0.0 and segment.end == pytest.approx(response.duration_seconds)
    assert 1.0 < response.duration_seconds < 5.0 and response.language == "en"


async def test_whisper_windows_long_audio_into_timed_segments(triton, wav_sentence):
    with wave.open(io.BytesIO(wav_sentence)) as w:
        rate, pcm = w.getframerate(), np.frombuffer(w.readframes(w.getnframes()), "<i2")
    gap = np.zeros(int(rate * 30), np.int16)  # the sentence again, 30 s + its length later: a second window
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.concatenate([pcm, gap, pcm]).tobytes())
    response = await whisper_servicer(triton.grpc_target).Transcribe(
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


def test_whisper_inputs_without_a_batch_dimension():
    """Regression: with triton_batched false the audio lost its batch dimension but WAV_LENS and
    TEXT_PREFIX kept theirs ([1, 1]), which a model with max_batch_size 0 refuses."""
    pcm = np.arange(8, dtype=np.int16)
    shapes = {
        batched: [
            (t.name(), t.shape())
            for t in WhisperTriton(
                UpstreamSettings(upstream_url="127.0.0.1:1", upstream_model="w", triton_batched=batched)
            ).inputs(pcm, "<|startoftranscript|>")
        ]
        for batched in (True, False)
    }
    assert shapes[True] == [("WAV", [1, 8]), ("WAV_LENS", [1, 1]), ("TEXT_PREFIX", [1, 1])]
    assert shapes[False] == [("WAV", [8]), ("WAV_LENS", [1]), ("TEXT_PREFIX", [1])]


async def test_whisper_refusals_and_failures(triton, wav_sentence):
    request = transcription_pb2.TranscribeRequest(model="w", audio=wav_sentence, filename="s.wav")
    with pytest.raises(ServiceError) as refused:  # the model's own INVALID_ARG: it transcribes English only
        await whisper_servicer(triton.grpc_target, languages="").Transcribe(
            transcription_pb2.TranscribeRequest(model="w", audio=wav_sentence, filename="s.wav", language="de"), None
        )
    assert refused.value.http.status == 400 and refused.value.param == "language"
    with pytest.raises(ServiceError) as failed:
        await whisper_servicer(triton.grpc_target, upstream_model="nope").Transcribe(request, None)
    assert failed.value.http.status == 503
    unreachable = whisper_servicer(f"127.0.0.1:{free_port()}", upstream_timeout_seconds=5)
    with pytest.raises(ServiceError) as failed:
        await unreachable.Transcribe(request, None)
    assert failed.value.http.status == 503 and failed.value.headers["retry-after"] == "1"
    with pytest.raises(ServiceError) as refused:
        await whisper_servicer(triton.grpc_target).Transcribe(
            transcription_pb2.TranscribeRequest(model="w", audio=wav_sentence, word_timestamps=True), None
        )
    assert refused.value.http.status == 400 and refused.value.param == "timestamp_granularities"


def _wait_served(triton, model: str) -> None:
    deadline = time.monotonic() + RELOAD_TIMEOUT_S
    while not triton.ready(model):
        assert time.monotonic() < deadline, f"{model} was not ready again within {RELOAD_TIMEOUT_S} s"
        time.sleep(0.5)


async def _adapters_say_503(target: str, spoken: bytes) -> None:
    """The adapters' own calls while the models are away: ModelConfig (NOT_FOUND), the stream's
    in-band error (text alone), and ModelInfer (NOT_FOUND)."""
    fields = {"upstream_url": target, "upstream_model": "espeak", "voices": VOICES}
    for decoupled in (None, True):  # None: asks Triton's ModelConfig first
        engine = SpeechTriton(TritonSettings(**fields, triton_decoupled=decoupled))
        with pytest.raises(ServiceError) as failed:
            [p async for p in engine.synthesize("Hello.", voice="en-us", speed=1.0, instructions="")]
        assert failed.value.http.status == 503 and "not serving model `espeak`" in failed.value.message
        await engine.close()
    request = transcription_pb2.TranscribeRequest(model="w", audio=spoken, filename="s.mp3")
    with pytest.raises(ServiceError) as failed:
        await whisper_servicer(target).Transcribe(request, None)
    assert failed.value.http.status == 503 and "not serving model `whisper_bls`" in failed.value.message


def _served_again(client) -> str:
    """The round trip through the stack's main entries once their backends see the models again."""
    deadline = time.monotonic() + RELOAD_TIMEOUT_S
    while True:
        try:
            audio = client.audio.speech.create(model="tts-1", voice="alloy", input=ROUND_TRIP, response_format="mp3")
            return client.audio.transcriptions.create(model="whisper-1", file=("speech.mp3", audio.content)).text
        except openai.APIStatusError as exc:  # 503 until the backends' health checks see the models
            assert exc.status_code == 503 and time.monotonic() < deadline, exc
            time.sleep(1)


def test_models_unloaded_through_model_control_are_503(client, triton, spoken):
    """Last in this file: it takes both models away, then loads them again and waits until the
    stack serves them again (the backends' health checks saw them go)."""
    try:
        triton.unload("espeak")
        triton.unload("whisper_bls")
        with pytest.raises(openai.APIStatusError) as caught:
            client.audio.speech.create(model="espeak-ng-de", voice="alloy", input="Hello.", response_format="pcm")
        assert caught.value.status_code == 503
        with pytest.raises(openai.APIStatusError) as caught:
            client.audio.transcriptions.create(model="pocketsphinx-fr", file=("s.mp3", spoken))
        assert caught.value.status_code == 503
        asyncio.run(_adapters_say_503(triton.grpc_target, spoken))
    finally:
        triton.load("espeak")
        triton.load("whisper_bls")
        _wait_served(triton, "espeak")
        _wait_served(triton, "whisper_bls")
    assert wer(ROUND_TRIP, _served_again(client)) <= e2e.MAX_WER
