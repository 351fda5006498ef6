"""Engine adapters, one file per runtime, chosen by ``MODELPLEX_SPEECH_ENGINE``.

Each row: engine name -> (module:class, the settings model that engine reads).
"""

from __future__ import annotations

import importlib

from modelplex_speech.engine import SpeechEngine
from modelplex_speech.settings import EspeakSettings, SpeechSettings, TritonSettings

ENGINES: dict[str, tuple[str, type[SpeechSettings]]] = {
    "espeak": ("modelplex_speech.adapters.espeak:EspeakEngine", EspeakSettings),
    "triton": ("modelplex_speech.adapters.triton:TritonEngine", TritonSettings),
}


def engine_settings(settings: SpeechSettings) -> SpeechSettings:
    """The chosen engine's own settings model, read from the same environment."""
    if settings.engine not in ENGINES:
        raise ValueError(
            f"MODELPLEX_SPEECH_ENGINE={settings.engine!r} is not an engine; choose one of {', '.join(ENGINES)}"
        )
    return ENGINES[settings.engine][1]()


def load_engine(settings: SpeechSettings) -> SpeechEngine:
    # Imported lazily: each adapter pulls in its own runtime's libraries.
    if not isinstance(settings, ENGINES.get(settings.engine, ("", type(None)))[1]):
        settings = engine_settings(settings)
    module, name = ENGINES[settings.engine][0].split(":")
    return getattr(importlib.import_module(module), name)(settings)
