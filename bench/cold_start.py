"""make bench: scale to zero — what a cold start costs beyond the engine's own start, and how a burst fares.

`make run`'s processes (catalog with its scaler, a text backend, the edge) serve one model whose engine is two
simulated vLLM replicas (bench/engine_sim.py) that are not running: the pool has no replica ready and holds
what arrives. The engine is then started; the benchmark polls its /health itself every 2 ms to know when the
engine alone was ready.

- **Added time to first token**: a single streamed request sent while the engine is down; its first token's
  arrival less the moment the engine answered /health (what the platform adds: noticing the replica, sending
  the held request). Several cold starts, each after the engine was stopped and the pool saw it gone.
- **A burst during a cold start**: N streamed requests sent at once while the engine is down: how fast they
  are taken and held (requests/s until the scaler reports all N held), then, once the engine is up, how fast
  the held requests are served (requests/s from the engine ready to the last answer) and whether any failed.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import grpc
import orjson
import yaml

from bench.engine_sim import MODEL
from externalscaler import externalscaler_pb2, externalscaler_pb2_grpc
from modelplex_kit.children import tied_to_parent
from modelplex_kit.devstack import Stack, free_port

KEY = "sk-bench-cold"
MODEL_ID = "cold-sim"


class Engine:
    """The simulated engine's two replicas, started and stopped as KEDA would scale its Deployment."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self._popen: subprocess.Popen | None = None

    async def start(self) -> float:
        """Starts it; returns when its first replica answered /health (monotonic seconds)."""
        flags = ["--ports", ",".join(map(str, self.ports)), "--decode-seconds-per-token", "0.002"]
        self._popen = subprocess.Popen(
            [sys.executable, "-m", "bench.engine_sim", *flags], stdout=subprocess.DEVNULL, **tied_to_parent()
        )
        async with aiohttp.ClientSession() as http:
            while True:
                for port in self.ports:
                    try:
                        async with http.get(f"http://127.0.0.1:{port}/health") as reply:
                            if reply.status == 200:
                                return time.monotonic()
                    except aiohttp.ClientError:
                        pass
                await asyncio.sleep(0.002)

    def stop(self) -> None:
        if self._popen is not None:
            self._popen.terminate()
            self._popen.wait(10)
            self._popen = None


