"""The EmbeddingsService: request checks, micro-batching and `dimensions` around an engine."""

from __future__ import annotations

import grpc
import numpy as np

from modelplex.v1 import catalog_pb2, common_pb2, embeddings_pb2, embeddings_pb2_grpc
from modelplex_embeddings.batching import MicroBatcher
from modelplex_embeddings.bert import normalise
from modelplex_embeddings.engine import EmbeddingEngine
from modelplex_embeddings.settings import BatchingSettings
from modelplex_kit.modalities.embeddings import check_embed_request
from modelplex_kit.telemetry import PROMPT_TOKENS, REQUEST_QUEUE_TIME


class EmbeddingsServicer(embeddings_pb2_grpc.EmbeddingsServiceServicer):
    def __init__(self, engine: EmbeddingEngine, batching: BatchingSettings, model_label: str = "embeddings") -> None:
        self._engine = engine
        self._capabilities = catalog_pb2.Capabilities(embeddings=engine.capabilities)
        queue_time = REQUEST_QUEUE_TIME.labels(model_label)
        self.batcher = MicroBatcher(engine.embed, batching, on_start=queue_time.observe)

    async def Embed(self, request, context: grpc.aio.ServicerContext) -> embeddings_pb2.EmbedResponse:
        check_embed_request(request, self._capabilities)
        items = self._engine.prepare(request.inputs)
        rows = resize(await self.batcher.submit(items), request.dimensions)
        tokens = sum(item.tokens for item in items)
        PROMPT_TOKENS.labels(request.model).inc(tokens)
        return embeddings_pb2.EmbedResponse(
            model=request.model,
            embeddings=[embeddings_pb2.Embedding(index=i, values=row.tolist()) for i, row in enumerate(rows)],
            usage=common_pb2.Usage(prompt_tokens=tokens, total_tokens=tokens),
        )

    async def close(self) -> None:
        await self.batcher.close()
        await self._engine.close()


def resize(rows: np.ndarray, dimensions: int) -> np.ndarray:
    """OpenAI's `dimensions` for matryoshka models: keep the first `dimensions` values, re-normalise.
    (Whether the model allows it was checked against its capabilities already.)"""
    if not dimensions or dimensions >= rows.shape[1]:
        return rows
    return normalise(rows[:, :dimensions])
