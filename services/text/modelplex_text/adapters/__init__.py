"""Engine adapters, one file per runtime; ``load_engine`` picks one by setting."""

from __future__ import annotations

from modelplex_text.engine import TextEngine
from modelplex_text.settings import TextSettings


def load_engine(settings: TextSettings) -> TextEngine:
    # Imported lazily: each adapter pulls in its own runtime's libraries.
    if settings.engine == "llamacpp":
        from modelplex_text.adapters.llamacpp import LlamaCppEngine

        return LlamaCppEngine(settings)
    if settings.engine == "openai":
        from modelplex_text.adapters.openai_http import OpenAIHttpEngine

        return OpenAIHttpEngine(settings)
    from modelplex_text.adapters.triton import TritonEngine

    return TritonEngine(settings)
