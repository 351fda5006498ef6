"""Engine adapters, one file per runtime, chosen by ``MODELPLEX_EMBEDDINGS_ENGINE``.

Each row: engine name -> (module:class, the settings model that engine reads).
"""

from __future__ import annotations

import importlib

from modelplex_embeddings.engine import EmbeddingEngine
from modelplex_embeddings.settings import EmbeddingsSettings, LocalSettings, RemoteSettings

ENGINES: dict[str, tuple[str, type[EmbeddingsSettings]]] = {
    "local": ("modelplex_embeddings.adapters.local:LocalEngine", LocalSettings),
    "openai": ("modelplex_embeddings.adapters.openai_http:OpenAIHttpEngine", RemoteSettings),
    "triton": ("modelplex_embeddings.adapters.triton:TritonEngine", RemoteSettings),
}


def engine_settings(settings: EmbeddingsSettings) -> EmbeddingsSettings:
    """The chosen engine's own settings model, read from the same environment."""
    if settings.engine not in ENGINES:
        raise ValueError(
            f"MODELPLEX_EMBEDDINGS_ENGINE={settings.engine!r} is not an engine; choose one of {', '.join(ENGINES)}"
        )
    return ENGINES[settings.engine][1]()


def load_engine(settings: EmbeddingsSettings) -> EmbeddingEngine:
    # Imported lazily: each adapter pulls in its own runtime's libraries.
    target, settings_model = ENGINES[settings.engine]
    module, name = target.split(":")
    if not isinstance(settings, settings_model):
        settings = engine_settings(settings)
    return getattr(importlib.import_module(module), name)(settings)
