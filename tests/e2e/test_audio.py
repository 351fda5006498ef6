"""Speech, transcriptions and translations end to end: the real stack (espeak-ng, pocketsphinx, SmolLM2)
driven through the official openai SDK."""

from __future__ import annotations

import io
import re

import av
import openai
import pytest
import yaml

from tests.support import stacks
from tests.support.openapi import validate
from tests.support.ports import free_port

pytestmark = pytest.mark.e2e

KEY = "sk-modelplex-audio"
# The round trip: an easy sentence, spoken by espeak-ng (alloy -> en-us+klatt4) and recognised by pocketsphinx.
ROUND_TRIP = "Please call me tomorrow morning."
MAX_WER = 0.2  # at most one word in five wrong


def _catalog(tmp) -> str:
    voices = ["en-us+klatt4", "en+klatt4", "en-us", "en", "en-us+f3", "en-us+m3", "en+f2"]
    models = [
        {
            "id": "espeak-ng",
            "aliases": ["tts-1"],
            "modality": "speech",
            "backend": f"127.0.0.1:{free_port()}",
            "engine": {"kind": "espeak"},
            "capabilities": {
                "voices": voices,
                "voice_aliases": {"alloy": "en-us+klatt4", "echo": "en-us+m3", "nova": "en-us+f3"},
                "max_input_chars": 300,
            },
            "created": 1730419200,
        },
        {
            "id": "pocketsphinx-en-us",
            "aliases": ["whisper-1"],
            "modality": "transcription",
            "backend": f"127.0.0.1:{free_port()}",
            "engine": {"kind": "pocketsphinx", "settings": {"max_audio_seconds": 60, "max_concurrency": 1}},
            "capabilities": {
                "languages": ["en"],
                "word_timestamps": True,
                "max_audio_seconds": 60,
                "translation_model": "smollm2",
            },
            "created": 1730419200,
        },
        {
            "id": "smollm2",
            "modality": "text",
            "backend": f"127.0.0.1:{free_port()}",
            "engine": {"kind": "llamacpp", "settings": {"context_length": 2048}},
            "capabilities": ["chat"],
            "created": 1730419200,
        },
    ]
    path = stacks.write_catalog(tmp, models)
    return path


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("audio")
    stack = stacks.start_stack(_catalog(tmp), tmp, env={"MODELPLEX_DEV_API_KEY": KEY})
    yield openai.OpenAI(base_url=stack.base_url, api_key=KEY, max_retries=0, timeout=120)
    stack.stop()


def _decode(data: bytes) -> tuple[int, float]:
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        samples = sum(frame.samples for frame in container.decode(stream))
        return stream.rate, samples / stream.rate


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def wer(reference: str, hypothesis: str) -> float:
    """Word error rate: (substitutions + deletions + insertions) / reference words, by edit distance."""
    ref, hyp = _words(reference), _words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, word in enumerate(ref, start=1):
        previous, row[0] = row[0], i
        for j, other in enumerate(hyp, start=1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (word != other))
    return row[-1] / len(ref)


def test_wer_counts_edits():
    assert wer("a b c d", "a b c d") == 0
    assert wer("a b c d", "a x c") == 0.5  # one substitution, one deletion
    assert wer("a b", "a b c d") == 1.0  # two insertions


@pytest.mark.parametrize(
    ("fmt", "container"), [("mp3", "mp3"), ("opus", "ogg"), ("aac", "aac"), ("flac", "flac"), ("wav", "wav")]
)
def test_speech_formats_decode(client, fmt, container):
    audio = client.audio.speech.create(model="tts-1", voice="alloy", input="Hello there.", response_format=fmt)
    rate, seconds = _decode(audio.content)
    assert 0.3 < seconds < 3.0
    assert rate in (24000, 48000)  # opus decodes at 48 kHz


def test_speech_pcm_is_24khz_16bit_and_speed_scales(client):
    normal = client.audio.speech.create(
        model="espeak-ng", voice="echo", input="One two three four.", response_format="pcm"
    )
    fast = client.audio.speech.create(
        model="espeak-ng", voice="echo", input="One two three four.", response_format="pcm", speed=2.0
    )
    slow = client.audio.speech.create(
        model="espeak-ng", voice="echo", input="One two three four.", response_format="pcm", speed=0.25
    )
    seconds = [len(a.content) / 2 / 24000 for a in (normal, fast, slow)]
    assert len(normal.content) % 2 == 0
    assert seconds[1] < seconds[0] * 0.7
    assert seconds[2] > seconds[0] * 2.5


def test_speech_streams_sentence_by_sentence(client):
    text = " ".join(f"This is sentence number {n}." for n in range(1, 9))
    with client.audio.speech.with_streaming_response.create(
        model="espeak-ng", voice="nova", input=text, response_format="pcm"
    ) as response:
        assert response.headers["content-type"] == "audio/pcm"
        chunks = [chunk for chunk in response.iter_bytes() if chunk]
    assert len(chunks) > 8  # several pieces, not one body at the end
    assert len(chunks[0]) < sum(map(len, chunks)) / 4


