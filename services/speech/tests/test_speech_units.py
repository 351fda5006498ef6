from __future__ import annotations

import io

import av
import numpy as np
import pytest

from modelplex.v1 import catalog_pb2, speech_pb2
from modelplex_kit.errors import ServiceError
from modelplex_kit.modalities.speech import check_speech_request
from modelplex_speech.adapters.espeak import split_speed
from modelplex_speech.audio import FORMATS, Encoder
from modelplex_speech.sentences import sentences

CAPS = catalog_pb2.Capabilities(
    speech=catalog_pb2.SpeechCapabilities(voices=["en-us"], voice_aliases={"alloy": "en-us"}, max_input_chars=10)
)


def test_sentences_split_and_cut_long_runs():
    assert sentences('Hi there. "Fine!" he said.\n\nNext') == ["Hi there.", '"Fine!"', "he said.", "Next"]
    assert all(len(part) <= 400 for part in sentences("word " * 300))


def test_speed_beyond_espeak_is_left_to_tempo():
    assert split_speed(1.0) == (175, 1.0)
    wpm, rest = split_speed(0.25)
    assert wpm == 80 and rest == pytest.approx(0.25 * 175 / 80)


def test_alias_resolved_and_unknown_voice_lists_valid_ones():
    request = speech_pb2.SynthesizeRequest(input="Hello", voice="alloy")
    check_speech_request(request, CAPS)
    assert request.voice == "en-us"
    with pytest.raises(ServiceError) as caught:
        check_speech_request(speech_pb2.SynthesizeRequest(input="Hello", voice="x"), CAPS)
    assert caught.value.param == "voice" and "en-us, alloy" in caught.value.message
    with pytest.raises(ServiceError) as caught:
        check_speech_request(speech_pb2.SynthesizeRequest(input="x" * 11, voice="alloy"), CAPS)
    assert caught.value.param == "input"


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f != "pcm"])
def test_encoder_streams_decodable_audio(fmt):
    tone = (np.sin(np.arange(22050) / 22050 * 2 * np.pi * 440) * 8000).astype(np.int16)
    encoder = Encoder(fmt, 22050)
    first = encoder.encode(tone[:11025])
    data = first + encoder.encode(tone[11025:]) + encoder.finish()
    assert first  # bytes leave before the end
    with av.open(io.BytesIO(data)) as container:
        samples = sum(frame.samples for frame in container.decode(audio=0))
        rate = container.streams.audio[0].rate
    assert samples / rate == pytest.approx(1.0, abs=0.1)


class Tone:
    """An engine that speaks every sentence as a short tone, one chunk per sentence."""

    capabilities = catalog_pb2.SpeechCapabilities(voices=["en-us"], max_input_chars=4096)
    sample_rate = 24_000

    async def synthesize(self, text, *, voice, speed, instructions):
        yield (np.sin(np.arange(self.sample_rate // 2) / 10) * 8000).astype(np.int16)

    async def close(self) -> None:
        return None


async def test_each_streamed_chunk_says_how_much_input_it_has_begun():
    from modelplex_speech.servicer import SpeechServicer

    text = "The first sentence is here. A second one follows it. And a third closes the text."
    request = speech_pb2.SynthesizeRequest(input=text, voice="en-us", response_format="pcm")
    messages = [m async for m in SpeechServicer(Tone()).Synthesize(request, None)]
    begun = [m.characters_so_far for m in messages]
    # What the edge meters if the stream is cut after each message: growing, sentence by sentence.
    assert begun == sorted(begun) and len(set(begun)) == 3 and 0 < begun[0] < len(text)
    assert messages[-1].characters == begun[-1] == len(text)
