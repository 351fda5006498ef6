"""Engine adapters, one file per runtime, chosen by ``MODELPLEX_IMAGES_ENGINE``."""

from __future__ import annotations

from modelplex_kit.engines import EngineEntry, EngineRegistry

ENGINES = EngineRegistry(
    "images",
    {
        "procedural": EngineEntry("modelplex_images.adapters.procedural:ProceduralEngine"),
        "triton": EngineEntry("modelplex_images.adapters.triton:TritonImagesEngine"),
    },
)
engine_settings = ENGINES.settings
load_engine = ENGINES.load
