"""Engine adapters, one file per runtime; ``load_engine`` picks one by setting."""

from __future__ import annotations

import importlib

from modelplex_speech.engine import SpeechEngine
from modelplex_speech.settings import SpeechSettings

# engine name -> "module:class"; imported lazily, each adapter pulls in its own runtime's libraries.
ADAPTERS = {
    "espeak": "modelplex_speech.adapters.espeak:EspeakEngine",
}


def load_engine(settings: SpeechSettings) -> SpeechEngine:
    if settings.engine not in ADAPTERS:
        raise SystemExit(f"unknown speech engine {settings.engine!r}; choose one of {', '.join(ADAPTERS)}")
    module, name = ADAPTERS[settings.engine].split(":")
    return getattr(importlib.import_module(module), name)(settings)
