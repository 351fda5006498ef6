"""Every backend's memory under its largest legal and illegal requests: bounded, and nothing kept.

Each backend runs as its real process (``python -m modelplex_<name>``, as ``make run`` starts it) and
is called over gRPC. Each case sends its request ``repeats`` times and reads the process's resident
memory (VmRSS in /proc/PID/status) after each answer. Two bounds, asserted per case:

- **Growth over the warmed-up process <= the case's ``budget_mb``.** What a finished request may
  leave resident: allocator caches, the largest buffers of one such request, numpy/PyAV pools. The
  budgets are about twice what was measured (see each case), so a loaded machine does not fail them,
  and well below what the defect cost: the embeddings backend grew ~200 MB *per* refused request of
  2048 inputs x 600 words (183 MB -> 1.1 GB after three in the issue's probe, ~3 GB after seven).
- **No accumulation: the lowest reading over the second half of the repetitions <= the lowest over
  the first half + ``ACCUMULATION_MB``** (60 for the 24 MB uploads, whose copies jitter the reading).
  A refused or finished request must release what it held, so the floor must not rise request after
  request; comparing floors, not two single readings, keeps allocator noise out. The first answer of
  a case is left out of the floors: the first request of a size fills whichever of the backend's two
  malloc arenas its gRPC thread took, the next one may fill the other (a fresh clone's run read 25
  MB after the first of 64 x 220 KB, then 62 and 60), and that is warm-up, not accumulation. RSS is
  read once it stops moving after each answer.

The requests are the largest each backend accepts within a test's time (the context, input count,
characters, audio seconds, image and video sizes of the settings below) and the largest it must
refuse (message sizes up to the gRPC limit, counts and lengths beyond the model's).
"""

from __future__ import annotations

import io
import math
import os
import random
import subprocess
import sys
import time
import wave
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelplex.v1 import (
    common_pb2,
    embeddings_pb2,
    embeddings_pb2_grpc,
    images_pb2,
    images_pb2_grpc,
    speech_pb2,
    speech_pb2_grpc,
    text_pb2,
    text_pb2_grpc,
    transcription_pb2,
    transcription_pb2_grpc,
    videos_pb2,
    videos_pb2_grpc,
)
from tests.support.ports import free_port
from tests.support.until import wait_until

pytestmark = pytest.mark.integration

ACCUMULATION_MB = 30
# Large enough for the largest refused requests (the backends' own limit is 32 MiB).
CHANNEL_OPTIONS = [("grpc.max_send_message_length", 40 << 20), ("grpc.max_receive_message_length", 64 << 20)]
META = common_pb2.RequestMeta(principal_id="key_memory_test", request_id="memory")
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex".split()  # noqa: SIM905


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def prose(words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words))


def wav(seconds: float, rate: int = 16000) -> bytes:
    """A tone with a little noise: real audio for a decoder to chew on."""
    rng = random.Random(1)
    frames = bytearray()
    for i in range(int(seconds * rate)):
        sample = 6000 * math.sin(2 * math.pi * 220 * i / rate) + rng.randint(-800, 800)
        frames += int(sample).to_bytes(2, "little", signed=True)
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(bytes(frames))
    return buffer.getvalue()


def refused(call: Callable[[], object], code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT) -> None:
    with pytest.raises(grpc.RpcError) as error:
        call()
    assert error.value.code() == code, error.value.details()


@dataclass
class Backend:
    module: str
    env: dict[str, str]
    process: subprocess.Popen | None = None
    target: str = ""
    channel: grpc.Channel | None = None
    baseline_mb: float = 0.0

    def start(self, logs: Path) -> None:
        self.target = f"127.0.0.1:{free_port()}"
        prefix = "MODELPLEX_" + self.module.removeprefix("modelplex_").upper() + "_"
        env = {**os.environ, **self.env, f"{prefix}LISTEN": self.target, "MODELPLEX_LOG_LEVEL": "warning"}
        log = open(logs / f"{self.module}.log", "a")  # noqa: SIM115 - the process writes to it until stop()
        # No preexec_fn (tied_to_parent's): this pytest process has gRPC threads by now, and Python code
        # run between fork and exec in a threaded parent can abort the child (two backends died with
        # SIGABRT while starting, in one of five runs, with empty logs). Its own process group; stop() ends it.
        self.process = subprocess.Popen(
            [sys.executable, "-m", self.module], env=env, stdout=log, stderr=subprocess.STDOUT, process_group=0
        )
        self.channel = grpc.insecure_channel(self.target, options=CHANNEL_OPTIONS)
        health = health_pb2_grpc.HealthStub(self.channel)

        def serving() -> bool:
            assert self.process.poll() is None, f"{self.module} died while starting (see {log.name})"
            try:
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
            except grpc.RpcError:
                return False
            return status == health_pb2.HealthCheckResponse.SERVING

        wait_until(serving, timeout=180, interval=0.2)

    def stop(self) -> None:
        if self.channel is not None:
            self.channel.close()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()

    @property
    def rss_mb(self) -> float:
        assert self.process is not None and self.process.poll() is None, f"{self.module} died"
        return rss_mb(self.process.pid)

    def settled_rss_mb(self) -> float:
        """RSS once it stops moving (the call's buffers are freed just after its answer is sent)."""
        readings = [self.rss_mb]

        def steady() -> bool:
            readings.append(self.rss_mb)
            return abs(readings[-1] - readings[-2]) < 2

        try:
            wait_until(steady, timeout=5, interval=0.2)
        except AssertionError:
            pass  # still moving after 5 s: take the last reading; the bounds judge it
        return readings[-1]


