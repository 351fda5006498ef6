"""Streamed chunks carry one choice each, as OpenAI's do, whatever the engine batched into one message.

vLLM streams the choices of `n` (and of several prompts) in one chunk; the spec's chunk shapes, and
clients that read ``chunk.choices[0]``, expect one choice per chunk with its own finish_reason."""

from __future__ import annotations

from modelplex.v1 import common_pb2, text_pb2
from modelplex_edge.endpoints.chat.translate import stream_chunks as chat_chunks
from modelplex_edge.endpoints.completions.translate import stream_chunks as completion_chunks


async def _messages():
    yield text_pb2.GenerateStreamResponse(
        id="x",
        created=1,
        deltas=[
            text_pb2.ChoiceDelta(index=0, text="a", finish_reason=text_pb2.FINISH_REASON_LENGTH),
            text_pb2.ChoiceDelta(index=1, text="b"),
        ],
    )
    yield text_pb2.GenerateStreamResponse(id="x", created=1)  # running totals only: no chunk
    yield text_pb2.GenerateStreamResponse(id="x", created=1, usage=common_pb2.Usage(prompt_tokens=2))


async def test_completion_chunks_have_one_choice_each():
    chunks = [c async for c in completion_chunks([_messages()], "m", n=2, include_usage=True)]
    assert [[(c["index"], c["text"], c["finish_reason"]) for c in chunk["choices"]] for chunk in chunks] == [
        [(0, "a", "length")],
        [(1, "b", None)],
        [],  # the usage chunk
    ]


async def test_chat_chunks_have_one_choice_each():
    chunks = [c async for c in chat_chunks(_messages(), "m", include_usage=True)]
    assert [[(c["index"], c["delta"].get("content")) for c in chunk["choices"]] for chunk in chunks] == [
        [(0, "a")],
        [(1, "b")],
        [],
    ]
