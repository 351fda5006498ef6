"""Audio figures for `make bench`: time to the first audio byte of /v1/audio/speech (p50) and the
realtime factor of /v1/audio/transcriptions, on the local engines, through the real stack and the openai SDK.

    python -m bench.audio            # prints a markdown section
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import openai
import yaml

from modelplex_kit.devstack import Stack
from tests.support.ports import free_port

KEY = "sk-modelplex-bench"
TEXT = "Please call me tomorrow morning. The weather is nice today. I would like a cup of coffee."


def _catalog(tmp: Path) -> Path:
    source = Path(__file__).resolve().parents[1] / "services/catalog/modelplex_catalog/catalog.yaml"
    models = [m for m in yaml.safe_load(source.read_text())["models"] if m["modality"] in ("speech", "transcription")]
    for model in models:
        model["backend"] = f"127.0.0.1:{free_port()}"
    path = tmp / "catalog.yaml"
    path.write_text(yaml.safe_dump({"models": models}))
    return path


def main(runs: int = 20) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        stack = Stack(
            _catalog(Path(tmp)),
            catalog_listen=f"127.0.0.1:{free_port()}",
            edge_port=free_port(),
            env={"MODELPLEX_DEV_API_KEY": KEY},
            log_dir=Path(tmp),
        ).start()
        try:
            client = openai.OpenAI(base_url=stack.base_url, api_key=KEY, max_retries=0)
            first_byte, audio = [], b""
            for _ in range(runs):
                start = time.perf_counter()
                with client.audio.speech.with_streaming_response.create(
                    model="tts-1", voice="alloy", input=TEXT, response_format="mp3"
                ) as response:
                    chunks = response.iter_bytes()
                    audio = next(chunks)
                    first_byte.append(time.perf_counter() - start)
                    audio += b"".join(chunks)
            factors = []
            for _ in range(max(3, runs // 4)):
                start = time.perf_counter()
                result = client.audio.transcriptions.create(
                    model="whisper-1", file=("speech.mp3", audio), response_format="verbose_json"
                )
                factors.append((time.perf_counter() - start) / result.duration)
        finally:
            stack.stop()
    print("## Audio (local engines)\n")
    print("| Figure | Value |\n|---|---|")
    ttfb, rtf = statistics.median(first_byte) * 1000, statistics.median(factors)
    print(f"| Speech time to first audio byte, p50 ({runs} runs, mp3, 3 sentences) | {ttfb:.0f} ms |")
    print(f"| Transcription realtime factor, median (pocketsphinx, {result.duration:.1f} s of audio) | {rtf:.2f} |")


if __name__ == "__main__":
    main()