@dataclass(frozen=True)
class Case:
    backend: str
    name: str
    send: Callable[[grpc.Channel, int], None]  # one request (the repetition number varies its content)
    budget_mb: float
    repeats: int = 4
    # Uploads of 24 MB: one request's copies (gRPC's buffer, the bytes, the decoder's) come and go
    # between readings, so the reading jitters by about two of them; a leak of one copy per request
    # still shows (4 x 24 MB over the repetitions compared).
    accumulation_mb: float = ACCUMULATION_MB


# -- the requests ------------------------------------------------------------------------------------


def text_request(prompt: str, max_tokens: int) -> text_pb2.GenerateRequest:
    return text_pb2.GenerateRequest(
        meta=META,
        model="smollm2",
        completion=text_pb2.CompletionInput(prompt=prompt),
        sampling=text_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0),
    )


def text_longest_prompt(channel: grpc.Channel, n: int) -> None:
    # Most of a 512-token context, different each time (no prompt-cache hit).
    answer = text_pb2_grpc.TextGenerationServiceStub(channel).Generate(
        text_request(f"{n} " + prose(420, seed=n), 4), timeout=300
    )
    assert 400 < answer.usage.prompt_tokens <= 508


def text_prompt_over_the_context(channel: grpc.Channel, n: int) -> None:
    stub = text_pb2_grpc.TextGenerationServiceStub(channel)
    # ~8 MB; the context check's status is OUT_OF_RANGE (the edge's 400 context_length_exceeded).
    refused(lambda: stub.Generate(text_request(prose(1_500_000, seed=n), 4), timeout=300), grpc.StatusCode.OUT_OF_RANGE)


def embed_request(texts: list[str]) -> embeddings_pb2.EmbedRequest:
    return embeddings_pb2.EmbedRequest(
        meta=META, model="minilm", inputs=[embeddings_pb2.EmbedInput(text=t) for t in texts]
    )


def embed_longest_legal_texts(channel: grpc.Channel, n: int) -> None:
    # 64 inputs of 220 KB (14 MB, near the edge's 16 MiB body limit): long in characters but few
    # tokens, so the message, the text copies and the tokenizer's work are the largest a legal
    # request brings while the forward pass (~25 MFLOP a token on one thread) stays short.
    texts = [" " * 220_000 + f"input {i} of request {n}" for i in range(64)]
    answer = embeddings_pb2_grpc.EmbeddingsServiceStub(channel).Embed(embed_request(texts), timeout=300)
    assert len(answer.embeddings) == 64


def embed_2048_over_long_inputs(channel: grpc.Channel, n: int) -> None:
    # The request: 2048 inputs of 600 words (7.6 MB), each over the 256-token limit.
    stub = embeddings_pb2_grpc.EmbeddingsServiceStub(channel)
    refused(lambda: stub.Embed(embed_request([prose(600, seed=n * 4096 + i) for i in range(2048)]), timeout=300))


def embed_one_huge_input(channel: grpc.Channel, n: int) -> None:
    stub = embeddings_pb2_grpc.EmbeddingsServiceStub(channel)
    refused(lambda: stub.Embed(embed_request([prose(1_500_000, seed=n)]), timeout=300))  # ~8 MB, one input


def speech_request(text: str) -> speech_pb2.SynthesizeRequest:
    return speech_pb2.SynthesizeRequest(meta=META, model="espeak-ng", input=text, voice="en-us", response_format="mp3")


def speech_longest_input(channel: grpc.Channel, n: int) -> None:
    text = prose(1000, seed=n)[:4096]  # max_input_chars
    chunks = list(speech_pb2_grpc.SpeechServiceStub(channel).Synthesize(speech_request(text), timeout=300))
    assert sum(len(c.audio) for c in chunks) > 100_000 and chunks[-1].characters == len(text)


