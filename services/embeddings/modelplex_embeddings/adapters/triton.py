"""engine=triton: an embedding model on Triton (or any KServe v2 / Open Inference Protocol server)
over gRPC with ``tritonclient.grpc.aio``.

Layout (BAAI/bge-m3-style ensembles): one BYTES input ``[batch, 1]`` holding the
texts, one FP32 output ``[batch, dimensions]``; tensor names are settings.
Tokenizing happens here first (the upstream tokenizer.json) for exact usage and
context checks. Token-array inputs go to ``triton_token_input`` (INT64 ids ``[batch, longest]``,
zero-padded, with ``triton_mask_input`` beside them) where the model takes them, and are refused
otherwise, as the model takes text.

A request holds at most the model's ``max_batch_size`` rows (Triton refuses more: "inference
request batch-size must be <= 64"), read from its config on first use: a larger batch of inputs
is split into several requests, sent together.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np
import tritonclient.grpc.aio as triton
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException

from modelplex.v1 import embeddings_pb2
from modelplex_embeddings.adapters.openai_http import remote_capabilities, remote_tokenizer
from modelplex_embeddings.engine import Item
from modelplex_embeddings.settings import RemoteSettings
from modelplex_kit.errors import invalid, unavailable
from modelplex_kit.kserve_v2 import upstream_error
from modelplex_kit.pools.triton import TritonPool


class TritonEngine:
    def __init__(self, settings: RemoteSettings) -> None:
        if not settings.upstream_url or not settings.upstream_model:
            raise ValueError("engine=triton needs MODELPLEX_EMBEDDINGS_UPSTREAM_URL (host:port) and _UPSTREAM_MODEL")
        self._pool = TritonPool("embeddings", settings, settings.upstream_model)
        self._settings = settings
        self._tokenizer = remote_tokenizer(settings)
        self.capabilities = remote_capabilities(settings)
        self._max_batch: int | None = None  # the model's max_batch_size; 0: it takes no batch dimension

    def prepare(self, inputs: Sequence[embeddings_pb2.EmbedInput]) -> list[Item]:
        if not self._settings.triton_token_input:
            for i, item in enumerate(inputs):
                if item.WhichOneof("input") == "tokens":
                    raise invalid(f"'input[{i}]': this model takes text, not token arrays.", f"input[{i}]")
        return self._tokenizer.prepare(inputs)

    async def embed(self, items: Sequence[Item]) -> np.ndarray:
        size = await self._batch_size(len(items))
        parts = await asyncio.gather(*(self._infer(items[i : i + size]) for i in range(0, len(items), size)))
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    async def _batch_size(self, wanted: int) -> int:
        if self._max_batch is None:
            self._max_batch = await self._pool.call(self._read_max_batch)
        return self._max_batch or wanted  # 0: the model batches nothing itself; one request holds all

    async def _read_max_batch(self, client: InferenceServerClient) -> int:
        try:
            config = await client.get_model_config(self._settings.upstream_model, as_json=True)
        except InferenceServerException as exc:
            raise upstream_error(exc, self._settings.upstream_model) from exc
        return int(config.get("config", {}).get("max_batch_size", 0))

    async def _infer(self, items: Sequence[Item]) -> np.ndarray:
        s = self._settings
        # Texts as text; token arrays (no text) as ids, which every prepared item also has.
        texts = all(item.text is not None for item in items)
        tensors = [self._text_tensor(items)] if texts else self._token_tensors(items)
        result = await self._pool.infer(
            s.upstream_model,
            tensors,
            outputs=[triton.InferRequestedOutput(s.triton_output)],
            client_timeout=s.upstream_timeout_seconds,
        )
        vectors = result.as_numpy(s.triton_output)
        if vectors is None or vectors.shape[0] != len(items):
            raise unavailable("The model server's answer does not hold one vector per input.")
        return vectors.astype(np.float32, copy=False)

    def _text_tensor(self, items: Sequence[Item]) -> triton.InferInput:
        texts = np.array([[(item.text or "").encode()] for item in items], dtype=np.object_)
        tensor = triton.InferInput(self._settings.triton_input, list(texts.shape), "BYTES")
        tensor.set_data_from_numpy(texts)
        return tensor

    def _token_tensors(self, items: Sequence[Item]) -> list[triton.InferInput]:
        longest = max(item.tokens for item in items)
        ids = np.zeros((len(items), longest), dtype=np.int64)
        mask = np.zeros((len(items), longest), dtype=np.int64)
        for row, item in enumerate(items):
            ids[row, : item.tokens] = item.ids
            mask[row, : item.tokens] = 1
        tensors = []
        for name, array in ((self._settings.triton_token_input, ids), (self._settings.triton_mask_input, mask)):
            tensor = triton.InferInput(name, list(array.shape), "INT64")
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        return tensors

    async def ready(self) -> bool:
        return await self._pool.ready()

    async def close(self) -> None:
        await self._pool.close()
