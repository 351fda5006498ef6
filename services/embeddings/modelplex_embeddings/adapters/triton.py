"""engine=triton: an embedding model on Triton (or any KServe v2 / Open Inference Protocol server)
over gRPC with ``tritonclient.grpc.aio``.

Layout (BAAI/bge-m3-style ensembles): one BYTES input ``[batch, 1]`` holding the
texts, one FP32 output ``[batch, dimensions]``; tensor names are settings.
Tokenizing happens here first (the upstream tokenizer.json) for exact usage and
context checks; token-array inputs are refused, as the model takes text.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tritonclient.grpc.aio as triton

from modelplex.v1 import embeddings_pb2
from modelplex_embeddings.adapters.openai_http import remote_capabilities, remote_tokenizer
from modelplex_embeddings.engine import Item
from modelplex_embeddings.settings import RemoteSettings
from modelplex_kit.errors import invalid, unavailable
from modelplex_kit.pools.triton import TritonPool


class TritonEngine:
    def __init__(self, settings: RemoteSettings) -> None:
        if not settings.upstream_url or not settings.upstream_model:
            raise ValueError("engine=triton needs MODELPLEX_EMBEDDINGS_UPSTREAM_URL (host:port) and _UPSTREAM_MODEL")
        self._pool = TritonPool("embeddings", settings, settings.upstream_model)
        self._settings = settings
        self._tokenizer = remote_tokenizer(settings)
        self.capabilities = remote_capabilities(settings)

    def prepare(self, inputs: Sequence[embeddings_pb2.EmbedInput]) -> list[Item]:
        for i, item in enumerate(inputs):
            if item.WhichOneof("input") == "tokens":
                raise invalid(f"'input[{i}]': this model takes text, not token arrays.", f"input[{i}]")
        return self._tokenizer.prepare(inputs)

    async def embed(self, items: Sequence[Item]) -> np.ndarray:
        s = self._settings
        texts = np.array([[item.text.encode()] for item in items], dtype=np.object_)
        tensor = triton.InferInput(s.triton_input, list(texts.shape), "BYTES")
        tensor.set_data_from_numpy(texts)
        result = await self._pool.infer(
            s.upstream_model,
            [tensor],
            outputs=[triton.InferRequestedOutput(s.triton_output)],
            client_timeout=s.upstream_timeout_seconds,
        )
        vectors = result.as_numpy(s.triton_output)
        if vectors is None or vectors.shape[0] != len(items):
            raise unavailable("The model server's answer does not hold one vector per input.")
        return vectors.astype(np.float32, copy=False)

    async def ready(self) -> bool:
        return await self._pool.ready()

    async def close(self) -> None:
        await self._pool.close()

