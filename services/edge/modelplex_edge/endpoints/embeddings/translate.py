"""Embeddings: EmbeddingRequest -> EmbedRequest, and EmbedResponse -> OpenAI's CreateEmbeddingResponse."""

from __future__ import annotations

import base64
import struct
from typing import Any

from modelplex.v1 import common_pb2, embeddings_pb2
from modelplex_edge.endpoints.embeddings.protocol import EmbeddingRequest
from modelplex_edge.endpoints.text_shared import estimate_tokens


def cost(body: EmbeddingRequest) -> int:
    items = body.inputs()
    return estimate_tokens(item for item in items if isinstance(item, str)) + sum(
        len(item) for item in items if isinstance(item, list)
    )


def _input(item: str | list[int]) -> embeddings_pb2.EmbedInput:
    if isinstance(item, str):
        return embeddings_pb2.EmbedInput(text=item)
    return embeddings_pb2.EmbedInput(tokens=embeddings_pb2.TokenIds(ids=item))


def to_proto(body: EmbeddingRequest, model_id: str, meta: common_pb2.RequestMeta) -> embeddings_pb2.EmbedRequest:
    return embeddings_pb2.EmbedRequest(
        meta=meta, model=model_id, inputs=[_input(item) for item in body.inputs()], dimensions=body.dimensions or 0
    )


def _vector(values: Any, encoding: str) -> list[float] | str:
    if encoding == "base64":  # little-endian float32, what the SDKs decode
        return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
    return list(values)


def from_proto(response: embeddings_pb2.EmbedResponse, model_id: str, encoding: str) -> dict[str, Any]:
    data = [
        {"object": "embedding", "index": item.index, "embedding": _vector(item.values, encoding)}
        for item in sorted(response.embeddings, key=lambda e: e.index)
    ]
    usage = {"prompt_tokens": response.usage.prompt_tokens, "total_tokens": response.usage.prompt_tokens}
    return {"object": "list", "data": data, "model": model_id, "usage": usage}
