"""make bench: what /v1/responses adds beside chat, and what its stored state costs.

The same request (one short user message) to a gRPC servicer that does nothing (bench/grpc_floor.py),
through three edges that differ only in their response store (memory, SQLite, Redis on loopback):
chat completions; responses with store false (the translation alone); stored (one write); and continued
with previous_response_id (one read of the stored chain, then one write). No gatekeeper, so the rows
differ only by the Responses code and its store.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import yaml

from bench.platform_overhead import KEY, HttpClient, interleaved, percentile
from modelplex_kit.devstack import Stack, free_port

CHAT = {"model": "bench-floor", "messages": [{"role": "user", "content": "Say something."}], "max_tokens": 64}
RESPONSE = {"model": "bench-floor", "input": "Say something.", "max_output_tokens": 64}
STORES = ("memory", "sqlite", "redis")


def stack(catalog: Path, tmp: Path, store: str, redis_url: str) -> Stack:
    log_dir = tmp / store
    log_dir.mkdir()
    env = {
        "MODELPLEX_DEV_API_KEY": KEY,
        "MODELPLEX_LOG_LEVEL": "warning",
        "MODELPLEX_EDGE_RESPONSES_STORE": store,
        "MODELPLEX_EDGE_RESPONSES_SQLITE_PATH": str(log_dir / "responses.sqlite3"),
        "MODELPLEX_EDGE_RESPONSES_REDIS_URL": redis_url,
    }
    return Stack(
        catalog, catalog_listen=f"127.0.0.1:{free_port()}", edge_port=free_port(), log_dir=log_dir, env=env
    ).start()


def first_response(port: int) -> str:
    """A stored response to continue from."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/responses",
        data=json.dumps(RESPONSE).encode(),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.load(answer)["id"]


def targets(ports: dict[str, int]) -> dict[str, tuple[int, str, dict]]:
    """row name -> (edge port, path, body)."""
    rows = {
        "chat.completions": (ports["memory"], "/v1/chat/completions", CHAT),
        "responses, store: false": (ports["memory"], "/v1/responses", {**RESPONSE, "store": False}),
    }
    for store in STORES:
        port = ports[store]
        rows[f"responses, stored ({store})"] = (port, "/v1/responses", RESPONSE)
        previous = {**RESPONSE, "previous_response_id": first_response(port)}
        rows[f"responses + previous_response_id ({store})"] = (port, "/v1/responses", previous)
    return rows


async def measure(rows: dict[str, tuple[int, str, dict]], count: int) -> dict[str, dict[str, float]]:
    clients = {name: (await HttpClient(port).connect(), path) for name, (port, path, _) in rows.items()}
    bodies = {name: json.dumps(body).encode() for name, (_, _, body) in rows.items()}
    samples = await interleaved(clients, bodies, count)
    results = {}
    for name in rows:
        totals = [s.total * 1e3 for s in samples[name]]
        results[name] = {"p50": statistics.median(totals), "p99": percentile(totals, 0.99)}
        print(f"{name:<45} p50={results[name]['p50']:.3f}ms p99={results[name]['p99']:.3f}ms", file=sys.stderr)
    return results


def report(results: dict[str, dict[str, float]], count: int) -> str:
    base = results["chat.completions"]["p50"]
    lines = [
        "## Responses API",
        "",
        "What `/v1/responses` adds beside chat completions, and what stored state costs (bench/responses.py): "
        "the same one-message request to a no-op gRPC servicer, through edges that differ only in their "
        "response store, without a gatekeeper. *stored* writes the response; *previous_response_id* reads the "
        f"stored chain (one turn), then writes. {count} sequential requests per row, interleaved.",
        "",
        "| path | p50 ms | p99 ms | added p50 ms vs chat |",
        "|---|---|---|---|",
    ]
    for name, row in results.items():
        lines.append(f"| {name} | {row['p50']:.3f} | {row['p99']:.3f} | {row['p50'] - base:+.3f} |")
    return "\n".join(lines) + "\n"


async def run(args) -> str:
    from tests.support.redis_server import RedisServer

    tmp = Path(tempfile.mkdtemp(prefix="modelplex-bench-responses-"))
    floor_port = free_port()
    floor = subprocess.Popen([sys.executable, "-m", "bench.grpc_floor", "--port", str(floor_port)])
    redis = RedisServer(tmp).start()
    catalog = tmp / "catalog.yaml"
    model = {
        "id": "bench-floor",
        "modality": "text",
        "backend": f"127.0.0.1:{floor_port}",
        "capabilities": ["chat"],
        "engine": {"kind": "external"},
        "context_length": 8192,
    }
    catalog.write_text(yaml.safe_dump({"models": [model]}))
    stacks: dict[str, Stack] = {}
    try:
        for store in STORES:
            stacks[store] = stack(catalog, tmp, store, redis.url)
        rows = targets({store: running.edge_port for store, running in stacks.items()})
        results = await measure(rows, args.requests)
    finally:
        for running in stacks.values():
            running.stop()
        floor.terminate()
        redis.stop()
    return report(results, args.requests)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=1000)
    print(asyncio.run(run(parser.parse_args())))


if __name__ == "__main__":
    main()
