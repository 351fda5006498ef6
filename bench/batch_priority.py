"""make bench: interactive chat TTFT while a batch runs on the same engine, and without one.

The default laptop stack (SmolLM2 on the in-process llama.cpp engine, 8 sequence slots) behind one edge.
Interactive load: streamed chats at concurrency 4, time to the first content chunk measured by the client.
Then a batch of several hundred chat lines is created on the same model and the same interactive load is
measured again while the batch runs (the batch's lines done meanwhile are reported, so the row shows the
engine was shared). Batch lines run in the jobs process and carry x-modelplex-priority: batch: the engine gives
free slots to interactive sequences first and preempts batch sequences for waiting interactive ones.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import openai
import yaml

from modelplex_kit.devstack import Stack, free_port

KEY = "sk-bench-batches"
MODEL = "smollm2-135m-instruct"


def start(tmp: Path) -> Stack:
    model = {
        "id": MODEL,
        "modality": "text",
        "backend": f"127.0.0.1:{free_port()}",
        "engine": {"kind": "llamacpp", "settings": {"context_length": 2048}},
        "capabilities": ["chat"],
        "context_length": 2048,
    }
    catalog = tmp / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({"models": [model]}))
    env = {
        "MODELPLEX_DEV_API_KEY": KEY,
        "MODELPLEX_LOG_LEVEL": "warning",
        "MODELPLEX_EDGE_OBJECT_DIR": str(tmp / "objects"),
        "MODELPLEX_EDGE_BATCHES_STORE": "sqlite",
        "MODELPLEX_EDGE_BATCHES_SQLITE_PATH": str(tmp / "batches.sqlite3"),
    }
    return Stack(
        catalog, catalog_listen=f"127.0.0.1:{free_port()}", edge_port=free_port(), log_dir=tmp, env=env
    ).start()


async def ttft(client: openai.AsyncOpenAI, i: int, max_tokens: int) -> float:
    started = time.perf_counter()
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": f"Tell me a fact about the number {i}."}],
        max_tokens=max_tokens,
        stream=True,
    )
    first = None
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - started
    return first if first is not None else time.perf_counter() - started


async def interactive(client: openai.AsyncOpenAI, requests: int, concurrency: int, max_tokens: int) -> list[float]:
    queue = list(range(requests))
    times: list[float] = []

    async def worker() -> None:
        while queue:
            times.append(await ttft(client, queue.pop(), max_tokens))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return times


async def create_batch(client: openai.AsyncOpenAI, lines: int, max_tokens: int) -> str:
    rows = [
        {
            "custom_id": f"line-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": MODEL,
                "messages": [{"role": "user", "content": f"Describe a city, #{i}."}],
                "max_tokens": max_tokens,
            },
        }
        for i in range(lines)
    ]
    data = "".join(json.dumps(row) + "\n" for row in rows).encode()
    uploaded = await client.files.create(file=("bench.jsonl", io.BytesIO(data)), purpose="batch")
    batch = await client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    deadline = time.monotonic() + 600
    while (await client.batches.retrieve(batch.id)).request_counts.completed < 4:  # running, engine warm
        if time.monotonic() > deadline:
            raise TimeoutError("the batch did not start")
        await asyncio.sleep(0.2)
    return batch.id


async def measure(base_url: str, args: argparse.Namespace) -> dict[str, object]:
    """Interactive TTFTs alone (before the batch and after it is cancelled: the machine's own drift falls on
    both sides) and beside the running batch."""
    client = openai.AsyncOpenAI(base_url=base_url, api_key=KEY, max_retries=0, timeout=300)
    await interactive(client, 8, args.concurrency, args.max_tokens)  # warm-up
    half = args.requests // 2
    alone = await interactive(client, half, args.concurrency, args.max_tokens)
    batch_id = await create_batch(client, args.lines, args.max_tokens)
    before = (await client.batches.retrieve(batch_id)).request_counts.completed
    beside = await interactive(client, args.requests, args.concurrency, args.max_tokens)
    during = (await client.batches.retrieve(batch_id)).request_counts.completed - before
    await client.batches.cancel(batch_id)
    while (await client.batches.retrieve(batch_id)).status != "cancelled":
        await asyncio.sleep(0.2)
    alone += await interactive(client, args.requests - half, args.concurrency, args.max_tokens)
    return {"alone": alone, "beside": beside, "during": during}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--lines", type=int, default=300)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        stack = start(Path(tmp))
        try:
            results["engine priority (batch lines in the jobs process)"] = asyncio.run(measure(stack.base_url, args))
        finally:
            stack.stop()
    print("## Batches below interactive traffic\n")
    print(__doc__.split("\n\n", 1)[1].strip().replace("\n", " ") + "\n")
    print(
        f"Streamed chats, `max_tokens` {args.max_tokens}, concurrency {args.concurrency}, {args.requests} requests "
        f"alone (half before the batch, half after it is cancelled) and {args.requests} beside a running batch of "
        f"{args.lines} lines (`max_tokens` {args.max_tokens}).\n"
    )
    print(
        "| configuration | TTFT p50 alone (ms) | TTFT p50 beside the batch (ms) | ratio | p90 alone / beside (ms) "
        "| batch lines done meanwhile |"
    )
    print("|---|---|---|---|---|---|")
    for name, got in results.items():
        alone, beside = sorted(t * 1e3 for t in got["alone"]), sorted(t * 1e3 for t in got["beside"])
        p50a, p50b = statistics.median(alone), statistics.median(beside)
        p90a, p90b = alone[int(0.9 * (len(alone) - 1))], beside[int(0.9 * (len(beside) - 1))]
        print(f"| {name} | {p50a:.0f} | {p50b:.0f} | {p50b / p50a:.2f}x | {p90a:.0f} / {p90b:.0f} | {got['during']} |")


if __name__ == "__main__":
    sys.exit(main())
