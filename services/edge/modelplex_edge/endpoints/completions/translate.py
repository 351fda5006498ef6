"""Legacy completions: one GenerateRequest per prompt, results merged into OpenAI JSON."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from modelplex.v1 import catalog_pb2, common_pb2, text_pb2
from modelplex_edge.endpoints.completions.protocol import CompletionRequest
from modelplex_edge.endpoints.text_shared import FINISH_REASONS, add_usage, estimate_tokens, sampling, usage_dict
from modelplex_kit.errors import invalid, unsupported
from modelplex_kit.modalities.text import check_output_bound


def include_usage(body: CompletionRequest) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


def cost(body: CompletionRequest, model: catalog_pb2.Model) -> int:
    """Tokens to reserve at admission: a prompt estimate plus the output bound, for every prompt and choice.
    A bound the context can never hold is refused here, before admission."""
    check_output_bound(body.max_tokens, model.context_length)
    prompts = body.prompts() or []
    per_prompt = 16 if body.max_tokens is None else body.max_tokens
    return estimate_tokens(prompts) + per_prompt * (body.n or 1) * max(1, len(prompts))


def to_protos(body: CompletionRequest, model_id: str, meta: common_pb2.RequestMeta) -> list[text_pb2.GenerateRequest]:
    prompts = body.prompts()
    if prompts is None:
        raise invalid("Send the prompt as text or a non-empty list of texts (token ids are not supported).", "prompt")
    if body.logit_bias:
        raise unsupported("logit_bias", "`logit_bias`")
    params = sampling(
        temperature=body.temperature,
        top_p=body.top_p,
        max_tokens=16 if body.max_tokens is None else body.max_tokens,
        stop=body.stop,
        seed=body.seed,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
    )
    return [
        text_pb2.GenerateRequest(
            meta=meta,
            model=model_id,
            completion=text_pb2.CompletionInput(prompt=prompt, echo=bool(body.echo), suffix=body.suffix or ""),
            user=body.user or "",
            sampling=params,
            n=body.n or 1,
            # logprobs=0 still asks for the chosen tokens' logprobs (OpenAI, vLLM): only no alternatives.
            logprobs=body.logprobs is not None,
            top_logprobs=body.logprobs or 0,
        )
        for prompt in prompts
    ]


def _logprobs(items, start: int) -> dict[str, Any] | None:
    """The legacy logprobs object; ``start`` is the offset in the choice's text of the first token."""
    if not items:
        return None
    offsets = []
    for lp in items:
        offsets.append(start)
        start += len(lp.token)
    return {
        "tokens": [lp.token for lp in items],
        "token_logprobs": [lp.logprob for lp in items],
        "top_logprobs": [_alternatives(lp) for lp in items],
        "text_offset": offsets,
    }


def _alternatives(lp: text_pb2.TokenLogprob) -> dict[str, float]:
    """The most likely tokens, and always the chosen one (so up to ``logprobs`` + 1 entries, as OpenAI)."""
    alternatives = {t.token: t.logprob for t in lp.top_logprobs}
    alternatives.setdefault(lp.token, lp.logprob)
    return alternatives


def _first_offset(choice: text_pb2.Choice) -> int:
    """Where the tokens' text starts in a whole choice: after an echoed prompt the engine gave no
    logprobs for (the tokens then cover only the end of the text), else at 0."""
    return max(0, len(choice.text) - sum(len(lp.token) for lp in choice.logprobs))


def from_protos(responses: list[text_pb2.GenerateResponse], model_id: str) -> dict[str, Any]:
    """Merges one response per prompt; choice i of prompt p gets index p * n + i."""
    usage = common_pb2.Usage()
    choices = []
    for response in responses:
        add_usage(usage, response.usage)
        for choice in response.choices:
            choices.append(
                {
                    "index": len(choices),
                    "text": choice.text,
                    "logprobs": _logprobs(choice.logprobs, _first_offset(choice)),
                    "finish_reason": FINISH_REASONS[choice.finish_reason] or "stop",
                }
            )
    first = responses[0]
    return {
        "id": f"cmpl-{first.id}",
        "object": "text_completion",
        "created": first.created,
        "model": model_id,
        "choices": choices,
        "usage": usage_dict(usage),
    }


async def stream_chunks(
    streams: list[AsyncIterator[text_pb2.GenerateStreamResponse]],
    model_id: str,
    n: int,
    include_usage: bool,
) -> AsyncIterator[dict[str, Any]]:
    """text_completion chunks; prompts are streamed one after another, indexes kept distinct."""
    usage = common_pb2.Usage()
    completion_id = created = None
    for offset, stream in enumerate(streams):
        streamed: dict[int, int] = {}  # characters of text sent so far, per choice: the next token's offset
        async for message in stream:
            completion_id = completion_id or f"cmpl-{message.id}"
            created = created or message.created
            if message.HasField("usage"):
                add_usage(usage, message.usage)
                continue
            # One choice per chunk, as OpenAI streams them (an engine may batch several choices'
            # deltas in one message; a message of running totals only carries none).
            for d in message.deltas:
                start = streamed.get(d.index, 0)
                streamed[d.index] = start + len(d.text)
                choice = {
                    "index": offset * n + d.index,
                    "text": d.text,
                    "logprobs": _logprobs(d.logprobs, start),
                    "finish_reason": FINISH_REASONS[d.finish_reason],
                }
                chunk = {
                    "id": completion_id,
                    "object": "text_completion",
                    "created": created,
                    "model": model_id,
                    "choices": [choice],
                }
                yield chunk  # no "usage": null here: the spec's completion object has no nullable usage
    if include_usage:
        yield {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": model_id,
            "choices": [],
            "usage": usage_dict(usage),
        }
