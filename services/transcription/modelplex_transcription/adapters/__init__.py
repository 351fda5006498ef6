"""Engine adapters, one file per runtime, chosen by ``MODELPLEX_TRANSCRIPTION_ENGINE``."""

from __future__ import annotations

from modelplex_kit.engines import EngineEntry, EngineRegistry
from modelplex_transcription.settings import PocketsphinxSettings, UpstreamSettings

_POCKETSPHINX = EngineEntry("modelplex_transcription.adapters.pocketsphinx:PocketsphinxEngine", PocketsphinxSettings)

ENGINES = EngineRegistry(
    "transcription",
    {
        "pocketsphinx": _POCKETSPHINX,
        # The deploy manifests name the CPU default `local`, as for embeddings.
        "local": _POCKETSPHINX,
        "openai": EngineEntry("modelplex_transcription.adapters.openai_http:OpenAIHttpEngine", UpstreamSettings),
        "triton": EngineEntry("modelplex_transcription.adapters.triton:TritonEngine", UpstreamSettings),
    },
)
engine_settings = ENGINES.settings
load_engine = ENGINES.load
