"""CPU seconds the edge process spends per 1000 requests (Issue 17): what a cut in the edge saves.

The stack of bench/gatekeeper.py (the edge, a no-op gRPC backend; no gatekeeper unless asked) takes a
fixed number of chat requests at a fixed concurrency; the edge's own CPU time (user + system, from
/proc through psutil) is read before and after each round. CPU time, not wall time: on a shared
machine it moves far less with the neighbours' load than req/s does.

``--redis`` keeps the gatekeeper's limits in a Redis on loopback (with ``--gatekeeper sidecar`` or
``embedded``) and also reports the gatekeeper's and Redis's CPU and Redis script calls per 1000 requests.

``--baseline DIR`` runs a second edge from another source tree (e.g. an older commit exported with
``git archive``) next to this one, in interleaved rounds, so both share the machine's drift:

    git archive main services libs | tar -x -C /tmp/base
    .venv/bin/python -m bench.cpu_per_request --baseline /tmp/base
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
from pathlib import Path

import psutil

from bench.gatekeeper import BODY, stack, start_redis
from bench.grpc_floor import start_floor
from bench.platform_overhead import HttpClient
from modelplex_kit.devstack import Stack

PATH = "/v1/chat/completions"


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


async def requests(port: int, count: int, concurrency: int, body: bytes) -> None:
    """Sends exactly ``count`` requests over ``concurrency`` keep-alive connections."""
    clients = [await HttpClient(port).connect() for _ in range(concurrency)]
    left = count

    async def worker(client: HttpClient) -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await client.post(PATH, body)

    await asyncio.gather(*(worker(c) for c in clients))
    for client in clients:
        client.writer.close()


def evalsha_calls(redis_url: str) -> int:
    import redis

    return redis.Redis.from_url(redis_url).info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)


async def per_thousand(running: Stack, count: int, concurrency: int, body: bytes,
                       redis: tuple[psutil.Process, str] | None) -> dict[str, float]:
    """CPU seconds per 1000 requests of the edge (and of the gatekeeper sidecar and Redis, when there)."""
    watched = {name: psutil.Process(running.process(name).popen.pid)
               for name in ("edge", "gatekeeper") if any(p.name == name for p in running.processes)}
    if redis is not None:
        watched["redis"] = redis[0]
        scripts = evalsha_calls(redis[1])
    before = {name: cpu_seconds(process) for name, process in watched.items()}
    await requests(running.edge_port, count, concurrency, body)
    figures = {f"{name} CPU s": (cpu_seconds(process) - before[name]) / count * 1000
               for name, process in watched.items()}
    if redis is not None:
        figures["Redis EVALSHA calls"] = (evalsha_calls(redis[1]) - scripts) / count * 1000
    return figures


def source_env(tree: Path) -> dict[str, str]:
    """Imports every modelplex package from ``tree`` (ahead of this checkout's editable installs)."""
    roots = [tree / "libs", *sorted(p for p in (tree / "services").iterdir() if p.is_dir())]
    return {"PYTHONPATH": os.pathsep.join(str(r) for r in roots)}


async def run(args) -> dict[str, list[dict[str, float]]]:
    tmp = Path(tempfile.mkdtemp(prefix="modelplex-bench-cpu-"))
    floor = start_floor(tmp)
    catalog = floor.catalog
    mode = None if args.gatekeeper == "none" else args.gatekeeper
    redis_process, redis = None, None
    common: dict[str, str] = {}
    if args.redis:
        redis_process, redis_url = start_redis(tmp)
        redis = (psutil.Process(redis_process.pid), redis_url)
        common["MODELPLEX_GATEKEEPER_REDIS_URL"] = redis_url
    trees = {"this tree": common}
    if args.baseline:
        trees = {"baseline": common | source_env(Path(args.baseline)), **trees}
    stacks: dict[str, Stack] = {}
    body = json.dumps(BODY).encode()
    try:
        for name, env in trees.items():
            stacks[name] = stack(catalog, tmp, name.replace(" ", "-"), mode, env)
        for running in stacks.values():  # warm up: imports, first-call caches, connections
            await requests(running.edge_port, args.requests // 4, args.concurrency, body)
        results: dict[str, list[dict[str, float]]] = {name: [] for name in stacks}
        for _ in range(args.rounds):
            for name, running in stacks.items():
                results[name].append(await per_thousand(running, args.requests, args.concurrency, body, redis))
    finally:
        for running in stacks.values():
            running.stop()
        floor.stop()
        if redis_process is not None:
            redis_process.kill()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--gatekeeper", choices=["none", "sidecar", "embedded"], default="none")
    parser.add_argument("--redis", action="store_true", help="the gatekeeper's limits in Redis")
    parser.add_argument("--baseline", help="a source tree (with libs/ and services/) to run as a second edge")
    args = parser.parse_args()
    results = asyncio.run(run(args))
    medians: dict[str, dict[str, float]] = {}
    for name, rounds in results.items():
        medians[name] = {figure: statistics.median(r[figure] for r in rounds) for figure in rounds[0]}
        for figure, median in medians[name].items():
            print(f"{name:<10} {figure} per 1000 requests: median {median:.3f} "
                  f"(rounds: {' '.join(f'{r[figure]:.3f}' for r in rounds)})")
    if len(medians) == 2:
        base, now = medians.values()
        for figure in now:
            if base[figure]:
                print(f"change in {figure}: {(now[figure] / base[figure] - 1) * 100:+.1f}%")


if __name__ == "__main__":
    main()
