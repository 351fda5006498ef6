"""Per-token cost of constrained decoding (llguidance) with the SmolLM2 vocabulary.

For each schema, a valid output is replayed token by token through a fresh
matcher, as the llama.cpp adapter does while generating: the token mask is
computed (llguidance, fuel-bounded), applied to a logits vector (numpy), then
the token is consumed. Prints a markdown table of compile time and per-token
p50/p99 in microseconds.

    .venv/bin/python -m bench.constrained_decoding [--rounds 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from modelplex_text.constraints import ConstraintCompiler, LogitsMask
from modelplex_text.prompting import OutputConstraint

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "email": {"type": "string", "format": "email"},
        "hobbies": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
    },
    "required": ["name", "age", "email", "hobbies"],
}
WEATHER_CALL = {
    "type": "object",
    "properties": {"name": {"const": "get_weather"}, "arguments": WEATHER},
    "required": ["name", "arguments"],
}
PERSON_TEXT = '{"name": "Ada Lovelace", "age": 36, "email": "ada@example.org", "hobbies": ["math", "poetry"]}'
CALL_TEXT = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'

# name, constraint, an output it accepts
CASES = [
    ("json_object", OutputConstraint("json_object"), '{"name": "Tom", "color": "grey", "age": 3}'),
    ("json_schema: person (format, array)", OutputConstraint("json_schema", PERSON), PERSON_TEXT),
    ("tool_call (forced)", OutputConstraint("tool_call", WEATHER_CALL, (0,)), CALL_TEXT),
    (
        "tool_call_or_text: prose",
        OutputConstraint("tool_call_or_text", WEATHER_CALL, (0,)),
        "The weather in Paris is mild today, around 18 degrees with light wind from the west.",
    ),
    (
        "tool_call_or_text: call",
        OutputConstraint("tool_call_or_text", WEATHER_CALL, (0,)),
        f"<tool_call>{CALL_TEXT}</tool_call>",
    ),
    (
        "enum of 1000 values",
        OutputConstraint("json_schema", {"enum": [f"item-{i:04d}" for i in range(1000)]}),
        '"item-0777"',
    ),
    (
        "pattern (a+)+$ (pathological)",
        OutputConstraint("json_schema", {"type": "string", "pattern": "^(a+)+$"}),
        '"' + "a" * 40 + '"',
    ),
    (
        "pattern ^(a|aa)*b$ (ambiguous)",
        OutputConstraint("json_schema", {"type": "string", "pattern": "^(a|aa)*b$"}),
        '"' + "a" * 40 + 'b"',
    ),
]


def measure(compiler: ConstraintCompiler, constraint: OutputConstraint, text: str, rounds: int) -> dict[str, float]:
    started = time.perf_counter()
    compiled = compiler.compile(constraint)
    compile_ms = (time.perf_counter() - started) * 1e3
    tokens = compiler.tokenizer.tokenize_str(text)
    mask_us, step_us, first_us = [], [], []
    for round_ in range(rounds + 1):
        mask = LogitsMask(compiled.matcher())
        logits = np.zeros(compiler.tokenizer.vocab_size, dtype=np.single)
        prompt = np.array([1], dtype=np.intc)
        for i in range(len(tokens) + 1):  # +1: the final mask, where only EOS is allowed
            ids = np.concatenate([prompt, np.array(tokens[:i], dtype=np.intc)])
            logits.fill(0.0)
            begun = time.perf_counter()
            mask(ids, logits)
            (step_us if round_ else first_us).append((time.perf_counter() - begun) * 1e6)
            if mask.error is not None:
                raise mask.error
        if round_:  # the first replay builds lexer states lazily: reported apart, as "first"
            mask_us += [s * 1e6 for s in mask.matcher.mask_seconds]
        assert mask.matcher.is_accepting(), "the sample output must be accepted"
    return {
        "tokens": len(tokens),
        "compile_ms": compile_ms,
        "first_max": max(first_us),
        "mask_p50": statistics.median(mask_us),
        "mask_p99": _p99(mask_us),
        "step_p50": statistics.median(step_us),
        "step_p99": _p99(step_us),
    }


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20, help="replays of each output (default 20)")
    args = parser.parse_args()

    from llama_cpp import Llama

    from modelplex_text import gguf

    started = time.perf_counter()
    compiler = ConstraintCompiler.for_llama(
        Llama(model_path=str(gguf.packaged_smollm2()), vocab_only=True, verbose=False)
    )
    setup_ms = (time.perf_counter() - started) * 1e3
    print(f"### Constrained decoding (llguidance, SmolLM2 vocabulary of {compiler.tokenizer.vocab_size} tokens)\n")
    print(f"Tokenizer set-up (once per model): {setup_ms:.0f} ms. Compile: first use of a schema (then cached).")
    print("First pass: the slowest step while the first output is replayed (llguidance builds lexer states")
    print("lazily, then shares them). Then, over the next replays, per token: the mask alone, and the whole")
    print("logits-processor step (consume the sampled token, compute the mask, apply it to the logits).\n")
    columns = ["schema", "tokens", "compile (ms)", "first pass max (µs)", "mask p50 (µs)", "mask p99 (µs)"]
    print("| " + " | ".join([*columns, "step p50 (µs)", "step p99 (µs)"]) + " |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, constraint, text in CASES:
        r = measure(compiler, constraint, text, args.rounds)
        cell = name.replace("|", "\\|")  # markdown
        print(
            f"| {cell} | {r['tokens']} | {r['compile_ms']:.1f} | {r['first_max']:.0f} "
            f"| {r['mask_p50']:.0f} | {r['mask_p99']:.0f} "
            f"| {r['step_p50']:.0f} | {r['step_p99']:.0f} |"
        )


if __name__ == "__main__":
    main()
