"""LoRA adapters on the local llama.cpp engine: a cold load's cost, and a mix of adapters against the base alone.

Runs the real engine in-process (the packaged SmolLM2-135M Q4_1) with the GGUF adapters `make vllm` trains
(build/vllm-<id>/adapters: kiwi, mango; tests/support/lora_adapters.py finds them) and measures:

- time to first token of one request for an adapter not loaded yet (the engine reads its GGUF first), then
  for the same adapter loaded, and for the base, each the median of ``--repeats`` (a fresh engine per cold);
- throughput (generated tokens per second) and TTFT p50 of ``--concurrency`` requests at once, all for the
  base, then spread over the base and N adapters (each adapter is one more llama_decode per step: the engine
  batches per adapter).

    python -m bench.lora [--concurrency 8] [--max-tokens 32] [--repeats 5]

Prints a markdown section (make bench puts it in docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from modelplex.v1 import text_pb2
from modelplex_text.adapters.llamacpp import LlamaCppEngine
from modelplex_text.settings import LlamaCppSettings
from tests.support.lora_adapters import gguf_file, names

HEADING = "## LoRA adapters on the local engine"
TOPICS = ["rivers", "bread", "comets", "violins", "glaciers", "owls", "copper", "tea", "deserts", "bridges"]


def request(i: int, max_tokens: int, adapter: str = "") -> text_pb2.GenerateRequest:
    text = f"Tell me three facts about {TOPICS[i % len(TOPICS)]} (list {i})."
    message = text_pb2.ChatMessage(role="user", content=[text_pb2.ContentPart(text=text)])
    sampling = text_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0)
    req = text_pb2.GenerateRequest(model="smollm2", chat=text_pb2.ChatInput(messages=[message]), sampling=sampling)
    if adapter:
        req.adapter.CopyFrom(text_pb2.LoraAdapter(name=adapter, source=str(gguf_file(adapter)), rank=8))
    return req


async def one(engine: LlamaCppEngine, req: text_pb2.GenerateRequest) -> tuple[float, int]:
    """(seconds to the first token, tokens generated)."""
    start, first, tokens = time.perf_counter(), None, 0
    async for event in engine.stream(req):
        if isinstance(event, text_pb2.ChoiceDelta) and event.text:
            first = first or time.perf_counter()
            tokens += 1
    return (first or time.perf_counter()) - start, tokens


async def ttft(repeats: int, max_tokens: int) -> dict[str, float]:
    adapter = names()[0]
    cold, warm, base = [], [], []
    for i in range(repeats):
        engine = LlamaCppEngine(LlamaCppSettings(context_length=2048))
        try:
            await one(engine, request(i + 2, max_tokens))  # warm-up: the engine's first request pays for itself
            base.append((await one(engine, request(i, max_tokens)))[0])
            cold.append((await one(engine, request(i, max_tokens, adapter)))[0])
            warm.append((await one(engine, request(i + 1, max_tokens, adapter)))[0])
        finally:
            await engine.close()
    return {name: statistics.median(values) * 1e3 for name, values in (("base", base), ("cold", cold), ("warm", warm))}


async def mix(concurrency: int, max_tokens: int, adapters: list[str]) -> tuple[float, float]:
    """(tokens per second, TTFT p50 ms) of ``concurrency`` requests over the base and ``adapters`` in turn."""
    engine = LlamaCppEngine(LlamaCppSettings(context_length=2048))
    try:
        spread = ["", *adapters]
        for adapter in adapters:  # loaded first: this measures batching, not loading
            await one(engine, request(0, 1, adapter))
        started = time.perf_counter()
        results = await asyncio.gather(
            *(one(engine, request(i, max_tokens, spread[i % len(spread)])) for i in range(concurrency))
        )
        wall = time.perf_counter() - started
    finally:
        await engine.close()
    return sum(tokens for _, tokens in results) / wall, statistics.median(t for t, _ in results) * 1e3


async def main(args: argparse.Namespace) -> str:
    cold = await ttft(args.repeats, args.max_tokens)
    rows = []
    adapters = names()
    for count in range(len(adapters) + 1):
        rate, p50 = await mix(args.concurrency, args.max_tokens, adapters[:count])
        rows.append((count, rate, p50))
    base_rate = rows[0][1]
    lines = [
        HEADING,
        "",
        f"`python -m bench.lora` (SmolLM2-135M Q4_1 on the llama.cpp engine, the rank-8 GGUF adapters `make vllm` "
        f"trains; {args.max_tokens} tokens per request, medians of {args.repeats}).",
        "",
        "| first request | TTFT (ms) |",
        "|---|---|",
        f"| base model | {cold['base']:.0f} |",
        f"| adapter, cold (its GGUF loaded first) | {cold['cold']:.0f} |",
        f"| adapter, loaded | {cold['warm']:.0f} |",
        "",
        f"{args.concurrency} requests at once, spread evenly over the base and N adapters:",
        "",
        "| adapters | tokens/s | vs base alone | TTFT p50 (ms) |",
        "|---|---|---|---|",
    ]
    lines += [f"| {n} | {rate:.0f} | {rate / base_rate:.2f}x | {p50:.0f} |" for n, rate, p50 in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    print(asyncio.run(main(parser.parse_args())))
