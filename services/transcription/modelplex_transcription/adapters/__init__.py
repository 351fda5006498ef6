"""Engine adapters, one file per runtime, chosen by ``MODELPLEX_TRANSCRIPTION_ENGINE``.

Each row: engine name -> (module:class, the settings model that engine reads).
"""

from __future__ import annotations

import importlib

from modelplex_transcription.engine import TranscriptionEngine
from modelplex_transcription.settings import PocketsphinxSettings, TranscriptionSettings, UpstreamSettings

_POCKETSPHINX = ("modelplex_transcription.adapters.pocketsphinx:PocketsphinxEngine", PocketsphinxSettings)
ENGINES: dict[str, tuple[str, type[TranscriptionSettings]]] = {
    "pocketsphinx": _POCKETSPHINX,
    # The deploy manifests name the CPU default `local`, as for embeddings.
    "local": _POCKETSPHINX,
    "openai": ("modelplex_transcription.adapters.openai_http:OpenAIHttpEngine", UpstreamSettings),
    "triton": ("modelplex_transcription.adapters.triton:TritonEngine", UpstreamSettings),
}


def engine_settings(settings: TranscriptionSettings) -> TranscriptionSettings:
    """The chosen engine's own settings model, read from the same environment."""
    if settings.engine not in ENGINES:
        raise ValueError(
            f"MODELPLEX_TRANSCRIPTION_ENGINE={settings.engine!r} is not an engine; choose one of {', '.join(ENGINES)}"
        )
    return ENGINES[settings.engine][1]()


def load_engine(settings: TranscriptionSettings) -> TranscriptionEngine:
    # Imported lazily: each adapter pulls in its own runtime's libraries.
    if not isinstance(settings, ENGINES.get(settings.engine, ("", type(None)))[1]):
        settings = engine_settings(settings)
    module, name = ENGINES[settings.engine][0].split(":")
    return getattr(importlib.import_module(module), name)(settings)
