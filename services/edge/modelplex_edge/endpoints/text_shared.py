"""Pieces shared by the chat and legacy completions translators."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from modelplex.v1 import common_pb2, text_pb2

FINISH_REASONS = {
    text_pb2.FINISH_REASON_UNSPECIFIED: None,
    text_pb2.FINISH_REASON_STOP: "stop",
    text_pb2.FINISH_REASON_LENGTH: "length",
    text_pb2.FINISH_REASON_TOOL_CALLS: "tool_calls",
    text_pb2.FINISH_REASON_CONTENT_FILTER: "content_filter",
}


_TOOL_MODES = {
    "auto": text_pb2.ToolChoice.MODE_AUTO,
    "none": text_pb2.ToolChoice.MODE_NONE,
    "required": text_pb2.ToolChoice.MODE_REQUIRED,
}


def tool_choice(mode: str | None, function_name: str = "") -> text_pb2.ToolChoice:
    """OpenAI's ``tool_choice`` (chat's and the Responses API's): a mode, or a named function.

    Unset stays MODE_UNSPECIFIED (engines treat it as auto when tools are given), so a remote engine
    is sent no tool_choice: vLLM refuses one on a request without tools."""
    if function_name:
        return text_pb2.ToolChoice(mode=text_pb2.ToolChoice.MODE_NAMED, function_name=function_name)
    return text_pb2.ToolChoice(mode=_TOOL_MODES[mode]) if mode else text_pb2.ToolChoice()


def sampling(
    *,
    temperature: float | None,
    top_p: float | None,
    max_tokens: int | None,
    default_max_tokens: int | None = None,
    stop: str | list[str] | None,
    seed: int | None,
    presence_penalty: float | None,
    frequency_penalty: float | None,
) -> text_pb2.SamplingParams:
    params = text_pb2.SamplingParams(
        stop=[stop] if isinstance(stop, str) else (stop or []),
        presence_penalty=presence_penalty or 0.0,
        frequency_penalty=frequency_penalty or 0.0,
    )
    if temperature is not None:
        params.temperature = temperature
    if top_p is not None:
        params.top_p = top_p
    if max_tokens is not None:
        params.max_tokens = max_tokens
    elif default_max_tokens is not None:
        params.default_max_tokens = default_max_tokens
    if seed is not None:
        params.seed = seed
    return params


def usage_dict(usage: common_pb2.Usage) -> dict[str, Any]:
    """OpenAI's CompletionUsage plus the cache fields our compatibility page promises."""
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_prompt_tokens, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
        "cache_read_input_tokens": usage.cached_prompt_tokens,
        "cache_creation_input_tokens": usage.cache_creation_prompt_tokens,
    }


def add_usage(total: common_pb2.Usage, part: common_pb2.Usage) -> None:
    for field in (
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "cached_prompt_tokens",
        "cache_creation_prompt_tokens",
    ):
        setattr(total, field, getattr(total, field) + getattr(part, field))


def estimate_tokens(texts: Iterable[str]) -> int:
    """A cheap upper-leaning token estimate (about 4 bytes a token), for admission only: the
    backend counts exactly, and the gatekeeper reconciles with the real usage afterwards."""
    return estimate_bytes(sum(len(text.encode()) for text in texts))


def estimate_bytes(size: int) -> int:
    """``estimate_tokens`` of texts whose UTF-8 sizes add up to ``size``."""
    return size // 4 + 1
