from modelplex.v1 import text_pb2
from modelplex_text.servicer import merge_delta


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