def speech_input_over_the_limit(channel: grpc.Channel, n: int) -> None:
    stub = speech_pb2_grpc.SpeechServiceStub(channel)
    refused(lambda: list(stub.Synthesize(speech_request(prose(1_500_000, seed=n)), timeout=300)))


def transcribe_request(audio: bytes, name: str = "a.wav") -> transcription_pb2.TranscribeRequest:
    return transcription_pb2.TranscribeRequest(
        meta=META, model="pocketsphinx-en-us", audio=audio, filename=name, mime_type="audio/wav"
    )


LONGEST_AUDIO_SECONDS = 10


def transcribe_longest_audio(channel: grpc.Channel, n: int) -> None:
    audio = wav(LONGEST_AUDIO_SECONDS)
    answer = transcription_pb2_grpc.TranscriptionServiceStub(channel).Transcribe(transcribe_request(audio), timeout=300)
    assert answer.duration_seconds == pytest.approx(LONGEST_AUDIO_SECONDS, abs=0.1)


def transcribe_audio_over_the_limit(channel: grpc.Channel, n: int) -> None:
    # 24 MB (under the 25 MB file limit): 12.5 minutes, 75 times the backend's max_audio_seconds.
    stub = transcription_pb2_grpc.TranscriptionServiceStub(channel)
    refused(lambda: stub.Transcribe(transcribe_request(_LONG_WAV()), timeout=300))


def transcribe_corrupt_file(channel: grpc.Channel, n: int) -> None:
    stub = transcription_pb2_grpc.TranscriptionServiceStub(channel)
    garbage = random.Random(n).randbytes(24 << 20)
    refused(lambda: stub.Transcribe(transcribe_request(garbage, "a.mp3"), timeout=300))


def _cached(make: Callable[[], bytes]) -> Callable[[], bytes]:
    value: list[bytes] = []
    return lambda: value[0] if value else (value.append(make()) or value[0])


_LONG_WAV = _cached(lambda: wav(750))


def images_request(**fields) -> images_pb2.GenerateImagesRequest:
    base = {"meta": META, "model": "procedural-image", "prompt": "a lighthouse at dusk", "n": 1}
    return images_pb2.GenerateImagesRequest(**(base | {"width": 1024, "height": 1024, "output_format": "png"} | fields))


def images_most_and_largest(channel: grpc.Channel, n: int) -> None:
    answer = images_pb2_grpc.ImagesServiceStub(channel).GenerateImages(
        images_request(n=10, width=1536, height=1024, seed=n), timeout=300
    )
    assert len(answer.images) == 10


def images_prompt_over_the_limit(channel: grpc.Channel, n: int) -> None:
    stub = images_pb2_grpc.ImagesServiceStub(channel)
    refused(lambda: stub.GenerateImages(images_request(prompt=prose(1_500_000, seed=n)), timeout=300))


def images_too_many(channel: grpc.Channel, n: int) -> None:
    stub = images_pb2_grpc.ImagesServiceStub(channel)
    refused(lambda: stub.GenerateImages(images_request(n=100_000, width=1536, height=1024), timeout=300))


def video_finished(stub, job_id: str, timeout: float = 240) -> videos_pb2.VideoJob:
    def finished() -> videos_pb2.VideoJob | None:
        current = stub.GetVideo(videos_pb2.GetVideoRequest(meta=META, video_id=job_id), timeout=30)
        done = (videos_pb2.VIDEO_STATUS_COMPLETED, videos_pb2.VIDEO_STATUS_FAILED)
        return current if current.status in done else None

    return wait_until(finished, timeout=timeout, interval=0.5)


def videos_largest(channel: grpc.Channel, n: int) -> None:
    stub = videos_pb2_grpc.VideosServiceStub(channel)
    job = stub.CreateVideo(
        videos_pb2.CreateVideoRequest(
            meta=META, model="procedural-video", prompt=f"waves {n}", width=1792, height=1024, seconds=12, seed=n
        ),
        timeout=60,
    )
    done = video_finished(stub, job.id)
    assert done.status == videos_pb2.VIDEO_STATUS_COMPLETED, done.error_message
    content = stub.DownloadVideoContent(videos_pb2.DownloadVideoContentRequest(meta=META, video_id=job.id), timeout=60)
    assert sum(len(chunk.data) for chunk in content) > 10_000


def videos_prompt_over_the_limit(channel: grpc.Channel, n: int) -> None:
    stub = videos_pb2_grpc.VideosServiceStub(channel)
    request = videos_pb2.CreateVideoRequest(
        meta=META, model="procedural-video", prompt=prose(1_500_000, seed=n), width=1280, height=720, seconds=4
    )
    refused(lambda: stub.CreateVideo(request, timeout=60))


