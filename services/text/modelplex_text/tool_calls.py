"""Turns model text into OpenAI tool-call deltas while it streams.

Used by the adapters whose engines produce raw text (llama.cpp, Triton). With
a forced tool choice the output is a bare JSON object {"name", "arguments"};
with ``auto`` it is either prose or that object inside <tool_call> tags. The
name is emitted as soon as it is complete and the arguments grow chunk by
chunk, as OpenAI streams them. Text that may still turn out to be the end of
the call (closing braces, a partial closing tag) is held back until it is
certain.
"""

from __future__ import annotations

import json
import re
import uuid

from modelplex.v1 import text_pb2
from modelplex_text.prompting import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

_HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*')


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCallStream:
    """Feed text chunks, get back content text and tool-call fragments."""

    def __init__(self, forced: bool) -> None:
        self._forced = forced
        self._buffer = ""
        # None until known: True when the output is a tool call, False for prose.
        self._is_call: bool | None = True if forced else None
        self._args_start = -1
        self._emitted_args = ""
        self.called = False

    def feed(self, text: str) -> tuple[str, list[text_pb2.ToolCallDelta]]:
        self._buffer += text
        if self._is_call is None:
            head = self._buffer.lstrip()
            if not head or TOOL_CALL_OPEN.startswith(head):
                return "", []
            self._is_call = head.startswith(TOOL_CALL_OPEN)
            if not self._is_call:
                return self._buffer, []
        if not self._is_call:
            return text, []
        return "", self._call_fragments(final=False)

    def finish(self) -> tuple[str, list[text_pb2.ToolCallDelta]]:
        """Flushes what was held back; call once after the last chunk."""
        if self._is_call is None:  # only whitespace or a partial opening tag: it was prose
            self._is_call = False
            return self._buffer, []
        if not self._is_call:
            return "", []
        return "", self._call_fragments(final=True)

    def _body(self) -> str:
        body = self._buffer.lstrip()
        return body[len(TOOL_CALL_OPEN) :] if not self._forced and body.startswith(TOOL_CALL_OPEN) else body

    def _call_fragments(self, final: bool) -> list[text_pb2.ToolCallDelta]:
        body = self._body()
        fragments: list[text_pb2.ToolCallDelta] = []
        if self._args_start < 0:
            match = _HEADER.match(body)
            if not match:
                return fragments
            self._args_start = match.end()
            self.called = True
            fragments.append(text_pb2.ToolCallDelta(index=0, id=new_call_id(), name=json.loads(match.group(1))))
        args = self._final_args(body) if final else self._safe_args(body)
        if args.startswith(self._emitted_args) and len(args) > len(self._emitted_args):
            fragments.append(text_pb2.ToolCallDelta(index=0, arguments=args[len(self._emitted_args) :]))
            self._emitted_args = args
        return fragments

    def _safe_args(self, body: str) -> str:
        region = body[self._args_start :]
        for k in range(len(TOOL_CALL_CLOSE), 0, -1):
            if region.endswith(TOOL_CALL_CLOSE[:k]):
                region = region[:-k]
                break
        return region.rstrip("} \t\r\n")

    def _final_args(self, body: str) -> str:
        region = body[self._args_start :].rstrip()
        if region.endswith(TOOL_CALL_CLOSE):
            region = region[: -len(TOOL_CALL_CLOSE)].rstrip()
        if region.endswith("}"):  # the call object's closing brace
            region = region[:-1].rstrip()
        return region
