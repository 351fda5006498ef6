"""make bench: every benchmark section, one after another, into docs/benchmarks.md.

Each section is a script that prints markdown (the platform overhead writes its own file). Sections
below the keep-marker (measured by hand, e.g. bench/llama_tokens.py's native-vs-portable build) stay.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from bench.platform_overhead import KEEP_MARKER

# (module, arguments): the platform's own hops first, then each modality's figures.
SECTIONS: list[tuple[str, list[str]]] = [
    ("bench.text_concurrency", ["--parallel", "1", "8"]),
    ("bench.constrained_decoding", []),
    ("bench.gatekeeper", []),
    ("bench.responses", []),
    ("bench.batch_priority", []),
    ("bench.embeddings", []),
    ("bench.audio", []),
    ("bench.visual", []),
    ("bench.scheduling", []),
    ("bench.scheduling", ["--kv-events", "--no-share-picks", "--policies", "affinity", "--loads", "0.8"]),
    ("bench.scheduling", ["--lora"]),
    ("bench.lora", []),
    ("bench.cold_start", []),
    ("bench.jobs", []),
]


def _run(module: str, args: list[str]) -> str:
    print(f"make bench: {module}", file=sys.stderr, flush=True)
    done = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, check=True)
    return done.stdout.strip()


def main() -> None:
    target = Path(sys.argv[1])
    kept = target.read_text().partition(KEEP_MARKER)[2] if target.exists() else ""
    with tempfile.TemporaryDirectory() as tmp:
        overhead = Path(tmp) / "overhead.md"
        print("make bench: bench.platform_overhead", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "bench.platform_overhead", "--write", str(overhead)], check=True)
        parts = [overhead.read_text().partition(KEEP_MARKER)[0].strip()]
    parts += [_run(module, args) for module, args in SECTIONS]
    target.write_text("\n\n".join(parts) + f"\n\n{KEEP_MARKER}" + kept)


if __name__ == "__main__":
    main()
