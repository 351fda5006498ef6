"""Engine adapters, one file per runtime; ``load_engine`` picks one by the ``engine`` setting."""

from __future__ import annotations

import importlib

from modelplex_images.engine import ImagesEngine
from modelplex_images.settings import ImagesSettings

# engine name -> (module, class); imported lazily, each adapter pulls in its own runtime's libraries.
ADAPTERS: dict[str, tuple[str, str]] = {
    "procedural": ("modelplex_images.adapters.procedural", "ProceduralEngine"),
    "triton": ("modelplex_images.adapters.triton", "TritonImagesEngine"),
}


def load_engine(settings: ImagesSettings) -> ImagesEngine:
    if settings.engine not in ADAPTERS:
        raise SystemExit(f"images: unknown engine {settings.engine!r}; known: {', '.join(ADAPTERS)}")
    module, name = ADAPTERS[settings.engine]
    return getattr(importlib.import_module(module), name)(settings)
