"""Engine adapters, one file per runtime, chosen by ``MODELPLEX_VIDEOS_ENGINE``."""

from __future__ import annotations

from modelplex_kit.engines import EngineEntry, EngineRegistry

ENGINES = EngineRegistry(
    "videos",
    {
        "procedural": EngineEntry("modelplex_videos.adapters.procedural:ProceduralVideoEngine"),
        "triton": EngineEntry("modelplex_videos.adapters.triton:TritonVideosEngine"),
    },
)
engine_settings = ENGINES.settings
load_engine = ENGINES.load
