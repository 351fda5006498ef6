"""Logprobs from the llama.cpp engine, with the real SmolLM2 model: scored from the logits each token was
drawn from, after the constraint's mask."""

from __future__ import annotations

import asyncio
import codecs
import json
import math

import pytest

from modelplex.v1 import catalog_pb2, common_pb2, text_pb2
from modelplex_text.adapters.llamacpp import LlamaCppEngine
from modelplex_text.engine import Progress
from modelplex_text.servicer import check, merge_delta
from modelplex_text.settings import LlamaCppSettings

ANSWER = {
    "type": "object",
    "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}, "sure": {"type": "boolean"}},
    "required": ["answer", "sure"],
}


@pytest.fixture(scope="module")
def engine():
    engine = LlamaCppEngine(LlamaCppSettings(context_length=1024, parallel=2))
    yield engine
    asyncio.run(engine.close())


def chat(text: str, *, top_logprobs: int = 5, temperature: float = 0.0, max_tokens: int = 24, **fields):
    message = text_pb2.ChatMessage(role="user", content=[text_pb2.ContentPart(text=text)])
    sampling = text_pb2.SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=11)
    return text_pb2.GenerateRequest(
        chat=text_pb2.ChatInput(messages=[message]),
        sampling=sampling,
        logprobs=True,
        top_logprobs=top_logprobs,
        **fields,
    )


async def deltas(engine: LlamaCppEngine, request: text_pb2.GenerateRequest) -> tuple[list, common_pb2.Usage]:
    await check(request, catalog_pb2.Capabilities(text=engine.capabilities))
    # Running totals (Progress) are the servicer's business, not a choice's.
    events = [event async for event in engine.stream(request) if not isinstance(event, Progress)]
    return events[:-1], events[-1]


def merged(events: list) -> text_pb2.Choice:
    choice = text_pb2.Choice(index=0)
    for event in events:
        merge_delta(choice, event)
    return choice


async def test_greedy_picks_the_top_alternative_and_the_alternatives_are_a_distribution(engine):
    events, usage = await deltas(engine, chat("Name three fruits.", top_logprobs=20))
    choice = merged(events)
    assert len(choice.logprobs) == usage.completion_tokens > 0  # one entry per generated token
    for entry in choice.logprobs:
        assert len(entry.top_logprobs) == 20  # unconstrained: every token is possible
        best = entry.top_logprobs[0]
        assert (best.token_bytes, best.logprob) == (entry.token_bytes, entry.logprob)
        probabilities = [math.exp(t.logprob) for t in entry.top_logprobs]
        assert probabilities == sorted(probabilities, reverse=True)
        assert sum(probabilities) <= 1.0 + 1e-6
        assert entry.logprob <= 0.0
    assert b"".join(entry.token_bytes for entry in choice.logprobs).decode() == choice.text


async def test_each_streamed_delta_carries_the_logprobs_of_its_own_tokens(engine):
    events, _ = await deltas(engine, chat("Say hello.", top_logprobs=0))
    assert len([event for event in events if event.text]) > 1
    scored, text = b"", ""
    for delta in events:
        scored += b"".join(lp.token_bytes for lp in delta.logprobs)
        text += delta.text
        # The text so far is exactly what the tokens so far spell (a character split across tokens
        # is sent once complete).
        assert codecs.getincrementaldecoder("utf-8")().decode(scored) == text
        assert all(not lp.top_logprobs for lp in delta.logprobs)  # top_logprobs=0: the chosen token only


async def test_sampled_tokens_are_scored_before_temperature(engine):
    """The same prompt greedy and at temperature 1.5 from the same seed: the first token's distribution
    is the model's either way (temperature shapes the draw, not the reported logprobs)."""
    greedy, _ = await deltas(engine, chat("Count to three.", top_logprobs=5, max_tokens=1))
    hot, _ = await deltas(engine, chat("Count to three.", top_logprobs=5, max_tokens=1, temperature=1.5))
    first_greedy, first_hot = merged(greedy).logprobs[0], merged(hot).logprobs[0]
    assert first_hot.top_logprobs[0].token_bytes == first_greedy.top_logprobs[0].token_bytes

    def spread(entry) -> float:  # best minus fifth: temperature T divides it by T
        return entry.top_logprobs[0].logprob - entry.top_logprobs[-1].logprob

    # Equal within the noise of a cached versus a recomputed prompt; scored after temperature 1.5,
    # the spread would shrink by a third.
    assert spread(first_greedy) > 0.6
    assert spread(first_hot) == pytest.approx(spread(first_greedy), abs=0.1)


async def test_constrained_logprobs_are_over_the_allowed_tokens_only(engine):
    schema = text_pb2.ResponseFormat(type=text_pb2.ResponseFormat.TYPE_JSON_SCHEMA, schema_json=json.dumps(ANSWER))
    request = chat("Is the sky blue? Answer in JSON.", top_logprobs=20, max_tokens=40, response_format=schema)
    events, _ = await deltas(engine, request)
    choice = merged(events)
    assert json.loads(choice.text)["answer"] in ("yes", "no")
    narrowed = [entry for entry in choice.logprobs if len(entry.top_logprobs) < 20]
    # The schema fixes most of the output ({"answer": ..., "sure": ...}): there the mask leaves fewer than 20
    # tokens, and the alternatives are all of them, so they hold all the probability. Scored before the
    # mask, every position would list 20 tokens of the whole vocabulary.
    assert len(narrowed) >= 3
    for entry in narrowed:
        assert sum(math.exp(t.logprob) for t in entry.top_logprobs) == pytest.approx(1.0, abs=1e-3)
        assert entry.token_bytes in [t.token_bytes for t in entry.top_logprobs]
    assert any(len(entry.top_logprobs) == 1 and entry.logprob == pytest.approx(0.0) for entry in narrowed)


async def test_without_logprobs_none_are_computed(engine):
    request = chat("Say hello.")
    request.logprobs, request.top_logprobs = False, 0
    events, _ = await deltas(engine, request)
    assert all(not event.logprobs for event in events)
