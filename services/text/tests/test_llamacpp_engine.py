"""The llama.cpp engine (SmolLM2, continuous batching) through the real servicer over gRPC."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager

import grpc
import pytest

from modelplex.v1 import text_pb2
from modelplex_kit.errors import ServiceError
from modelplex_text.adapters.llamacpp import LlamaCppEngine
from modelplex_text.settings import LlamaCppSettings
from tests.support.text_service import text_service
from tests.support.until import until

# A loaded model: kept out of `make test-fast`.
pytestmark = pytest.mark.integration

CONTEXT = 512
STORY = "Write a long story about a dragon who learns to cook."


def chat(text: str, max_tokens: int | None = 16, temperature: float = 0.0, **fields) -> text_pb2.GenerateRequest:
    sampling = text_pb2.SamplingParams(temperature=temperature, **fields.pop("sampling", {}))
    if max_tokens is not None:
        sampling.max_tokens = max_tokens
    message = text_pb2.ChatMessage(role="user", content=[text_pb2.ContentPart(text=text)])
    return text_pb2.GenerateRequest(
        model="smollm2", chat=text_pb2.ChatInput(messages=[message]), sampling=sampling, **fields
    )


@asynccontextmanager
async def serving(**settings):
    """A real TextGenerationService over a llama.cpp engine, on a free loopback port."""
    engine = LlamaCppEngine(LlamaCppSettings(context_length=CONTEXT, **settings))
    try:
        async with text_service(engine) as stub:
            yield stub, engine
    finally:
        await engine.close()


@pytest.fixture(scope="module")
async def backend():
    async with serving(parallel=4, default_temperature=0.0) as pair:
        yield pair


@pytest.fixture(scope="module")
async def tight():
    """One slot, a short wait for it, and a one-second wall-clock limit per request."""
    async with serving(parallel=1, max_queue_wait_seconds=0.3, max_request_seconds=1.0) as pair:
        yield pair


async def timed_stream(stub, request) -> dict:
    """Streams ``request``, noting when each token arrived."""
    start, arrivals, text, usage, reasons = time.monotonic(), [], "", None, {}
    async for response in stub.GenerateStream(request):
        for delta in response.deltas:
            if delta.text:
                arrivals.append(time.monotonic() - start)
                text += delta.text
            if delta.finish_reason:
                reasons[delta.index] = delta.finish_reason
        if response.HasField("usage"):
            usage = response.usage
    return {"arrivals": arrivals, "text": text, "usage": usage, "reasons": reasons, "end": time.monotonic() - start}


async def rpc_error(call) -> ServiceError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return ServiceError.from_rpc_error(caught.value)


async def test_max_tokens_beyond_the_context_is_a_400_naming_it(backend):
    stub, _ = backend
    for call in (stub.Generate(chat("hi", max_tokens=CONTEXT)), _drain(stub.GenerateStream(chat("hi", CONTEXT)))):
        error = await rpc_error(call)
        assert error.status == grpc.StatusCode.INVALID_ARGUMENT
        assert error.param == "max_tokens"
        assert f"maximum context length is {CONTEXT} tokens" in error.message
    # What the context leaves is accepted.
    answer = await stub.Generate(chat("hi", max_tokens=CONTEXT - 40))
    assert answer.usage.prompt_tokens + answer.usage.completion_tokens <= CONTEXT


async def _drain(stream):
    async for _ in stream:
        pass


async def test_completion_tokens_are_exact_and_choices_seeded(backend):
    stub, _ = backend
    answer = await stub.Generate(chat(STORY, max_tokens=7))
    assert answer.choices[0].finish_reason == text_pb2.FINISH_REASON_LENGTH
    assert answer.usage.completion_tokens == 7
    seeded = chat(STORY, max_tokens=12, temperature=1.0, n=2, sampling={"seed": 5})
    first, again = await stub.Generate(seeded), await stub.Generate(seeded)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]  # seed + index, per choice
    alone = await stub.Generate(chat(STORY, max_tokens=12, temperature=1.0, sampling={"seed": 6}))
    assert alone.choices[0].text == first.choices[1].text  # choice 1 of seed 5 is seed 6


async def test_an_empty_completions_prompt_is_answered(backend):
    # OpenAI accepts prompt "" (the model starts from its document-start token); SmolLM2 adds no BOS, so
    # "" was zero tokens and llama.cpp failed: a 500 for a valid request.
    stub, _ = backend
    request = text_pb2.GenerateRequest(
        model="smollm2", completion=text_pb2.CompletionInput(prompt=""),
        sampling=text_pb2.SamplingParams(temperature=0.0, max_tokens=4),
    )
    answer = await stub.Generate(request)
    assert answer.usage.prompt_tokens == 1 and 0 < answer.usage.completion_tokens <= 4


async def test_a_repeated_prompt_reports_its_cached_prefix(backend):
    stub, _ = backend
    await stub.Generate(chat("Name a colour.", max_tokens=2))
    again = await stub.Generate(chat("Name a colour.", max_tokens=2))
    assert again.usage.cached_prompt_tokens == again.usage.prompt_tokens - 1
    assert again.usage.cache_creation_prompt_tokens == 1


async def test_concurrent_requests_all_progress_together(backend):
    stub, _ = backend
    runs = await asyncio.gather(*(timed_stream(stub, chat(f"{STORY} Part {i}.", max_tokens=24)) for i in range(4)))
    for run in runs:
        assert run["usage"].completion_tokens == 24
        assert run["reasons"] == {0: text_pb2.FINISH_REASON_LENGTH}
    # Batched, not one after another: every stream had its first token before any stream ended,
    # and their token streams overlap for most of their length (FIFO would give disjoint spans).
    assert max(run["arrivals"][0] for run in runs) < min(run["end"] for run in runs)
    halfway = [run["arrivals"][len(run["arrivals"]) // 2] for run in runs]
    assert max(halfway) < min(run["end"] for run in runs)


async def test_a_constrained_sequence_batched_with_free_ones_stays_valid(backend):
    stub, _ = backend
    json_request = chat(
        "Describe a cat as JSON.",
        max_tokens=60,
        response_format=text_pb2.ResponseFormat(type=text_pb2.ResponseFormat.TYPE_JSON_OBJECT),
    )
    free = [timed_stream(stub, chat(f"{STORY} ({i})", max_tokens=30)) for i in range(2)]
    constrained, *_ = await asyncio.gather(stub.Generate(json_request), *free)
    choice = constrained.choices[0]
    if choice.finish_reason == text_pb2.FINISH_REASON_STOP:
        assert isinstance(json.loads(choice.text), dict)
    else:  # cut by max_tokens: still JSON-shaped so far
        assert choice.text.lstrip().startswith("{")


async def test_aborting_one_stream_leaves_the_others_running(backend):
    stub, engine = backend
    others = [asyncio.create_task(timed_stream(stub, chat(f"{STORY} #{i}", max_tokens=40))) for i in range(2)]
    doomed = stub.GenerateStream(chat(STORY, max_tokens=300))
    received = 0
    async for response in doomed:
        received += sum(bool(d.text) for d in response.deltas)
        if received >= 2:
            break
    doomed.cancel()
    for run in await asyncio.gather(*others):
        assert run["usage"].completion_tokens == 40
        assert run["reasons"] == {0: text_pb2.FINISH_REASON_LENGTH}
    # The aborted sequence leaves its slot between two steps.
    await until(lambda: engine._scheduler._active() == [], timeout=60)


async def test_the_wall_clock_limit_ends_generation_with_length(tight, caplog):
    stub, _ = tight
    caplog.set_level(logging.INFO, logger="modelplex_text.choices")
    start = time.monotonic()
    answer = await stub.Generate(chat(STORY, max_tokens=400, temperature=1.0))
    assert time.monotonic() - start < 5.0
    assert answer.choices[0].finish_reason == text_pb2.FINISH_REASON_LENGTH
    assert answer.usage.completion_tokens < 400
    assert any("wall-clock limit" in record.getMessage() for record in caplog.records)


@pytest.fixture(scope="module")
async def one_busy_slot():
    """One slot and a short wait for it, with room for a request to hold that slot for many seconds."""
    async with serving(parallel=1, max_queue_wait_seconds=0.3, max_request_seconds=60.0) as pair:
        yield pair


# A schema whose only valid answers are long: the sequence holding the slot cannot end early (a free
# sampled story may emit EOS at any step, and did in CI, which freed the slot for the request that was
# meant to wait).
LONG_ANSWER = text_pb2.ResponseFormat(
    type=text_pb2.ResponseFormat.TYPE_JSON_SCHEMA,
    schema_name="long",
    schema_json=json.dumps(
        {"type": "object", "properties": {"story": {"type": "string", "minLength": 4000}}, "required": ["story"]}
    ),
)


async def test_waiting_for_a_slot_is_bounded(one_busy_slot):
    stub, engine = one_busy_slot
    holder = stub.GenerateStream(chat(STORY, max_tokens=400, temperature=1.0, response_format=LONG_ANSWER))
    await anext(aiter(holder))
    await until(lambda: engine._scheduler._active(), timeout=60)  # the one slot is held
    started = time.monotonic()
    error = await rpc_error(stub.Generate(chat("hi", max_tokens=4)))
    assert error.status == grpc.StatusCode.UNAVAILABLE
    assert error.headers.get("retry-after") == "1"
    assert time.monotonic() - started < 3.0
    assert engine._scheduler._active(), "the holding sequence ended while the other request waited"
    holder.cancel()  # the slot is freed between two steps
    await until(lambda: engine._scheduler._active() == [], timeout=60)
    assert (await stub.Generate(chat("hi", max_tokens=4))).usage.completion_tokens >= 1


@pytest.fixture(scope="module")
async def one_slot():
    async with serving(parallel=1, default_temperature=0.0) as pair:
        yield pair


async def test_interactive_sequences_are_served_before_batch_work(one_slot):
    """x-modelplex-priority: batch waits behind interactive work that arrived after it (FIFO otherwise)."""
    stub, engine = one_slot
    batch = (("x-modelplex-priority", "batch"),)
    started = time.monotonic()
    ends: dict[str, float] = {}

    async def run(name: str, request, metadata=()) -> None:
        async for _ in stub.GenerateStream(request, metadata=metadata):
            pass
        ends[name] = time.monotonic() - started

    busy = asyncio.create_task(run("busy", chat(STORY, max_tokens=24)))
    await until(lambda: engine._scheduler._active(), timeout=60)
    lines = [asyncio.create_task(run(f"batch{i}", chat(f"{STORY} {i}", max_tokens=8), batch)) for i in range(2)]
    await until(lambda: engine._scheduler.waiting() == 2, timeout=60)
    interactive = asyncio.create_task(run("interactive", chat("Say hi.", max_tokens=8)))
    await until(lambda: engine._scheduler.waiting() == 3, timeout=60)
    await asyncio.gather(busy, *lines, interactive)
    assert ends["interactive"] < ends["batch0"] and ends["interactive"] < ends["batch1"], ends
    # Sequences started out of a backlog: the scheduler measured how fast its queue drains (llamacpp_queue).
    assert engine._scheduler.start_rate.per_second > 0


async def test_interactive_work_takes_a_slot_from_running_batch_work(one_slot):
    """Every slot busy with batch work: an interactive request preempts it instead of waiting for it to end; the
    preempted line resumes afterwards and still produces all its tokens."""
    stub, engine = one_slot
    batch = (("x-modelplex-priority", "batch"),)
    started = time.monotonic()
    ends: dict[str, float] = {}
    answers: dict[str, text_pb2.GenerateResponse] = {}

    async def run(name: str, request, metadata=()) -> None:
        answers[name] = await stub.Generate(request, metadata=metadata)
        ends[name] = time.monotonic() - started

    long_line = chat(STORY, max_tokens=160, response_format=LONG_ANSWER)  # cannot end before max_tokens
    line = asyncio.create_task(run("batch", long_line, batch))
    await until(lambda: engine._scheduler._active(), timeout=60)
    interactive = asyncio.create_task(run("interactive", chat("Say hi.", max_tokens=8)))
    await asyncio.gather(line, interactive)
    assert ends["interactive"] < ends["batch"], ends
    assert answers["batch"].usage.completion_tokens == 160
    assert answers["batch"].choices[0].finish_reason == text_pb2.FINISH_REASON_LENGTH
