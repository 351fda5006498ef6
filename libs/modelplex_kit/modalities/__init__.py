"""The modality registry: the one table of what Modelplex serves.

Each row (a :class:`Modality`, defined in the modality's own module next to its
catalog capabilities and request check) says which backend package serves the
modality, its settings prefix, its gRPC stub and how requests are checked. The
catalog's validation, ``make run``'s launcher and the edge's routing all read
this table; the Helm chart's ``backends`` values mirror it (a test keeps them
equal). Adding a modality adds one row here.
"""

from __future__ import annotations

from modelplex_kit.modalities import embeddings, images, speech, text, transcription, videos
from modelplex_kit.modalities.base import CapabilitySpec, Modality

_ROWS = (text.MODALITY, embeddings.MODALITY, speech.MODALITY, transcription.MODALITY, images.MODALITY, videos.MODALITY)
REGISTRY: dict[str, Modality] = {row.name: row for row in _ROWS}
_BY_PROTO = {row.proto: row for row in REGISTRY.values()}


def by_proto(value: int) -> Modality | None:
    return _BY_PROTO.get(value)


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


__all__ = ["REGISTRY", "CapabilitySpec", "Modality", "by_proto", "names"]
