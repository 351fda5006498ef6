"""A stack with the gatekeeper in front, for the gatekeeper's end-to-end tests.

The backend is bench/fast_engine.py behind the text backend's openai adapter
(fast and deterministic: every answer reports 12 prompt + 32 completion tokens),
plus a gRPC servicer that never answers, for requests that stay in flight.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc

from modelplex.v1 import text_pb2_grpc
from modelplex_gatekeeper.keys import KeyRecord, KeysFile
from modelplex_kit.devstack import Stack
from tests.support import stacks
from tests.support.ports import free_port

USED_PER_REQUEST = 44


def start_engine() -> tuple[subprocess.Popen, int]:
    port = free_port()
    engine = subprocess.Popen([sys.executable, "-m", "bench.fast_engine", "--port", str(port)])
    for _ in range(100):
        try:
            urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/", data=b"{}"), timeout=1)
            return engine, port
        except OSError:
            time.sleep(0.1)
    engine.kill()
    raise RuntimeError("fast engine did not start")


class Hanging(text_pb2_grpc.TextGenerationServiceServicer):
    """Never answers: the request stays in flight until the client leaves.

    ``waiting`` counts the calls held now (the servicer runs in the test's own event loop), so a
    test waits until its requests got past admission instead of guessing a delay.
    """

    waiting = 0

    async def _hold(self) -> None:
        Hanging.waiting += 1
        try:
            await asyncio.sleep(3600)
        finally:
            Hanging.waiting -= 1

    async def Generate(self, request, context):
        await self._hold()

    async def GenerateStream(self, request, context):
        await self._hold()
        yield  # pragma: no cover


async def start_hanging() -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    text_pb2_grpc.add_TextGenerationServiceServicer_to_server(Hanging(), server)
    target = f"127.0.0.1:{free_port()}"
    server.add_insecure_port(target)
    await server.start()
    return server, target


def write_catalog(tmp: Path, engine_port: int, hanging_target: str) -> Path:
    models = [
        {
            "id": "fast",
            "modality": "text",
            "backend": f"127.0.0.1:{free_port()}",
            "capabilities": ["chat"],
            "engine": {
                "kind": "openai",
                "settings": {"upstream_url": f"http://127.0.0.1:{engine_port}/v1", "upstream_model": "bench"},
            },
        },
        {"id": "hang", "modality": "text", "backend": hanging_target, "capabilities": ["chat"],
         "engine": {"kind": "external"}},
        {"id": "other-model", "modality": "text", "backend": hanging_target, "capabilities": ["chat"],
         "engine": {"kind": "external"}},
    ]
    path = stacks.write_catalog(tmp, models)
    return path


def write_keys(path: Path, keys: dict[str, dict]) -> None:
    """name -> {"key": secret, limits...}."""
    keys_file = KeysFile()
    for name, spec in keys.items():
        spec = dict(spec)
        secret = spec.pop("key")
        keys_file.add(secret, KeyRecord(name=name, hash="", **spec))
    keys_file.save(path)


def start_stack(
    catalog: Path, keys_file: Path, log_dir: Path, env: dict | None = None, mode: str = "sidecar"
) -> Stack:
    env = {"MODELPLEX_LOG_LEVEL": "info", **(env or {})}
    return stacks.start_stack(catalog, log_dir, keys_file=keys_file, gatekeeper=mode, env=env)
