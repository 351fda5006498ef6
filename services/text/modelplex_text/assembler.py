"""Raw engine text -> ChoiceDelta events, for adapters whose engines emit text."""

from __future__ import annotations

from modelplex.v1 import text_pb2
from modelplex_text.tool_calls import ToolCallStream

_FINISH = {
    "stop": text_pb2.FINISH_REASON_STOP,
    "length": text_pb2.FINISH_REASON_LENGTH,
    "tool_calls": text_pb2.FINISH_REASON_TOOL_CALLS,
    "function_call": text_pb2.FINISH_REASON_TOOL_CALLS,  # older OpenAI-compatible servers
    "content_filter": text_pb2.FINISH_REASON_CONTENT_FILTER,
}


def finish_reason(name: str | None) -> text_pb2.FinishReason:
    return _FINISH.get(name or "stop", text_pb2.FINISH_REASON_STOP)


class ChoiceAssembler:
    """Builds the deltas of one choice from text chunks."""

    def __init__(self, index: int, tool_call_forced: bool | None) -> None:
        self.index = index
        self._tools = ToolCallStream(tool_call_forced) if tool_call_forced is not None else None

    def feed(self, text: str) -> text_pb2.ChoiceDelta | None:
        if not text:
            return None
        if self._tools is None:
            return text_pb2.ChoiceDelta(index=self.index, text=text)
        content, calls = self._tools.feed(text)
        return self._delta(content, calls)

    def finish(self, engine_reason: str | None) -> list[text_pb2.ChoiceDelta]:
        """The held-back remainder (if any) and the closing delta."""
        deltas = []
        reason = finish_reason(engine_reason)
        if self._tools is not None:
            rest = self._delta(*self._tools.finish())
            if rest is not None:
                deltas.append(rest)
            if self._tools.called and reason == text_pb2.FINISH_REASON_STOP:
                reason = text_pb2.FINISH_REASON_TOOL_CALLS
        deltas.append(text_pb2.ChoiceDelta(index=self.index, finish_reason=reason))
        return deltas

    def _delta(self, content: str, calls: list[text_pb2.ToolCallDelta]) -> text_pb2.ChoiceDelta | None:
        if not content and not calls:
            return None
        return text_pb2.ChoiceDelta(index=self.index, text=content, tool_calls=calls)
