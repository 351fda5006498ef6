"""The per-choice loop every text-emitting adapter shares.

An adapter supplies one primitive, "generate one choice's text": an async
iterator of text pieces ending with a :class:`ChoiceEnd`. This module does the
rest of the OpenAI semantics around it, the same for every engine: ``suffix``
refusal, ``n`` choices one after another, ``echo``, tool-call parsing
(:class:`ChoiceAssembler`), ``seed + index`` per choice, the request's
wall-clock deadline, and usage totals.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass

from modelplex.v1 import common_pb2, text_pb2
from modelplex_kit.errors import unsupported
from modelplex_kit.modalities.text import max_tokens_too_large
from modelplex_text.assembler import ChoiceAssembler
from modelplex_text.engine import EngineEvent, Progress

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ChoiceEnd:
    """How one choice ended."""

    #: The engine's reason: "stop" (end of text, stop string) or "length" (max_tokens, context, deadline).
    reason: str
    #: Tokens generated, exactly: the end-of-generation token is not one, a stop string's last token is.
    completion_tokens: int
    #: Prompt tokens served from the engine's cache, where it knows (None: it does not say).
    cached_prompt_tokens: int | None = None
    #: True when the request's wall-clock limit ended it (reason is then "length").
    timed_out: bool = False


@dataclass(frozen=True, slots=True)
class ChoiceText:
    """Text one choice generated, and the logprobs of the tokens behind it (when asked for)."""

    text: str
    #: One per token, in order; may run ahead of ``text`` (a stop string's possible start is held back).
    logprobs: tuple[text_pb2.TokenLogprob, ...] = ()


ChoicePiece = ChoiceText | ChoiceEnd
#: (choice index, seed for this choice or None, monotonic deadline or None) -> its text pieces, then a ChoiceEnd.
GenerateChoice = Callable[[int, int | None, float | None], AsyncIterator[ChoicePiece]]


def refuse_suffix(request: text_pb2.GenerateRequest) -> None:
    if request.completion.suffix:
        raise unsupported("suffix", "`suffix`")


def completion_budget(request: text_pb2.GenerateRequest, prompt_tokens: int, context_length: int) -> int:
    """Tokens a choice may generate: max_tokens, checked against what the context leaves (vLLM's rule);
    without one, what the context leaves, capped by the model's default output limit if it has one."""
    room = context_length - prompt_tokens
    if not request.sampling.HasField("max_tokens"):
        # The catalog's default output limit (the client set none) is a cap, never a refusal.
        if request.sampling.HasField("default_max_tokens"):
            return min(room, request.sampling.default_max_tokens)
        return room
    asked = request.sampling.max_tokens
    if asked > room:
        raise max_tokens_too_large(asked, context_length, prompt_tokens)
    return asked


def deadline_after(seconds: float) -> float | None:
    """A monotonic deadline ``seconds`` from now; 0 (or less) means none."""
    return time.monotonic() + seconds if seconds > 0 else None


async def stream_choices(
    request: text_pb2.GenerateRequest,
    generate: GenerateChoice,
    *,
    prompt_tokens: int,
    tool_call_forced: bool | None,
    max_seconds: float,
) -> AsyncIterator[EngineEvent]:
    """Runs ``max(1, n)`` choices through ``generate`` and yields the engine events of the streaming contract."""
    usage = common_pb2.Usage(prompt_tokens=prompt_tokens)
    seed = request.sampling.seed if request.sampling.HasField("seed") else None
    deadline = deadline_after(max_seconds)  # one budget for the whole request, every choice included
    for index in range(max(1, request.n)):
        if request.completion.echo:
            yield text_pb2.ChoiceDelta(index=index, text=request.completion.prompt)
        assembler = ChoiceAssembler(index, tool_call_forced)
        # Logprobs of tokens whose text the assembler still holds: they ride on the next delta out.
        logprobs: list[text_pb2.TokenLogprob] = []
        # aclosing: when our consumer leaves, the engine's generation is aborted now, not at garbage collection.
        async with aclosing(generate(index, None if seed is None else seed + index, deadline)) as pieces:
            generated = 0  # this choice's pieces so far: about one per token (a piece may hold several)
            async for piece in pieces:
                if isinstance(piece, ChoiceText):
                    generated += 1
                    yield Progress(usage.prompt_tokens, usage.completion_tokens + generated)
                    logprobs.extend(piece.logprobs)
                    if (delta := assembler.feed(piece.text)) is not None:
                        yield _with_logprobs(delta, logprobs)
                    continue
                if piece.timed_out:
                    log.info("generation stopped at the wall-clock limit", extra={"limit_seconds": max_seconds})
                if index == 0 and piece.cached_prompt_tokens is not None:
                    usage.cached_prompt_tokens = piece.cached_prompt_tokens
                    usage.cache_creation_prompt_tokens = prompt_tokens - piece.cached_prompt_tokens
                usage.completion_tokens += piece.completion_tokens
                for delta in assembler.finish(piece.reason):
                    yield _with_logprobs(delta, logprobs)
    usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
    yield usage


def _with_logprobs(delta: text_pb2.ChoiceDelta, logprobs: list[text_pb2.TokenLogprob]) -> text_pb2.ChoiceDelta:
    """``delta`` carrying (and taking from ``logprobs``) every logprob not yet sent."""
    delta.logprobs.extend(logprobs)
    logprobs.clear()
    return delta
