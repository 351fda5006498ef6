"""make bench: batch throughput — how fast queued batch lines are run, end to end.

`make run`'s processes (catalog, a text backend, the edge, and the jobs process where there is one) with the
batch queue in SQLite and files in a directory, as `make run` keeps them; the model's engine is
bench/fast_engine.py (a canned answer: what is measured is the platform, not a model). A batch of N chat lines
is uploaded and created with the official openai SDK; the figure is lines per second from its creation to its
`completed` status (validation, the lines, the parts written, the output file), median of the runs.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import openai
import yaml

from modelplex_kit.children import tied_to_parent
from modelplex_kit.devstack import Stack, free_port

KEY = "sk-bench-jobs"
MODEL = "bench-chat"


def start(tmp: Path, engine_port: int) -> Stack:
    entry = {
        "id": MODEL,
        "modality": "text",
        "backend": f"127.0.0.1:{free_port()}",
        "engine": {
            "kind": "openai",
            "settings": {"upstream_url": f"http://127.0.0.1:{engine_port}/v1", "upstream_model": MODEL},
        },
        "capabilities": ["chat"],
        "context_length": 4096,
    }
    catalog = tmp / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({"models": [entry]}))
    env = {
        "MODELPLEX_DEV_API_KEY": KEY,
        "MODELPLEX_LOG_LEVEL": "WARNING",
        "MODELPLEX_EDGE_BATCHES_STORE": "sqlite",
        "MODELPLEX_EDGE_BATCHES_SQLITE_PATH": str(tmp / "batches.sqlite3"),
        "MODELPLEX_EDGE_RESPONSES_STORE": "sqlite",
        "MODELPLEX_EDGE_RESPONSES_SQLITE_PATH": str(tmp / "responses.sqlite3"),
        "MODELPLEX_EDGE_OBJECT_DIR": str(tmp / "objects"),
    }
    return Stack(
        catalog, catalog_listen=f"127.0.0.1:{free_port()}", edge_port=free_port(), env=env, log_dir=tmp
    ).start()


def batch_lines(n: int) -> bytes:
    lines = (
        {
            "custom_id": f"line-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": [{"role": "user", "content": f"Line {i}"}], "max_tokens": 8},
        }
        for i in range(n)
    )
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def run_batch(client: openai.OpenAI, n: int) -> float:
    upload = client.files.create(file=("lines.jsonl", io.BytesIO(batch_lines(n))), purpose="batch")
    started = time.monotonic()
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        time.sleep(0.05)
        batch = client.batches.retrieve(batch.id)
    elapsed = time.monotonic() - started
    if batch.status != "completed" or batch.request_counts.completed != n:
        raise RuntimeError(f"batch ended {batch.status}: {batch.request_counts}")
    return n / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    engine_port = free_port()
    engine = subprocess.Popen(
        [sys.executable, "-m", "bench.fast_engine", "--port", str(engine_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        **tied_to_parent(),
    )
    try:
        with tempfile.TemporaryDirectory() as tmp:
            stack = start(Path(tmp), engine_port)
            try:
                client = openai.OpenAI(base_url=stack.base_url, api_key=KEY, max_retries=0, timeout=60)
                rates = [run_batch(client, args.lines) for _ in range(args.runs)]
                processes = sorted(p.name for p in stack.processes)
            finally:
                stack.stop()
    finally:
        engine.terminate()
        engine.wait(10)
    runs = ", ".join(f"{r:.0f}" for r in rates)
    print(
        "\n".join(
            [
                "## Batch throughput: the jobs process",
                "",
                "`python -m bench.jobs`: " + __doc__.split("\n\n")[1].replace("\n", " "),
                "",
                "| where the batch worker runs | lines | lines/s (median) | runs |",
                "|---|---|---|---|",
                f"| {args.label or ', '.join(processes)} | {args.lines} | {statistics.median(rates):.0f} | {runs} |",
            ]
        )
    )


if __name__ == "__main__":
    main()
