"""Engine adapters, one file per runtime, chosen by ``MODELPLEX_TEXT_ENGINE``."""

from __future__ import annotations

from modelplex_kit.engines import EngineEntry, EngineRegistry
from modelplex_text.settings import LlamaCppSettings, OpenAISettings, TritonSettings

ENGINES = EngineRegistry(
    "text",
    {
        "llamacpp": EngineEntry("modelplex_text.adapters.llamacpp:LlamaCppEngine", LlamaCppSettings),
        "openai": EngineEntry("modelplex_text.adapters.openai_http:OpenAIHttpEngine", OpenAISettings),
        "triton": EngineEntry("modelplex_text.adapters.triton:TritonEngine", TritonSettings),
    },
)
engine_entry = ENGINES.entry
engine_settings = ENGINES.settings
load_engine = ENGINES.load
