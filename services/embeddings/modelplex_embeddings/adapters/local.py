"""engine=local: all-MiniLM-L6-v2 (or any BERT sentence encoder folder) on numpy, in-process."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from modelplex.v1 import catalog_pb2, embeddings_pb2
from modelplex_embeddings.bert import BertEncoder
from modelplex_embeddings.engine import Item
from modelplex_embeddings.settings import LocalSettings
from modelplex_embeddings.tokenization import InputTokenizer, packaged_minilm


def _model_max_tokens(model_dir: Path) -> int:
    config = model_dir / "sentence_bert_config.json"
    return json.loads(config.read_text()).get("max_seq_length", 0) if config.exists() else 0


class LocalEngine:
    def __init__(self, settings: LocalSettings) -> None:
        model_dir = Path(settings.model_dir) if settings.model_dir else packaged_minilm()
        self._encoder = BertEncoder(model_dir)
        max_tokens = settings.max_input_tokens or _model_max_tokens(model_dir) or self._encoder.max_positions
        self._tokenizer = InputTokenizer(model_dir / "tokenizer.json", min(max_tokens, self._encoder.max_positions))
        self._forward_batch = settings.forward_batch
        # One thread: numpy's BLAS already spreads a matmul over the cores.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")
        self.capabilities = catalog_pb2.EmbeddingsCapabilities(
            dimensions=self._encoder.hidden,
            matryoshka=False,
            max_inputs=2048,
            max_input_tokens=self._tokenizer.max_tokens,
        )

    def prepare(self, inputs: Sequence[embeddings_pb2.EmbedInput]) -> list[Item]:
        return self._tokenizer.prepare(inputs)

    async def embed(self, items: Sequence[Item]) -> np.ndarray:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._encode, [i.ids for i in items])

    def _encode(self, batch: list[list[int]]) -> np.ndarray:
        # Forward passes over inputs of similar length: padding costs compute, sorting saves most of it.
        order = sorted(range(len(batch)), key=lambda k: len(batch[k]))
        out = np.empty((len(batch), self._encoder.hidden), dtype=np.float32)
        for start in range(0, len(order), self._forward_batch):
            chunk = order[start : start + self._forward_batch]
            out[chunk] = self._encoder.encode([batch[k] for k in chunk])
        return out

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
