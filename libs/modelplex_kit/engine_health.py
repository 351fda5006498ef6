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
    """An OpenAI-compatible server (vLLM, llama.cpp) is ready when its ``/health`` says so and it
    lists its models with this backend's key.

    ``/health`` (at the server's root, beside ``/v1``) is vLLM's own readiness: it answers 503 once
    its engine has died, while the API process may still list models. A server without one (404)
    is judged by ``/v1/models`` alone, which every OpenAI-compatible server has; a 401 (wrong key)
    reads as not ready either.
    """
    return await openai_readiness(session, base_url) is True


async def openai_readiness(session: aiohttp.ClientSession, base_url: str) -> bool | None:
    """``openai_ready``, telling a server that did not answer in time (None) from one that is not
    ready (False): a server that handles one request at a time (llama-cpp-python's) is busy, not
    down, while it generates, and an engine pool must not eject it for that."""
    base = base_url.rstrip("/")
    root = base.removesuffix("/v1")
    try:
        health = await _status(session, f"{root}/health")
        return health in (200, 404) and await _status(session, f"{base}/models") == 200
    except TimeoutError:
        log.debug("upstream readiness unknown: no answer in time", extra={"url": base_url})
        return None
    except aiohttp.ClientError as exc:
        log.debug("upstream not ready", extra={"url": base_url, "error": type(exc).__name__})
        return False


async def _status(session: aiohttp.ClientSession, url: str) -> int:
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)) as response:
        return response.status


async def triton_ready(client: Any, model: str) -> bool:
    """Triton (or any Open Inference Protocol server): the server is live and this model is ready.

    Not the server's readiness: under Triton's strict readiness (its default) that is false while any
    model of the server loads or unloads, about 1.5 s for a Python-backend model on a real tritonserver
    2.51, which would take every other model on that server out of service meanwhile.

    ``client`` is a ``tritonclient.grpc.aio.InferenceServerClient``.
    """
    try:
        return bool(
            await client.is_server_live(client_timeout=PROBE_TIMEOUT_S)
            and await client.is_model_ready(model, client_timeout=PROBE_TIMEOUT_S)
        )
    except Exception as exc:  # tritonclient raises its own exception and grpc's; either way: not ready
        log.debug("upstream not ready", extra={"model": model, "error": type(exc).__name__})
        return False
