"""Engine adapters, one file per runtime, chosen from a registry by ``MODELPLEX_TEXT_ENGINE``."""

from __future__ import annotations

import importlib
from typing import NamedTuple

from modelplex_text.engine import TextEngine
from modelplex_text.settings import LlamaCppSettings, OpenAISettings, TextSettings, TritonSettings


class EngineEntry(NamedTuple):
    #: "module:Class", imported only when chosen: each adapter pulls in its own runtime's libraries.
    adapter: str
    settings: type[TextSettings]


ENGINES: dict[str, EngineEntry] = {
    "llamacpp": EngineEntry("modelplex_text.adapters.llamacpp:LlamaCppEngine", LlamaCppSettings),
    "openai": EngineEntry("modelplex_text.adapters.openai_http:OpenAIHttpEngine", OpenAISettings),
    "triton": EngineEntry("modelplex_text.adapters.triton:TritonEngine", TritonSettings),
}


def engine_entry(name: str) -> EngineEntry:
    try:
        return ENGINES[name]
    except KeyError:
        known = ", ".join(sorted(ENGINES))
        raise SystemExit(f"MODELPLEX_TEXT_ENGINE={name!r} is not an engine; choose one of: {known}") from None


def load_engine(settings: TextSettings) -> TextEngine:
    """The engine ``settings.engine`` names, configured from the environment by its own settings model."""
    entry = engine_entry(settings.engine)
    engine_settings = settings if isinstance(settings, entry.settings) else entry.settings()
    module, _, cls = entry.adapter.partition(":")
    return getattr(importlib.import_module(module), cls)(engine_settings)
