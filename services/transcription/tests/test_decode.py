from __future__ import annotations

import io

import av
import pytest

from modelplex_kit.errors import ServiceError
from modelplex_transcription.decode import AudioSource, Limits


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
