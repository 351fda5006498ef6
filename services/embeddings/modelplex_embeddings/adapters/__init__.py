"""Engine adapters, one file per runtime, chosen by ``MODELPLEX_EMBEDDINGS_ENGINE``."""

from __future__ import annotations

from modelplex_embeddings.settings import LocalSettings, RemoteSettings
from modelplex_kit.engines import EngineEntry, EngineRegistry

ENGINES = EngineRegistry(
    "embeddings",
    {
        "local": EngineEntry("modelplex_embeddings.adapters.local:LocalEngine", LocalSettings),
        "openai": EngineEntry("modelplex_embeddings.adapters.openai_http:OpenAIHttpEngine", RemoteSettings),
        "triton": EngineEntry("modelplex_embeddings.adapters.triton:TritonEngine", RemoteSettings),
    },
)
engine_settings = ENGINES.settings
load_engine = ENGINES.load
