"""engine=openai: a vLLM pooling model's OpenAI-compatible ``/v1/embeddings`` over aiohttp.

Inputs are tokenized here with the upstream model's tokenizer.json first: usage
is exact per request even when the batcher merges requests (vLLM reports only
the merged call's total) and over-long inputs are refused before the call.
Text goes upstream as text, token arrays as token arrays.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import aiohttp
import numpy as np

from modelplex.v1 import catalog_pb2, embeddings_pb2
from modelplex_embeddings.engine import Item
from modelplex_embeddings.settings import RemoteSettings
from modelplex_embeddings.tokenization import InputTokenizer, packaged_minilm
from modelplex_kit.engine_health import openai_ready
from modelplex_kit.errors import unavailable, upstream_http_error

log = logging.getLogger(__name__)


def remote_tokenizer(settings: RemoteSettings) -> InputTokenizer:
    path = Path(settings.tokenizer_path) if settings.tokenizer_path else packaged_minilm() / "tokenizer.json"
    return InputTokenizer(path, settings.max_input_tokens)


def remote_capabilities(settings: RemoteSettings) -> catalog_pb2.EmbeddingsCapabilities:
    return catalog_pb2.EmbeddingsCapabilities(
        dimensions=settings.dimensions,
        matryoshka=settings.matryoshka,
        max_inputs=2048,
        max_input_tokens=settings.max_input_tokens,
    )


class OpenAIHttpEngine:
    def __init__(self, settings: RemoteSettings) -> None:
        if not settings.upstream_url:
            raise ValueError("engine=openai needs MODELPLEX_EMBEDDINGS_UPSTREAM_URL (e.g. http://vllm:8000/v1)")
        self._url = settings.upstream_url.rstrip("/") + "/embeddings"
        self._model = settings.upstream_model
        key = settings.upstream_api_key.get_secret_value()
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._timeout = aiohttp.ClientTimeout(total=settings.upstream_timeout_seconds)
        self._session: aiohttp.ClientSession | None = None
        self._tokenizer = remote_tokenizer(settings)
        self.capabilities = remote_capabilities(settings)

    def prepare(self, inputs: Sequence[embeddings_pb2.EmbedInput]) -> list[Item]:
        return self._tokenizer.prepare(inputs)

    async def embed(self, items: Sequence[Item]) -> np.ndarray:
        payload = {
            "model": self._model,
            "input": [item.text if item.text is not None else item.ids for item in items],
            "encoding_format": "float",
        }
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout, headers=self._headers)
        try:
            async with self._session.post(self._url, json=payload) as response:
                body = await response.json(content_type=None)
                status = response.status
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.warning("embeddings upstream unreachable: %s", type(exc).__name__)
            raise unavailable("The embeddings model server is unreachable; retry shortly.") from exc
        if status != 200:
            raise upstream_http_error(status, body if isinstance(body, dict) else {})
        data = sorted(body["data"], key=lambda d: d["index"])
        if len(data) != len(items):
            raise unavailable(f"The model server answered {len(data)} vectors for {len(items)} inputs.")
        return np.asarray([d["embedding"] for d in data], dtype=np.float32)

    async def ready(self) -> bool:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout, headers=self._headers)
        return await openai_ready(self._session, self._url.removesuffix("/embeddings"))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

