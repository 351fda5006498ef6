"""OpenAI sampling parameters with OpenAI's defaults, for engines that take raw values."""

from __future__ import annotations

from typing import Any

from modelplex.v1 import text_pb2


def sampling_kwargs(
    request: text_pb2.GenerateRequest, default_temperature: float = 1.0, default_top_p: float = 1.0
) -> dict[str, Any]:
    """Unset temperature/top_p take the model's defaults (OpenAI's are 1.0; like vLLM, a model's
    recommended generation settings win); max_tokens None means "until the context ends"."""
    s = request.sampling
    return {
        "temperature": s.temperature if s.HasField("temperature") else default_temperature,
        "top_p": s.top_p if s.HasField("top_p") else default_top_p,
        "max_tokens": s.max_tokens if s.HasField("max_tokens") else None,
        "stop": list(s.stop),
        "presence_penalty": s.presence_penalty,
        "frequency_penalty": s.frequency_penalty,
    }
