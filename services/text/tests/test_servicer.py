import asyncio

from modelplex.v1 import catalog_pb2, text_pb2
from modelplex_text.choices import ChoiceEnd, ChoiceText, stream_choices
from modelplex_text.servicer import TextGenerationServicer, merge_delta


def test_merge_delta_rebuilds_choices_from_fragments():
    choice = text_pb2.Choice(index=0)
    for delta in (
        text_pb2.ChoiceDelta(text="Hel"),
        text_pb2.ChoiceDelta(text="lo", tool_calls=[text_pb2.ToolCallDelta(index=0, id="call_1", name="f")]),
        text_pb2.ChoiceDelta(tool_calls=[text_pb2.ToolCallDelta(index=0, arguments='{"a"')]),
        text_pb2.ChoiceDelta(
            tool_calls=[text_pb2.ToolCallDelta(index=0, arguments=": 1}")],
            finish_reason=text_pb2.FINISH_REASON_TOOL_CALLS,
        ),
    ):
        merge_delta(choice, delta)
    assert choice.text == "Hello"
    assert (choice.tool_calls[0].id, choice.tool_calls[0].name, choice.tool_calls[0].arguments) == (
        "call_1",
        "f",
        '{"a": 1}',
    )
    assert choice.finish_reason == text_pb2.FINISH_REASON_TOOL_CALLS


# -- running usage on every streamed message (what an interrupted stream is accounted) ---------------
class Counting:
    """An engine whose one choice is PIECES pieces, through the shared per-choice loop."""

    PROMPT_TOKENS, PIECES = 7, 40
    capabilities = catalog_pb2.TextCapabilities(chat=True)

    def stream(self, request, *, incremental: bool = True):
        async def generate(index, seed, deadline):
            for i in range(self.PIECES):
                yield ChoiceText(f"w{i} ")
                await asyncio.sleep(0)  # one message per piece: the stream is read as it is produced
            yield ChoiceEnd("length", self.PIECES)

        return stream_choices(
            request, generate, prompt_tokens=self.PROMPT_TOKENS, tool_call_forced=None, max_seconds=0
        )

    async def close(self) -> None:
        return None


def _chat() -> text_pb2.GenerateRequest:
    hi = text_pb2.ChatMessage(role="user", content=[text_pb2.ContentPart(text="Hi")])
    return text_pb2.GenerateRequest(model="m", chat=text_pb2.ChatInput(messages=[hi]))


async def test_every_streamed_message_carries_what_was_consumed_so_far():
    servicer = TextGenerationServicer(Counting())
    texts, messages = 0, []
    async for message in servicer.GenerateStream(_chat(), None):
        messages.append(message)
        texts += sum(len([t for t in d.text.split(" ") if t]) for d in message.deltas)
        # What the edge would account had the stream been cut right here.
        assert message.progress.prompt_tokens == Counting.PROMPT_TOKENS
        assert message.progress.completion_tokens >= texts
        assert message.progress.total_tokens == message.progress.prompt_tokens + message.progress.completion_tokens
    assert texts == Counting.PIECES and len(messages) > 2
    final = messages[-1]
    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (Counting.PROMPT_TOKENS, Counting.PIECES)
    assert final.progress == final.usage


async def test_a_unary_answer_ignores_the_running_totals():
    response = await TextGenerationServicer(Counting()).Generate(_chat(), None)
    assert response.choices[0].text == "".join(f"w{i} " for i in range(Counting.PIECES))
    assert response.usage.completion_tokens == Counting.PIECES