def test_speech_sse_events(client):
    with client.audio.speech.with_streaming_response.create(
        model="espeak-ng", voice="alloy", input="Hello. Goodbye.", response_format="mp3", stream_format="sse"
    ) as response:
        events = [yaml.safe_load(line[5:]) for line in response.iter_lines() if line.startswith("data:")]
    import base64
    import json

    events = [json.loads(json.dumps(e)) for e in events]
    deltas = [e for e in events if e["type"] == "speech.audio.delta"]
    for event in events:
        validate(event, "SpeechAudioDeltaEvent" if event["type"] == "speech.audio.delta" else "SpeechAudioDoneEvent")
    assert events[-1]["type"] == "speech.audio.done" and events[-1]["usage"]["input_characters"] == 15
    _, seconds = _decode(b"".join(base64.b64decode(e["audio"]) for e in deltas))
    assert seconds > 0.5


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"voice": "nobody"}, "voice"),
        ({"input": "x" * 301}, "input"),
        ({"instructions": "Speak like a pirate."}, "instructions"),
        ({"speed": 5.0}, "speed"),
        ({"response_format": "ogg"}, "response_format"),
    ],
)
def test_speech_errors_name_the_param(client, kwargs, param):
    args = {"model": "espeak-ng", "voice": "alloy", "input": "Hello."} | kwargs
    with pytest.raises(openai.BadRequestError) as caught:
        client.audio.speech.create(**args)
    assert caught.value.body["param"] == param
    if param == "voice":
        assert "en-us+klatt4" in caught.value.body["message"] and "alloy" in caught.value.body["message"]


def test_voices_in_model_details(client):
    model = client.models.retrieve("espeak-ng")
    assert "en-us+klatt4" in model.capabilities["voices"]
    assert model.capabilities["voice_aliases"]["alloy"] == "en-us+klatt4"


@pytest.fixture(scope="module")
def spoken(client) -> bytes:
    return client.audio.speech.create(model="tts-1", voice="alloy", input=ROUND_TRIP, response_format="mp3").content


def test_round_trip_word_error_rate(client, spoken):
    result = client.audio.transcriptions.create(model="whisper-1", file=("speech.mp3", spoken))
    validate(result.model_dump(exclude_none=True), "CreateTranscriptionResponseJson")
    assert wer(ROUND_TRIP, result.text) <= MAX_WER, result.text
    assert result.usage.type == "duration" and 1.0 < result.usage.seconds < 4.0


def test_verbose_json_with_words(client, spoken):
    result = client.audio.transcriptions.create(
        model="whisper-1",
        file=("speech.mp3", spoken),
        response_format="verbose_json",
        timestamp_granularities=["word", "segment"],
        language="en",
        prompt="A phone call.",
        temperature=0.0,
    )
    validate(result.model_dump(exclude_none=True), "CreateTranscriptionResponseVerboseJson")
    assert result.segments and result.segments[0].end > result.segments[0].start
    assert [w.word for w in result.words][:2] == _words(result.text)[:2]
    assert all(a.end <= b.start + 1e-6 for a, b in zip(result.words, result.words[1:], strict=False))


@pytest.mark.parametrize("fmt", ["text", "srt", "vtt"])
def test_text_formats(client, spoken, fmt):
    result = client.audio.transcriptions.create(model="whisper-1", file=("speech.mp3", spoken), response_format=fmt)
    assert isinstance(result, str) and "call" in result
    if fmt == "srt":
        assert re.search(r"^1\n00:00:0\d,\d{3} --> 00:00:0\d,\d{3}\n", result)
    if fmt == "vtt":
        assert result.startswith("WEBVTT\n\n00:00:0")


def test_stream_true(client, spoken):
    events = list(client.audio.transcriptions.create(model="whisper-1", file=("speech.wav", spoken), stream=True))
    deltas = [e for e in events if e.type == "transcript.text.delta"]
    assert deltas and events[-1].type == "transcript.text.done"
    for event in deltas:
        validate(event.model_dump(exclude_none=True), "TranscriptTextDeltaEvent")
    assert "".join(d.delta for d in deltas) == events[-1].text
    assert events[-1].usage.seconds > 1.0


def test_translation_of_english_speech_is_the_transcript(client, spoken):
    result = client.audio.translations.create(model="whisper-1", file=("speech.mp3", spoken))
    validate(result.model_dump(exclude_none=True), "CreateTranslationResponseJson")
    assert wer(ROUND_TRIP, result.text) <= MAX_WER


@pytest.mark.parametrize(
    ("file", "kwargs", "param"),
    [
        (("notes.mp3", b"this is not audio" * 50), {}, "file"),
        (("speech.mp3", None), {"language": "fr"}, "language"),
        (("speech.mp3", None), {"response_format": "xml"}, "response_format"),
        (("speech.mp3", None), {"temperature": 3}, "temperature"),
    ],
)
def test_transcription_errors_name_the_param(client, spoken, file, kwargs, param):
    upload = (file[0], file[1] if file[1] is not None else spoken)
    with pytest.raises(openai.BadRequestError) as caught:
        client.audio.transcriptions.create(model="whisper-1", file=upload, **kwargs)
    assert caught.value.body["param"] == param


def test_too_long_audio_is_refused(client):
    silence = io.BytesIO()
    with av.open(silence, "w", format="wav") as out:
        stream = out.add_stream("pcm_s16le", rate=8000, layout="mono")
        frame = av.AudioFrame(format="s16", layout="mono", samples=8000)
        for plane in frame.planes:
            plane.update(bytes(plane.buffer_size))
        frame.sample_rate = 8000
        for second in range(70):
            frame.pts = second * 8000
            for packet in stream.encode(frame):
                out.mux(packet)
    with pytest.raises(openai.BadRequestError) as caught:
        client.audio.transcriptions.create(model="whisper-1", file=("long.wav", silence.getvalue()))
    assert caught.value.body["param"] == "file" and "60 seconds" in caught.value.body["message"]


def test_file_over_25_mb_is_413(client):
    with pytest.raises(openai.APIStatusError) as caught:
        client.audio.transcriptions.create(model="whisper-1", file=("big.wav", b"\0" * (25 * 1024 * 1024 + 1)))
    assert caught.value.status_code == 413
