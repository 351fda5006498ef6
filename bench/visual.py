"""Images and videos through the whole local stack (edge -> backend), measured with the official openai SDK.

- Image generation latency per size (procedural-image, png, n=1): median and p90 over --images requests.
- Video job throughput (procedural-video, 4 s clips): --videos jobs submitted at once, time until all
  completed, with the backend's worker pool at --workers; jobs/minute and seconds of video per second.

Prints a markdown section (``python -m bench.visual``; ``--write FILE`` also writes it).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import openai
import yaml

from modelplex_kit.devstack import Stack, free_port

KEY = "sk-bench-visual"
IMAGE_SIZES = ["256x256", "512x512", "1024x1024", "1024x1536", "1536x1024"]


def catalog(tmp: Path, workers: int, fps: int) -> Path:
    models = [
        {"id": "procedural-image", "modality": "images", "backend": f"127.0.0.1:{free_port()}",
         "engine": {"kind": "procedural"}, "capabilities": {"sizes": IMAGE_SIZES}, "created": 0},
        {"id": "procedural-video", "modality": "videos", "backend": f"127.0.0.1:{free_port()}",
         "engine": {"kind": "procedural", "settings": {"workers": workers, "fps": fps, "data_dir": str(tmp / "data"),
                                                         "poll_seconds": 0.05}},
         "capabilities": {}, "created": 0},
    ]
    path = tmp / "catalog.yaml"
    path.write_text(yaml.safe_dump({"models": models}))
    return path


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def bench_images(client: openai.OpenAI, requests: int) -> list[str]:
    rows = ["| size | median (ms) | p90 (ms) | PNG bytes |", "|---|---:|---:|---:|"]
    for size in IMAGE_SIZES:
        client.images.generate(model="procedural-image", prompt="warm-up", size=size)
        latencies, length = [], 0
        for i in range(requests):
            start = time.perf_counter()
            response = client.images.generate(model="procedural-image", prompt=f"a harbour at dawn {i}", size=size)
            latencies.append((time.perf_counter() - start) * 1000)
            length = len(response.data[0].b64_json) * 3 // 4
        rows.append(f"| {size} | {statistics.median(latencies):.1f} | {percentile(latencies, 0.9):.1f} | {length} |")
    return rows


def bench_videos(client: openai.OpenAI, jobs: int, size: str) -> list[str]:
    start = time.perf_counter()
    ids = [client.videos.create(model="procedural-video", prompt=f"clip {i}", seconds="4", size=size).id
           for i in range(jobs)]
    pending = set(ids)
    while pending:
        for video_id in list(pending):
            if client.videos.retrieve(video_id).status in ("completed", "failed"):
                pending.discard(video_id)
        time.sleep(0.1)
    elapsed = time.perf_counter() - start
    failed = sum(client.videos.retrieve(i).status == "failed" for i in ids)
    return [
        "| jobs | size | wall (s) | jobs/min | video s per wall s | failed |",
        "|---:|---|---:|---:|---:|---:|",
        f"| {jobs} | {size} | {elapsed:.1f} | {jobs / elapsed * 60:.1f} | {jobs * 4 / elapsed:.2f} | {failed} |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10, help="requests per size")
    parser.add_argument("--videos", type=int, default=6, help="video jobs submitted at once")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--fps", type=int, default=8)
    parser.add_argument("--video-size", default="720x1280")
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="modelplex-bench-visual-") as tmp:
        stack = Stack(catalog(Path(tmp), args.workers, args.fps), catalog_listen=f"127.0.0.1:{free_port()}",
                      edge_port=free_port(), env={"MODELPLEX_DEV_API_KEY": KEY, "MODELPLEX_LOG_LEVEL": "warning"},
                      log_dir=Path(tmp)).start()
        try:
            client = openai.OpenAI(base_url=stack.base_url, api_key=KEY, max_retries=0, timeout=300)
            image_rows = bench_images(client, args.images)
            video_rows = bench_videos(client, args.videos, args.video_size)
        finally:
            stack.stop()
    lines = [
        "## Images and videos (procedural engines, through edge and backend)",
        "",
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}. "
        "procedural-image and procedural-video are deterministic CPU renderers, not diffusion models: these "
        "figures measure the platform (HTTP, gRPC, encoding with Pillow and libx264), not model quality.",
        "",
        f"### Image generation latency (png, n=1, {args.images} requests per size, sequential)",
        "",
        *image_rows,
        "",
        f"### Video job throughput (4 s clips at {args.fps} fps, {args.workers} workers, submitted at once)",
        "",
        *video_rows,
        "",
    ]
    report = "\n".join(lines)
    print(report)
    if args.write:
        args.write.write_text(report)


if __name__ == "__main__":
    main()
