"""make bench: what the gatekeeper adds to every request.

The same edge, three times, each routing the same chat request to a gRPC
servicer that does nothing (bench/grpc_floor.py): without a gatekeeper (the
dev key only), with the gatekeeper sidecar on a unix socket keeping its limits
in memory, and with its limits in Redis on loopback. The key has RPM, TPM and
concurrency limits, so every request is a full decision and an account.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.grpc_floor import start_floor
from bench.platform_overhead import KEY, ROUNDS, HttpClient, interleaved, percentile, throughput
from modelplex_kit.devstack import Stack, free_port

NONE = "edge, no gatekeeper"
MEMORY, REDIS = "embedded gatekeeper (memory)", "embedded gatekeeper (Redis)"
SIDECAR_MEMORY, SIDECAR_REDIS = "sidecar gatekeeper (memory)", "sidecar gatekeeper (Redis)"
# The sidecar deciding every request (quota leases off): what the leases save.
PER_REQUEST = "sidecar (memory), leases off"
BODY = {"model": "bench-floor", "messages": [{"role": "user", "content": "Say something."}], "max_tokens": 64}


def start_redis(tmp: Path) -> tuple[subprocess.Popen, str]:
    from tests.support.redis_server import RedisServer

    server = RedisServer(tmp).start()
    return server.process, server.url


def stack(catalog: Path, tmp: Path, name: str, mode: str | None, env: dict[str, str]) -> Stack:
    log_dir = tmp / name
    log_dir.mkdir()
    return Stack(
        catalog,
        catalog_listen=f"127.0.0.1:{free_port()}",
        edge_port=free_port(),
        log_dir=log_dir,
        keys_file=tmp / name / "keys.yaml" if mode else None,
        gatekeeper=mode or "sidecar",
        env={"MODELPLEX_DEV_API_KEY": KEY, "MODELPLEX_LOG_LEVEL": "warning", **env},
    ).start()


async def measure(ports: dict[str, int], count: int, seconds: float, concurrency: int) -> dict:
    body = json.dumps(BODY).encode()
    clients = {name: (await HttpClient(port).connect(), "/v1/chat/completions") for name, port in ports.items()}
    samples = await interleaved(clients, dict.fromkeys(ports, body), count)
    # Throughput in rounds that visit every target in turn, like the latency samples: the shared
    # machine's drift is spread over all rows instead of landing on one.
    rates: dict[str, list[float]] = {name: [] for name in ports}
    for _ in range(ROUNDS):
        for name, port in ports.items():
            rates[name].append(await throughput(
                lambda p=port: HttpClient(p).connect(), "/v1/chat/completions", body, concurrency, seconds / ROUNDS
            ))
    results = {}
    for name in ports:
        totals = [s.total * 1e3 for s in samples[name]]
        rps = statistics.median(rates[name])
        results[name] = {"p50": statistics.median(totals), "p99": percentile(totals, 0.99), "rps": rps}
        print(f"{name:<30} p50={results[name]['p50']:.3f}ms p99={results[name]['p99']:.3f}ms rps={rps:.0f}",
              file=sys.stderr, flush=True)
    return results


def report(results: dict, count: int, seconds: float, concurrency: int) -> str:
    base = results[NONE]
    lines = [
        "## Gatekeeper",
        "",
        "What the gatekeeper adds to every request (bench/gatekeeper.py): the same edge and no-op gRPC backend, "
        "without a gatekeeper, with the gatekeeper embedded in the edge process, and with the gatekeeper as a "
        "sidecar on a unix socket (one multiplexed gRPC stream per edge); limits in memory or in Redis on loopback. "
        "The sidecar admits most requests in the edge from quota leases; the last row turns them off. "
        f" {count} sequential requests per row, interleaved; throughput with "
        f"{concurrency} connections for {seconds:.0f} s in {ROUNDS} interleaved rounds (median). "
        "The key has RPM, TPM and concurrency limits.",
        "",
        f"| path | p50 ms | p99 ms | added p50 ms | req/s at c={concurrency} | req/s vs none |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['p50']:.3f} | {r['p99']:.3f} | {r['p50'] - base['p50']:+.3f} | {r['rps']:.0f} | "
            f"{(r['rps'] / base['rps'] - 1) * 100:+.1f}% |"
        )
    # (row, added p50 ms, fewer req/s %): Issue 17's budgets for the sidecar.
    budgets = ((MEMORY, 0.2, 15), (REDIS, 0.5, 15), (SIDECAR_MEMORY, 0.1, 5), (SIDECAR_REDIS, 0.2, 10))
    verdicts = []
    for name, budget, fewer in budgets:
        added = results[name]["p50"] - base["p50"]
        drop = (1 - results[name]["rps"] / base["rps"]) * 100
        met = added <= budget and drop <= fewer
        verdicts.append(f"{name}: {added:+.3f} ms (budget {budget} ms), {drop:.1f}% fewer req/s (budget {fewer}%): "
                        f"{'met' if met else 'not met'}")
    lines += ["", "Budget: " + "; ".join(verdicts) + ".", ""]
    return "\n".join(lines)


async def run(args) -> str:
    tmp = Path(tempfile.mkdtemp(prefix="modelplex-bench-gk-"))
    floor = start_floor(tmp)
    catalog = floor.catalog
    redis_process, redis_url = start_redis(tmp)
    stacks = {}
    try:
        redis = {"MODELPLEX_GATEKEEPER_REDIS_URL": redis_url}
        stacks[NONE] = stack(catalog, tmp, "none", None, {})
        stacks[MEMORY] = stack(catalog, tmp, "memory", "embedded", {})
        stacks[REDIS] = stack(catalog, tmp, "redis", "embedded", redis)
        stacks[SIDECAR_MEMORY] = stack(catalog, tmp, "sidecar-memory", "sidecar", {})
        stacks[SIDECAR_REDIS] = stack(catalog, tmp, "sidecar-redis", "sidecar", redis)
        stacks[PER_REQUEST] = stack(
            catalog, tmp, "sidecar-per-request", "sidecar", {"MODELPLEX_EDGE_GATEKEEPER_LEASES": "false"}
        )
        results = await measure({n: s.edge_port for n, s in stacks.items()}, args.requests, args.seconds,
                                args.concurrency)
    finally:
        for running in stacks.values():
            running.stop()
        floor.stop()
        redis_process.kill()
    return report(results, args.requests, args.seconds, args.concurrency)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    print(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