async def first_token(http: aiohttp.ClientSession, base_url: str, i: int) -> float:
    """Sends one streamed chat; returns when its first content chunk arrived (monotonic seconds)."""
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": f"ping {i}"}], "max_tokens": 8, "stream": True}
    first = 0.0
    async with http.post(f"{base_url}/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
        if r.status != 200:
            raise RuntimeError(f"request {i}: HTTP {r.status}: {await r.text()}")
        async for line in r.content:
            if line.startswith(b"data: {") and not first:
                chunk = orjson.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(f"request {i}: {chunk['error']}")
                if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                    first = time.monotonic()
    return first


async def held(scaler: externalscaler_pb2_grpc.ExternalScalerStub) -> int:
    ref = externalscaler_pb2.ScaledObjectRef(name="bench", namespace="bench", scalerMetadata={"key": MODEL_ID})
    request = externalscaler_pb2.GetMetricsRequest(scaledObjectRef=ref, metricName="demand")
    return (await scaler.GetMetrics(request)).metricValues[0].metricValue


async def wait_held(scaler, n: int, timeout: float = 120) -> float:
    deadline = time.monotonic() + timeout
    while (count := await held(scaler)) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{count} of {n} held")
        await asyncio.sleep(0.005)
    return time.monotonic()


async def wait_gone(stack: Stack, timeout: float = 60) -> None:
    """Until a request finds no replica again (the pool ejected the stopped engine): a true cold start next."""
    async with grpc.aio.insecure_channel(stack.catalog_listen) as channel:
        scaler = externalscaler_pb2_grpc.ExternalScalerStub(channel)
        deadline = time.monotonic() + timeout
        while await held(scaler) != 0:
            if time.monotonic() > deadline:
                raise TimeoutError("demand did not fall")
            await asyncio.sleep(0.05)
    await asyncio.sleep(1.0)  # the pool's next scrape finds the replicas refused and ejects them


async def single_cold_starts(stack: Stack, engine: Engine, trials: int) -> list[float]:
    added = []
    connector = aiohttp.TCPConnector(limit=0)
    channel = grpc.aio.insecure_channel(stack.catalog_listen)
    async with aiohttp.ClientSession(connector=connector) as http, channel as ch:
        scaler = externalscaler_pb2_grpc.ExternalScalerStub(ch)
        for i in range(trials):
            request = asyncio.create_task(first_token(http, stack.base_url, i))
            await wait_held(scaler, 1)
            ready = await engine.start()
            added.append((await request) - ready)
            engine.stop()
            await wait_gone(stack)
    return added


async def burst(stack: Stack, engine: Engine, n: int) -> dict[str, float]:
    connector = aiohttp.TCPConnector(limit=0)
    channel = grpc.aio.insecure_channel(stack.catalog_listen)
    async with aiohttp.ClientSession(connector=connector) as http, channel as ch:
        scaler = externalscaler_pb2_grpc.ExternalScalerStub(ch)
        sent = time.monotonic()
        requests = [asyncio.create_task(first_token(http, stack.base_url, i)) for i in range(n)]
        all_held = await wait_held(scaler, n)
        ready = await engine.start()
        results = await asyncio.gather(*requests, return_exceptions=True)
        done = time.monotonic()
        failed = sum(isinstance(r, BaseException) for r in results)
        firsts = sorted(r for r in results if isinstance(r, float))
        engine.stop()
    return {
        "held_per_s": n / (all_held - sent),
        "served_per_s": (n - failed) / (done - ready),
        "failed": failed,
        "first_after_ready_ms": (firsts[0] - ready) * 1000 if firsts else float("nan"),
        "last_after_ready_s": done - ready,
    }


def start_stack(tmp: Path, ports: list[int]) -> Stack:
    entry = {
        "id": MODEL_ID,
        "modality": "text",
        "backend": f"127.0.0.1:{free_port()}",
        "engine": {
            "kind": "openai",
            "settings": {"upstream_url": ",".join(f"http://127.0.0.1:{p}/v1" for p in ports), "upstream_model": MODEL},
        },
        "capabilities": ["chat"],
        "context_length": 4096,
        "scale_to_zero": True,
        "cold_start_timeout": 120,
    }
    catalog = tmp / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({"models": [entry]}))
    return Stack(
        catalog,
        catalog_listen=f"127.0.0.1:{free_port()}",
        edge_port=free_port(),
        env={"MODELPLEX_DEV_API_KEY": KEY, "MODELPLEX_LOG_LEVEL": "WARNING"},
        log_dir=tmp,
    ).start()


async def measure(args: argparse.Namespace, stack: Stack, engine: Engine) -> str:
    added = await single_cold_starts(stack, engine, args.trials)
    await wait_gone(stack)
    shot = await burst(stack, engine, args.burst)
    added_ms = sorted(a * 1000 for a in added)
    return "\n".join(
        [
            "## Scale to zero: cold starts",
            "",
            "`python -m bench.cold_start`: " + __doc__.split("\n\n")[1].replace("\n", " "),
            "",
            "| measure | value |",
            "|---|---|",
            f"| added time to first token, single request ({args.trials} cold starts): median | "
            f"{statistics.median(added_ms):.0f} ms |",
            f"| added time to first token: min / max | {added_ms[0]:.0f} / {added_ms[-1]:.0f} ms |",
            f"| burst of {args.burst}: taken and held | {shot['held_per_s']:.0f} requests/s |",
            f"| burst: first token after the engine was ready | {shot['first_after_ready_ms']:.0f} ms |",
            f"| burst: held requests served once the engine was ready | {shot['served_per_s']:.0f} requests/s "
            f"(all {args.burst} in {shot['last_after_ready_s']:.1f} s) |",
            f"| burst: requests failed | {shot['failed']} |",
            "",
            "While requests are held the pool asks each replica whether it is ready every "
            "`POOL_COLD_PROBE_SECONDS` (0.02 s): the added time is that wait, the readiness check and the request. "
            "Served/s is the simulated engine's pace (8 sequences per replica, 2 replicas), not the platform's.",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--burst", type=int, default=500)
    args = parser.parse_args()
    ports = [free_port(), free_port()]
    engine = Engine(ports)
    with tempfile.TemporaryDirectory() as tmp:
        stack = start_stack(Path(tmp), ports)
        try:
            print(asyncio.run(measure(args, stack, engine)))
        finally:
            engine.stop()
            stack.stop()


if __name__ == "__main__":
    main()
