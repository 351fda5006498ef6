from __future__ import annotations

import io

import av
import pytest

from modelplex.v1 import catalog_pb2, transcription_pb2
from modelplex_kit.errors import ServiceError
from modelplex_transcription.decode import AudioSource, Limits
from modelplex_transcription.engine import Finished


def _wav(seconds: int, rate: int = 8000) -> bytes:
    out_file = io.BytesIO()
    with av.open(out_file, "w", format="wav") as out:
        stream = out.add_stream("pcm_s16le", rate=rate, layout="mono")
        frame = av.AudioFrame(format="s16", layout="mono", samples=rate)
        for plane in frame.planes:
            plane.update(bytes(plane.buffer_size))
        frame.sample_rate = rate
        for second in range(seconds):
            frame.pts = second * rate
            for packet in stream.encode(frame):
                out.mux(packet)
    return out_file.getvalue()


def test_resampled_to_16k_in_chunks():
    source = AudioSource(_wav(3), "a.wav", Limits(10, 30))
    chunks = list(source.chunks())
    assert len(chunks) > 1 and sum(map(len, chunks)) == pytest.approx(48000, abs=200)
    assert source.seconds == pytest.approx(3.0, abs=0.02)


@pytest.mark.parametrize(("data", "words"), [(b"garbage" * 100, "Could not decode"), (_wav(20), "longer than 10")])
def test_bad_files_are_400_naming_file(data, words):
    with pytest.raises(ServiceError) as caught:
        AudioSource(data, "a.wav", Limits(10, 30)).decode_all()
    assert caught.value.param == "file" and words in caught.value.message


class UntimedSegments:
    """An engine that streams one text-only segment (no times, as streamed upstreams send) per chunk."""

    capabilities = catalog_pb2.TranscriptionCapabilities()

    async def transcribe(self, request, audio, *, incremental=False):
        for _ in audio.chunks():
            yield transcription_pb2.TranscriptSegment(text="word ")
        yield Finished(language="en", duration_seconds=audio.seconds)


async def test_each_streamed_delta_says_how_much_audio_was_handled_so_far():
    from modelplex_transcription.servicer import TranscriptionServicer

    servicer = TranscriptionServicer(UntimedSegments(), Limits(max_audio_seconds=3600, decode_timeout_seconds=60))
    request = transcription_pb2.TranscribeRequest(audio=_wav(30), filename="a.wav")
    messages = [m async for m in servicer.TranscribeStream(request, None)]
    so_far = [m.seconds_so_far for m in messages[:-1]]
    # What the edge meters if the stream is cut after each delta: growing, up to the whole file.
    assert len(so_far) >= 2 and so_far == sorted(so_far) and 0 < so_far[0] < 30
    whole = messages[-1].done.duration_seconds
    assert whole == pytest.approx(30, abs=0.1) and whole >= so_far[-1]
