"""The engine protocol every adapter implements.

Contract (unary, no streaming: an embedding is one answer per input):

- ``prepare(inputs)`` runs per request, before any batching: it tokenizes (or
  checks token ids), counts tokens exactly and refuses what the model cannot take
  with ``invalid(..., param="input[i]")`` where ``i`` is the index in *that*
  request. It must be cheap and must not block the event loop for long.
- ``embed(items)`` runs one engine call over items merged from several
  requests; it returns a float32 array ``[len(items), dimensions]`` whose row
  ``k`` belongs to ``items[k]``, as the model produces it (normalised where the
  model is). A failure fails the whole call; the batcher isolates a bad request
  by retrying the batch's requests one by one when the failure is a 400.
- ``capabilities`` says what the engine serves (the backend checks requests
  against it as the edge does against the catalog).
- ``close()`` releases connections/threads at shutdown.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from modelplex.v1 import catalog_pb2, embeddings_pb2


@dataclass(frozen=True, slots=True)
class Item:
    """One input, ready for an engine: its token ids (specials included) and, for text, the text."""

    ids: list[int]
    text: str | None = None

    @property
    def tokens(self) -> int:
        return len(self.ids)


class EmbeddingEngine(Protocol):
    capabilities: catalog_pb2.EmbeddingsCapabilities

    def prepare(self, inputs: Sequence[embeddings_pb2.EmbedInput]) -> list[Item]: ...

    async def embed(self, items: Sequence[Item]) -> np.ndarray: ...

    async def close(self) -> None: ...
