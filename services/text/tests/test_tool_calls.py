import json

import pytest

from modelplex_text.tool_calls import ToolCallStream

CALL = '{"name": "get_weather", "arguments": {"city": "Paris}", "unit": "celsius"}}'


def run(stream: ToolCallStream, text: str, step: int):
    content, fragments = "", []
    for i in range(0, len(text), step):
        c, f = stream.feed(text[i : i + step])
        content += c
        fragments += f
    c, f = stream.finish()
    return content + c, fragments + f


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
def test_forced_call_is_rebuilt_exactly_whatever_the_chunking(step):
    content, fragments = run(ToolCallStream(forced=True), CALL + " ", step)
    assert content == ""
    assert fragments[0].name == "get_weather" and fragments[0].id.startswith("call_")
    arguments = "".join(f.arguments for f in fragments)
    assert json.loads(arguments) == {"city": "Paris}", "unit": "celsius"}


@pytest.mark.parametrize("step", [1, 4, 1000])
def test_auto_mode_call_inside_tags(step):
    stream = ToolCallStream(forced=False)
    content, fragments = run(stream, f"<tool_call>{CALL}</tool_call>", step)
    assert content == "" and stream.called
    assert json.loads("".join(f.arguments for f in fragments))["unit"] == "celsius"


def test_auto_mode_prose_passes_through_untouched():
    stream = ToolCallStream(forced=False)
    content, fragments = run(stream, "  The weather is <b>nice</b>.", 1)
    assert content == "  The weather is <b>nice</b>." and fragments == [] and not stream.called


def test_arguments_arrive_in_several_fragments():
    _, fragments = run(ToolCallStream(forced=True), CALL, 3)
    assert len([f for f in fragments if f.arguments]) > 3


def test_a_partial_opening_tag_that_never_completes_is_prose():
    content, fragments = run(ToolCallStream(forced=False), "<tool", 1)
    assert content == "<tool" and fragments == []
