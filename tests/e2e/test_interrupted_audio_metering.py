"""Audio streams that end early are metered what they consumed: speech its characters, transcription its
seconds of audio. The real engines (espeak-ng, pocketsphinx) behind the gatekeeper sidecar; the client
hangs up after the first chunk and the usage record says how much was done and why it ended.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from modelplex_gatekeeper.keys import new_key
from tests.e2e.gatekeeper_stack import start_stack, write_keys
from tests.support import stacks
from tests.support.ports import free_port
from tests.support.until import wait_until

pytestmark = pytest.mark.e2e

KEY = new_key()
# Forty sentences: minutes of audio, spoken sentence by sentence.
LONG_TEXT = " ".join(f"Sentence number {n} is here to make the answer long." for n in range(40))


def _catalog(tmp: Path) -> Path:
    models = [
        {"id": "espeak", "modality": "speech", "backend": f"127.0.0.1:{free_port()}", "engine": {"kind": "espeak"},
         "capabilities": {"voices": ["en-us"], "voice_aliases": {"alloy": "en-us"}, "max_input_chars": 4096}},
        {"id": "pocketsphinx", "modality": "transcription", "backend": f"127.0.0.1:{free_port()}",
         "engine": {"kind": "pocketsphinx", "settings": {"max_audio_seconds": 600, "max_concurrency": 1}},
         "capabilities": {"languages": ["en"], "max_audio_seconds": 600}},
    ]
    return stacks.write_catalog(tmp, models)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("interrupted-audio")
    keys_file = tmp / "keys.yaml"
    write_keys(keys_file, {"audio": {"key": KEY, "rpm": 1000}})
    running = start_stack(_catalog(tmp), keys_file, tmp / "logs")
    running.usage_file = tmp / "usage.jsonl"  # type: ignore[attr-defined]
    yield running
    running.stop()


def _headers(request_id: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}", "x-request-id": request_id}


def _record(stack, request_id: str) -> dict:
    def mine() -> dict | None:
        path = stack.usage_file
        lines = path.read_text().splitlines() if path.exists() else []
        found = [json.loads(line) for line in lines if request_id in line]
        return found[-1] if found else None

    return wait_until(mine, 30)


def test_speech_cut_by_the_client_is_metered_the_characters_spoken(stack):
    body = {"model": "espeak", "voice": "alloy", "input": LONG_TEXT, "response_format": "pcm"}
    with httpx.Client(timeout=120) as http, http.stream(
        "POST", f"{stack.base_url}/audio/speech", json=body, headers=_headers("speech-cut")
    ) as response:
        assert response.status_code == 200, response.read()
        first = next(response.iter_bytes())
        assert first  # audio of the first sentence(s); then the client hangs up
    record = _record(stack, "speech-cut")
    assert record["unit_kind"] == "characters", record
    assert 0 < record["units"] < len(LONG_TEXT), record  # what was spoken, not nothing and not everything
    assert record["ended"] == "client_disconnect", record


@pytest.fixture(scope="module")
def long_speech(stack) -> bytes:
    body = {"model": "espeak", "voice": "alloy", "input": LONG_TEXT, "response_format": "wav"}
    answer = httpx.post(f"{stack.base_url}/audio/speech", json=body, headers=_headers("speech-whole"), timeout=300)
    assert answer.status_code == 200, answer.text
    whole = _record(stack, "speech-whole")
    assert whole["units"] == len(LONG_TEXT) and whole["ended"] == "", whole  # run to its end: all of it
    return answer.content


def test_a_streamed_transcription_cut_by_the_client_is_metered_the_seconds_heard(stack, long_speech):
    seconds = (len(long_speech) - 44) / (24_000 * 2)  # 24 kHz 16-bit mono WAV
    assert seconds > 60
    started = time.monotonic()
    with httpx.Client(timeout=300) as http, http.stream(
        "POST",
        f"{stack.base_url}/audio/transcriptions",
        files={"file": ("long.wav", long_speech, "audio/wav")},
        data={"model": "pocketsphinx", "stream": "true"},
        headers=_headers("transcription-cut"),
    ) as response:
        assert response.status_code == 200, response.read()
        delta = next(line for line in response.iter_lines() if "transcript.text.delta" in line)
        assert delta
    record = _record(stack, "transcription-cut")
    assert record["unit_kind"] == "seconds", record
    assert 0 < record["units"] < seconds, (record, seconds)  # what was heard before the hang-up
    assert record["ended"] == "client_disconnect", (record, time.monotonic() - started)
