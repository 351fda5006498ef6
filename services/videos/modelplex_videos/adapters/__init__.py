"""Engine adapters, one file per runtime; ``load_engine`` picks one by the ``engine`` setting."""

from __future__ import annotations

import importlib

from modelplex_videos.engine import VideosEngine
from modelplex_videos.settings import VideosSettings

# engine name -> (module, class); imported lazily, each adapter pulls in its own runtime's libraries.
ADAPTERS: dict[str, tuple[str, str]] = {
    "procedural": ("modelplex_videos.adapters.procedural", "ProceduralVideoEngine"),
    "triton": ("modelplex_videos.adapters.triton", "TritonVideosEngine"),
}


def load_engine(settings: VideosSettings) -> VideosEngine:
    if settings.engine not in ADAPTERS:
        raise SystemExit(f"videos: unknown engine {settings.engine!r}; known: {', '.join(ADAPTERS)}")
    module, name = ADAPTERS[settings.engine]
    return getattr(importlib.import_module(module), name)(settings)
