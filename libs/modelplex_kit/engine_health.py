"""Is a remote engine ready to serve? One probe per upstream protocol.

Adapters of remote engines expose ``async def ready(self) -> bool`` built on
these; ``grpc_server.serve`` polls it and turns the answer into the backend's
grpc.health status, which the catalog follows. A probe never raises: an
unreachable or failing upstream is simply not ready.
"""

from __future__ import annotations

import logging
from typing import Any

import aiohttp

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 3.0


async def openai_ready(session: aiohttp.ClientSession, base_url: str) -> bool:
    """An OpenAI-compatible server (vLLM, llama.cpp) is ready once it lists its models.

    vLLM only opens its port after loading weights, but `/v1/models` (not `/health`) is what
    every OpenAI-compatible server has, and a 401 (wrong key) must read as not ready either.
    """
    try:
        async with session.get(
            f"{base_url.rstrip('/')}/models", timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)
        ) as response:
            return response.status == 200
    except (aiohttp.ClientError, TimeoutError) as exc:
        log.debug("upstream not ready", extra={"url": base_url, "error": type(exc).__name__})
        return False


async def triton_ready(client: Any, model: str) -> bool:
    """Triton (or any Open Inference Protocol server): the server and this model are ready.

    ``client`` is a ``tritonclient.grpc.aio.InferenceServerClient``.
    """
    try:
        return bool(
            await client.is_server_ready(client_timeout=PROBE_TIMEOUT_S)
            and await client.is_model_ready(model, client_timeout=PROBE_TIMEOUT_S)
        )
    except Exception as exc:  # tritonclient raises its own exception and grpc's; either way: not ready
        log.debug("upstream not ready", extra={"model": model, "error": type(exc).__name__})
        return False