def videos_24_mb_reference_that_is_no_image(channel: grpc.Channel, n: int) -> None:
    # The backend takes the reference as uploaded (it is looked at when the job renders): the job is
    # created, held (24 MB), rendered or failed, and everything it held must go.
    stub = videos_pb2_grpc.VideosServiceStub(channel)
    request = videos_pb2.CreateVideoRequest(
        meta=META,
        model="procedural-video",
        prompt=f"waves {n}",
        width=1280,
        height=720,
        seconds=4,
        input_reference=random.Random(n).randbytes(24 << 20),
        input_reference_mime_type="image/png",
    )
    video_finished(stub, stub.CreateVideo(request, timeout=60).id)


# -- the backends and cases ------------------------------------------------------------------------

BACKENDS = {
    "text": Backend("modelplex_text", {"MODELPLEX_TEXT_CONTEXT_LENGTH": "512", "MODELPLEX_TEXT_PARALLEL": "2"}),
    "embeddings": Backend("modelplex_embeddings", {}),
    "speech": Backend("modelplex_speech", {}),
    "transcription": Backend(
        "modelplex_transcription", {"MODELPLEX_TRANSCRIPTION_MAX_AUDIO_SECONDS": str(LONGEST_AUDIO_SECONDS)}
    ),
    "images": Backend("modelplex_images", {}),
    # 2 frames a second: the largest size and length, rendered in a test's time.
    "videos": Backend("modelplex_videos", {"MODELPLEX_VIDEOS_FPS": "2"}),
}

CASES = [
    # Budgets: about twice the growth measured on a loaded 2-core machine (in the comment), rounded up.
    Case("text", "longest prompt", text_longest_prompt, budget_mb=100),  # 22
    Case("text", "8 MB prompt over the context", text_prompt_over_the_context, budget_mb=200),
    Case("embeddings", "64 inputs of 220 KB", embed_longest_legal_texts, budget_mb=200),  # 85
    Case("embeddings", "2048 inputs over 256 tokens", embed_2048_over_long_inputs, budget_mb=200, repeats=5),  # 94
    Case("embeddings", "one 8 MB input", embed_one_huge_input, budget_mb=200),  # 94
    Case("speech", "4096 characters", speech_longest_input, budget_mb=100),  # 8
    Case("speech", "8 MB input", speech_input_over_the_limit, budget_mb=100),  # 29
    Case("transcription", "10 s of audio", transcribe_longest_audio, budget_mb=100),
    Case("transcription", "24 MB, 12 minutes of audio", transcribe_audio_over_the_limit, budget_mb=400, repeats=5,
         accumulation_mb=60),  # ~90
    Case("transcription", "24 MB corrupt file", transcribe_corrupt_file, budget_mb=400, repeats=6,
         accumulation_mb=60),  # ~95
    Case("images", "10 images of 1536x1024", images_most_and_largest, budget_mb=250),  # 123
    Case("images", "8 MB prompt", images_prompt_over_the_limit, budget_mb=250),
    Case("images", "n=100000", images_too_many, budget_mb=250),
    Case("videos", "12 s of 1792x1024", videos_largest, budget_mb=300),
    Case("videos", "8 MB prompt", videos_prompt_over_the_limit, budget_mb=300),
    Case(
        "videos", "24 MB input_reference, not an image", videos_24_mb_reference_that_is_no_image, budget_mb=300,
        repeats=6, accumulation_mb=60,
    ),
]


@pytest.fixture(scope="module")
def backends(tmp_path_factory) -> Iterator[Callable[[str], Backend]]:
    started: dict[str, Backend] = {}
    logs = tmp_path_factory.mktemp("memory")

    def get(name: str) -> Backend:
        if name not in started:
            backend = BACKENDS[name]
            backend.start(logs)
            started[name] = backend
            backend.baseline_mb = backend.rss_mb
        return started[name]

    yield get
    for backend in started.values():
        backend.stop()


@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", CASES, ids=[f"{c.backend}: {c.name}" for c in CASES])
def test_memory_is_bounded_and_released_request_after_request(backends, case: Case):
    backend = backends(case.backend)
    after: list[float] = []
    started = time.monotonic()
    for n in range(case.repeats):
        case.send(backend.channel, n)
        after.append(backend.settled_rss_mb())
    growth = [round(mb - backend.baseline_mb) for mb in after]
    report = f"{case.backend} {case.name}: baseline {backend.baseline_mb:.0f} MB, growth {growth} MB"
    print(f"{report} ({time.monotonic() - started:.1f} s)")
    assert max(after) - backend.baseline_mb <= case.budget_mb, report
    # Accumulation: the floor rises request after request. One sample against another is allocator noise
    # (a 24 MB case swung 27-88 MB between repeats with no trend); the lows of each half are not.
    warm = after[1:]  # the first answer warms the arenas (module docstring)
    half = max(1, len(warm) // 2)
    assert min(warm[half:]) - min(warm[:half]) <= case.accumulation_mb, report
