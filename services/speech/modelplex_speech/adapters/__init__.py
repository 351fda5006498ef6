"""Engine adapters, one file per runtime, chosen by ``MODELPLEX_SPEECH_ENGINE``."""

from __future__ import annotations

from modelplex_kit.engines import EngineEntry, EngineRegistry
from modelplex_speech.settings import EspeakSettings, TritonSettings

ENGINES = EngineRegistry(
    "speech",
    {
        "espeak": EngineEntry("modelplex_speech.adapters.espeak:EspeakEngine", EspeakSettings),
        "triton": EngineEntry("modelplex_speech.adapters.triton:TritonEngine", TritonSettings),
    },
)
engine_settings = ENGINES.settings
load_engine = ENGINES.load
