"""make bench-peers: Modelplex's default stack and LiteLLM's proxy side by side, on the same core.

Both proxies (every Modelplex process: catalog, text backend with the openai adapter, gatekeeper
sidecar with its limits in memory, edge; LiteLLM's proxy with one worker) are pinned to core 0;
the one mock OpenAI upstream they both call (bench/fast_engine.py) and this load generator run on
core 1. Rounds are interleaved (each round visits both proxies in turn), so the machine's drift is
shared; every figure is the median of the rounds. Three figures, and their ratios:

- added p50 at c=1: the proxy's p50 minus the upstream's own (sequential unary requests);
- unary req/s at c=64;
- streamed req/s at c=16 (the upstream streams STREAM_CHUNKS content chunks).

The section is written below docs/benchmarks.md's keep-marker, so `make bench` keeps it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

import bench.platform_overhead as overhead
from bench.fast_engine import STREAM_CHUNKS
from bench.platform_overhead import KEEP_MARKER, HttpClient, percentile, throughput
from modelplex_kit.children import tied_to_parent
from modelplex_kit.devstack import Stack, free_port

PROXY_CORE, LOAD_CORE = {0}, {1}
# Both proxies authenticate the same strong key (LiteLLM refuses to start with a weak or no master
# key); the load generator's HTTP client sends it.
KEY = overhead.KEY = f"sk-bench-{secrets.token_hex(24)}"
HEADING = "## Side by side with LiteLLM (make bench-peers)"
UPSTREAM, LITELLM, MODELPLEX = "upstream (direct)", "LiteLLM proxy", "Modelplex (sidecar gatekeeper)"


def body(stream: bool) -> bytes:
    return json.dumps({
        "model": "bench", "messages": [{"role": "user", "content": "Say something."}], "max_tokens": 64,
        "stream": stream,
    }).encode()


def wait_http(url: str, what: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(urllib.request.Request(url, data=body(False), headers={
                "Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}), timeout=5)
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{what} did not answer at {url}")


def start_upstream(port: int) -> subprocess.Popen:
    engine = subprocess.Popen([sys.executable, "-m", "bench.fast_engine", "--port", str(port)], **tied_to_parent())
    os.sched_setaffinity(engine.pid, LOAD_CORE)
    wait_http(f"http://127.0.0.1:{port}/v1/chat/completions", "the mock upstream")
    return engine


def start_litellm(binary: str, upstream: int, tmp: Path) -> tuple[subprocess.Popen, int]:
    config = tmp / "litellm.yaml"
    config.write_text(yaml.safe_dump({
        "model_list": [{"model_name": "bench", "litellm_params": {
            "model": "openai/bench", "api_base": f"http://127.0.0.1:{upstream}/v1", "api_key": "unused"}}],
        "general_settings": {"master_key": KEY},
    }))
    port = free_port()
    log = open(tmp / "litellm.log", "w")  # noqa: SIM115 - the process's log, closed with the run
    proxy = subprocess.Popen(
        ["taskset", "-a", "-c", ",".join(map(str, PROXY_CORE)), binary, "--config", str(config),
         "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "LITELLM_LOG": "ERROR"}, **tied_to_parent(),
    )
    wait_http(f"http://127.0.0.1:{port}/v1/chat/completions", "LiteLLM's proxy")
    return proxy, port


def start_modelplex(upstream: int, tmp: Path) -> Stack:
    catalog = tmp / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({"models": [{
        "id": "bench", "modality": "text", "backend": f"127.0.0.1:{free_port()}", "capabilities": ["chat"],
        "engine": {"kind": "openai", "settings": {
            "upstream_url": f"http://127.0.0.1:{upstream}/v1", "upstream_model": "bench"}},
    }]}))
    (tmp / "modelplex").mkdir()
    stack = Stack(
        catalog, catalog_listen=f"127.0.0.1:{free_port()}", edge_port=free_port(), log_dir=tmp / "modelplex",
        keys_file=tmp / "modelplex" / "keys.yaml", gatekeeper="sidecar",  # make run's default
        env={"MODELPLEX_DEV_API_KEY": KEY, "MODELPLEX_LOG_LEVEL": "warning"},
    ).start()  # started while this process is on the proxy core: every child inherits it
    wait_http(f"{stack.base_url}/chat/completions", "Modelplex's edge")
    return stack


async def latency(port: int, count: int) -> list[float]:
    client = await HttpClient(port).connect()
    for _ in range(count // 10):
        await client.post("/v1/chat/completions", body(False))
    samples = [(await client.post("/v1/chat/completions", body(False))).total * 1e3 for _ in range(count)]
    client.writer.close()
    return samples


async def measure(ports: dict[str, int], rounds: int, count: int, seconds: float) -> dict:
    p50: dict[str, list[float]] = {name: [] for name in ports}
    unary: dict[str, list[float]] = {name: [] for name in ports if name != UPSTREAM}
    streamed: dict[str, list[float]] = {name: [] for name in ports if name != UPSTREAM}
    for number in range(rounds):
        for name, port in ports.items():
            p50[name].append(statistics.median(await latency(port, count)))
            if name == UPSTREAM:
                continue
            connect = lambda p=port: HttpClient(p).connect()  # noqa: E731
            unary[name].append(await throughput(connect, "/v1/chat/completions", body(False), 64, seconds))
            streamed[name].append(await throughput(connect, "/v1/chat/completions", body(True), 16, seconds))
            print(f"round {number + 1}: {name:<32} p50={p50[name][-1]:.2f}ms unary={unary[name][-1]:.0f}/s "
                  f"streamed={streamed[name][-1]:.0f}/s", file=sys.stderr, flush=True)
    base = statistics.median(p50[UPSTREAM])
    return {name: {
        "added": statistics.median(p50[name]) - base,
        "unary": statistics.median(unary[name]),
        "streamed": statistics.median(streamed[name]),
        "spread": percentile(p50[name], 1.0) - percentile(p50[name], 0.0),
    } for name in unary}


def report(results: dict, rounds: int, count: int, seconds: float, litellm_version: str) -> str:
    them, us = results[LITELLM], results[MODELPLEX]
    rows = [
        ("added p50 at c=1 (ms)", them["added"], us["added"], them["added"] / max(us["added"], 1e-6), 10),
        ("unary req/s at c=64", them["unary"], us["unary"], us["unary"] / them["unary"], 10),
        (f"streamed req/s at c=16 ({STREAM_CHUNKS} chunks)", them["streamed"], us["streamed"],
         us["streamed"] / them["streamed"], 10),
    ]
    lines = [
        HEADING, "",
        f"LiteLLM {litellm_version} proxy (one worker) and `make run`'s default Modelplex stack (sidecar "
        "gatekeeper, limits in memory), every process of both pinned to core 0 (`taskset`); the one mock "
        "OpenAI upstream (bench/fast_engine.py) and the load generator on core 1. "
        f"{rounds} interleaved rounds, medians: {count} sequential requests per p50, "
        f"{seconds:.0f} s per throughput figure. Ratio: how many times better Modelplex is (goal 10x).",
        "",
        "| figure | LiteLLM | Modelplex | ratio |",
        "|---|---|---|---|",
    ]
    for figure, theirs, ours, ratio, goal in rows:
        lines.append(f"| {figure} | {theirs:.2f} | {ours:.2f} | {ratio:.1f}x {'(met)' if ratio >= goal else ''} |")
    return "\n".join(lines) + "\n"


def write_section(target: Path, section: str) -> None:
    """Replaces (or adds) this section below the keep-marker, where `make bench` leaves it alone."""
    text = target.read_text() if target.exists() else ""
    measured, marker, kept = text.partition(KEEP_MARKER)
    if HEADING in kept:
        before, _, after = kept.partition(HEADING)
        rest = after.split("\n## ", 1)
        kept = before + section + ("\n## " + rest[1] if len(rest) > 1 else "")
    else:
        kept = kept.rstrip("\n") + "\n\n" + section
    target.write_text(measured + (marker or KEEP_MARKER) + kept)


async def run(args) -> str:
    tmp = Path(tempfile.mkdtemp(prefix="modelplex-bench-peers-"))
    own = os.sched_getaffinity(0)
    upstream_port = free_port()
    upstream = start_upstream(upstream_port)
    os.sched_setaffinity(0, PROXY_CORE)  # the proxies' processes inherit core 0
    stack = proxy = None
    try:
        stack = start_modelplex(upstream_port, tmp)
        proxy, litellm_port = start_litellm(args.litellm, upstream_port, tmp)
        os.sched_setaffinity(0, LOAD_CORE)
        ports = {UPSTREAM: upstream_port, LITELLM: litellm_port, MODELPLEX: stack.edge_port}
        results = await measure(ports, args.rounds, args.requests, args.seconds)
    finally:
        os.sched_setaffinity(0, own)
        if proxy is not None:
            proxy.terminate()
            proxy.wait()
        if stack is not None:
            stack.stop()
        upstream.terminate()
    version = subprocess.run([str(Path(args.litellm).with_name("python")), "-c",
                              "import importlib.metadata as m; print(m.version('litellm'))"],
                             capture_output=True, text=True).stdout.strip()
    return report(results, args.rounds, args.requests, args.seconds, version or "?")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", type=Path)
    parser.add_argument("--litellm", required=True, help="the litellm CLI of its own venv")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("bench-peers needs two cores (proxies on one, upstream and load on the other)")
    section = asyncio.run(run(args))
    print(section)
    write_section(args.target, section)


if __name__ == "__main__":
    main()
