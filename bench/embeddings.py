"""Embeddings throughput and the latency the platform adds (all-MiniLM-L6-v2, local engine, CPU).

Starts the real stack (catalog, embeddings backend, edge) twice, with micro-batching
on and off, and drives POST /v1/embeddings over HTTP at concurrency 1 and 32 (one
short sentence per request); then calls the engine in-process for the baseline.
Prints a markdown section: ``python -m bench.embeddings [--requests 256]``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import yaml

from modelplex.v1 import embeddings_pb2 as pb
from modelplex_embeddings.adapters.local import LocalEngine
from modelplex_embeddings.settings import LocalSettings
from modelplex_kit.devstack import Stack, free_port

KEY = "sk-modelplex-bench"
SENTENCE = "Micro-batching merges concurrent requests into one forward pass."


def _catalog(tmp: Path, batching: bool) -> Path:
    settings = {"batching__enabled": str(batching).lower(), "batching__max_wait_ms": 2}
    model = {
        "id": "all-minilm-l6-v2",
        "modality": "embeddings",
        "backend": f"127.0.0.1:{free_port()}",
        "engine": {"kind": "local", "settings": settings},
        "capabilities": {"dimensions": 384, "max_input_tokens": 256},
        "created": 1630281600,
    }
    path = tmp / f"catalog-{batching}.yaml"
    path.write_text(yaml.safe_dump({"models": [model]}))
    return path


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _drive(base_url: str, concurrency: int, requests: int) -> tuple[float, list[float]]:
    latencies: list[float] = []
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "all-minilm-l6-v2", "input": SENTENCE, "encoding_format": "float"}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=120) as client:
        await client.post("/embeddings", json=body)  # warm-up
        left = iter(range(requests))

        async def worker() -> None:
            for _ in left:
                start = time.perf_counter()
                response = await client.post("/embeddings", json=body)
                response.raise_for_status()
                latencies.append(time.perf_counter() - start)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - start, latencies


async def _direct(requests: int) -> list[float]:
    engine = LocalEngine(LocalSettings())
    inputs = [pb.EmbedInput(text=SENTENCE)]
    await engine.embed(engine.prepare(inputs))
    latencies = []
    for _ in range(requests):
        start = time.perf_counter()
        await engine.embed(engine.prepare(inputs))
        latencies.append(time.perf_counter() - start)
    await engine.close()
    return latencies


def run(requests: int) -> str:
    rows, serial = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for batching in (True, False):
            stack = Stack(
                _catalog(Path(tmp), batching),
                catalog_listen=f"127.0.0.1:{free_port()}",
                edge_port=free_port(),
                env={"MODELPLEX_DEV_API_KEY": KEY, "MODELPLEX_LOG_LEVEL": "warning"},
                log_dir=Path(tmp),
            ).start()
            try:
                for concurrency in (1, 32):
                    elapsed, latencies = asyncio.run(_drive(stack.base_url, concurrency, requests))
                    rows.append((batching, concurrency, requests / elapsed, latencies))
                    if concurrency == 1:
                        serial[batching] = latencies
            finally:
                stack.stop()
    direct = asyncio.run(_direct(requests))
    lines = [
        "## Embeddings (all-MiniLM-L6-v2, local numpy engine)",
        "",
        f"One short sentence per request, {requests} requests per row, over HTTP through the edge.",
        "",
        "| micro-batching | concurrency | requests/s | inputs/s | p50 ms | p99 ms |",
        "|---|---|---|---|---|---|",
    ]
    for batching, concurrency, rate, latencies in rows:
        p50, p99 = statistics.median(latencies) * 1e3, _percentile(latencies, 0.99) * 1e3
        lines.append(
            f"| {'on' if batching else 'off'} | {concurrency} | {rate:.0f} | {rate:.0f} | {p50:.1f} | {p99:.1f} |"
        )
    d50, d99 = statistics.median(direct) * 1e3, _percentile(direct, 0.99) * 1e3
    s50, s99 = statistics.median(serial[True]) * 1e3, _percentile(serial[True], 0.99) * 1e3
    lines += [
        "",
        "Added latency of the edge + backend hops (concurrency 1, batching on, vs the engine called in-process):",
        "",
        "| path | p50 ms | p99 ms |",
        "|---|---|---|",
        f"| engine directly | {d50:.2f} | {d99:.2f} |",
        f"| SDK-style HTTP -> edge -> gRPC backend -> engine | {s50:.2f} | {s99:.2f} |",
        f"| added by the platform | {s50 - d50:.2f} | {s99 - d99:.2f} |",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=256)
    print(run(parser.parse_args().requests))


if __name__ == "__main__":
    main()
