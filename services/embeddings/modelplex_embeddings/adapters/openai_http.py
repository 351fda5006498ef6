"""engine=openai: a vLLM pooling model's OpenAI-compatible ``/v1/embeddings``.

The transport and the mapping of failures are the shared upstream client's
(``modelplex_kit.openai_upstream``), one per replica of the engine pool
(``modelplex_kit.pools.http``: each batch to the least loaded replica), the same as
the text adapter's.

Inputs are tokenized here with the upstream model's tokenizer.json first: usage
is exact per request even when the batcher merges requests (vLLM reports only
the merged call's total) and over-long inputs are refused before the call.
Text goes upstream as text, token arrays as token arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from modelplex.v1 import catalog_pb2, embeddings_pb2
from modelplex_embeddings.engine import Item
from modelplex_embeddings.settings import RemoteSettings
from modelplex_embeddings.tokenization import InputTokenizer, packaged_minilm
from modelplex_kit.errors import unavailable
from modelplex_kit.pools.http import OpenAIPool


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
        self._model = settings.upstream_model
        self._upstream = OpenAIPool(
            "embeddings",
            settings,
            settings.upstream_api_key.get_secret_value(),
            timeout_seconds=settings.upstream_timeout_seconds,
            what="embeddings model server",
        )
        self._tokenizer = remote_tokenizer(settings)
        self.capabilities = remote_capabilities(settings)

    def prepare(self, inputs: Sequence[embeddings_pb2.EmbedInput]) -> list[Item]:
        return self._tokenizer.prepare(inputs)

    async def embed(self, items: Sequence[Item]) -> np.ndarray:
        # Always floats upstream: the edge encodes what the client asked for (base64, dimensions).
        payload = {
            "model": self._model,
            "input": [item.text if item.text is not None else item.ids for item in items],
            "encoding_format": "float",
        }
        answer = await self._upstream.call("embeddings", payload, param="input")
        data = sorted(answer.get("data") or (), key=lambda d: d["index"])
        if len(data) != len(items):
            raise unavailable(f"The model server answered {len(data)} vectors for {len(items)} inputs.")
        return np.asarray([d["embedding"] for d in data], dtype=np.float32)

    async def ready(self) -> bool:
        return await self._upstream.ready()

    async def close(self) -> None:
        await self._upstream.close()
