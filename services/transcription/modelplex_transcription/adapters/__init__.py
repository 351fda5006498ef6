"""Engine adapters, one file per runtime; ``load_engine`` picks one by setting."""

from __future__ import annotations

import importlib

from modelplex_transcription.engine import TranscriptionEngine
from modelplex_transcription.settings import TranscriptionSettings

# engine name -> "module:class"; imported lazily, each adapter pulls in its own runtime's libraries.
ADAPTERS = {
    "pocketsphinx": "modelplex_transcription.adapters.pocketsphinx:PocketsphinxEngine",
}


def load_engine(settings: TranscriptionSettings) -> TranscriptionEngine:
    if settings.engine not in ADAPTERS:
        raise SystemExit(f"unknown transcription engine {settings.engine!r}; choose one of {', '.join(ADAPTERS)}")
    module, name = ADAPTERS[settings.engine].split(":")
    return getattr(importlib.import_module(module), name)(settings)
