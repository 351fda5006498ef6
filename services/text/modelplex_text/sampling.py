"""OpenAI sampling parameters with OpenAI's defaults, for engines that take raw values."""

from __future__ import annotations

from typing import Any

from modelplex.v1 import text_pb2


def sampling_kwargs(request: text_pb2.GenerateRequest) -> dict[str, Any]:
    """temperature/top_p default to 1.0 as in OpenAI's API; max_tokens None means "until the context ends"."""
    s = request.sampling
    return {
        "temperature": s.temperature if s.HasField("temperature") else 1.0,
        "top_p": s.top_p if s.HasField("top_p") else 1.0,
        "max_tokens": s.max_tokens if s.HasField("max_tokens") else None,
        "stop": list(s.stop),
        "presence_penalty": s.presence_penalty,
        "frequency_penalty": s.frequency_penalty,
    }
