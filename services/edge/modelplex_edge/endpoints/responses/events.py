"""A response's stream: OpenAI's semantic events, in OpenAI's order, from the backend's deltas.

    response.created, response.in_progress,
      per message:  output_item.added, content_part.added, output_text.delta*, output_text.done,
                    content_part.done, output_item.done
      per call:     output_item.added, function_call_arguments.delta*, function_call_arguments.done,
                    output_item.done
    response.completed | response.incomplete | (error, response.failed)

Every event has the next ``sequence_number``; items are the dicts of ``Output``, so an item's id is the
same in every event and in the final response.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from modelplex.v1 import common_pb2, text_pb2
from modelplex_edge.endpoints.responses.protocol import CreateResponseRequest
from modelplex_edge.endpoints.responses.translate import (
    Outcome,
    Output,
    delta_logprob,
    logprob,
    response_object,
    text_part,
)
from modelplex_edge.sse import event
from modelplex_kit.errors import ServiceError

log = logging.getLogger(__name__)

Event = dict[str, Any]
#: Called with the final Response object of a stream that ended (stored, or handed to waiters).
OnFinal = Callable[[dict[str, Any]], Awaitable[None]]
_GROWING = frozenset({"item", "part", "response"})
_FINAL = {"completed": "response.completed", "incomplete": "response.incomplete", "failed": "response.failed"}


class ResponseEvents:
    """Numbers events and keeps the output they describe."""

    def __init__(self, body: CreateResponseRequest, response_id: str, created_at: int, model_id: str) -> None:
        self.body = body
        self.response_id = response_id
        self.created_at = created_at
        self.model_id = model_id
        self.output = Output()
        self.sequence = 0
        self._call: dict[str, Any] | None = None

    def _event(self, kind: str, **fields: Any) -> Event:
        # Items and parts keep growing after this event: it carries them as they are now.
        for name in _GROWING.intersection(fields):
            fields[name] = copy.deepcopy(fields[name])
        data = {"type": kind, **fields, "sequence_number": self.sequence}
        self.sequence += 1
        return data

    def response(self, outcome: Outcome, used: common_pb2.Usage | None = None) -> dict[str, Any]:
        return response_object(
            self.body,
            response_id=self.response_id,
            created_at=self.created_at,
            model_id=self.model_id,
            outcome=outcome,
            output=self.output.items,
            used=used,
        )

    def queued(self) -> list[Event]:
        """A background response's first events, sent when it is queued."""
        snapshot = self.response(Outcome("queued"))
        return [self._event("response.created", response=snapshot), self._event("response.queued", response=snapshot)]

    def opening(self, status: str = "in_progress") -> list[Event]:
        snapshot = self.response(Outcome(status))
        # A background response announced its creation when it was queued (``queued``).
        opened = [] if self.sequence else [self._event("response.created", response=snapshot)]
        if status == "in_progress":
            opened.append(self._event("response.in_progress", response=snapshot))
        return opened

    def _index(self, item: dict[str, Any]) -> int:
        return self.output.items.index(item)

    def text(self, delta: str, logprobs: list[text_pb2.TokenLogprob]) -> list[Event]:
        events = []
        message = self.output.message
        if message is None:
            events += self._close_call()
            message = self.output.open_message()
            events.append(self._event("response.output_item.added", output_index=self._index(message), item=message))
            message["content"].append(text_part())
            events.append(
                self._event(
                    "response.content_part.added",
                    item_id=message["id"],
                    output_index=self._index(message),
                    content_index=0,
                    part=message["content"][0],
                )
            )
        part = message["content"][0]
        part["text"] += delta
        if self.body.wants_logprobs:
            part["logprobs"] += [logprob(lp) for lp in logprobs]
        events.append(
            self._event(
                "response.output_text.delta",
                item_id=message["id"],
                output_index=self._index(message),
                content_index=0,
                delta=delta,
                logprobs=[delta_logprob(lp) for lp in logprobs] if self.body.wants_logprobs else [],
            )
        )
        return events

    def call(self, fragment: text_pb2.ToolCallDelta) -> list[Event]:
        events = []
        if fragment.id:  # the first fragment of a call introduces it
            events += self._close_message("completed") + self._close_call()
            self._call = self.output.open_call(fragment.id, fragment.name)
            events.append(
                self._event("response.output_item.added", output_index=self._index(self._call), item=self._call)
            )
        if fragment.arguments and self._call is not None:
            self._call["arguments"] += fragment.arguments
            events.append(
                self._event(
                    "response.function_call_arguments.delta",
                    item_id=self._call["id"],
                    output_index=self._index(self._call),
                    delta=fragment.arguments,
                )
            )
        return events

    def _close_message(self, status: str) -> list[Event]:
        message, self.output.message = self.output.message, None
        if message is None:
            return []
        index, part = self._index(message), message["content"][0]
        message["status"] = status
        where = {"item_id": message["id"], "output_index": index, "content_index": 0}
        logprobs = [{k: v for k, v in lp.items() if k != "bytes"} for lp in part["logprobs"]]
        for top in (t for lp in logprobs for t in lp["top_logprobs"]):
            top.pop("bytes", None)
        return [
            self._event("response.output_text.done", **where, text=part["text"], logprobs=logprobs),
            self._event("response.content_part.done", **where, part=part),
            self._event("response.output_item.done", output_index=index, item=message),
        ]

    def _close_call(self, status: str = "completed") -> list[Event]:
        call, self._call = self._call, None
        if call is None:
            return []
        call["status"] = status
        index = self._index(call)
        return [
            self._event(
                "response.function_call_arguments.done",
                item_id=call["id"],
                output_index=index,
                name=call["name"],
                arguments=call["arguments"],
            ),
            self._event("response.output_item.done", output_index=index, item=call),
        ]

    def closing(self, outcome: Outcome, used: common_pb2.Usage | None) -> tuple[list[Event], dict[str, Any]]:
        events = self._close_message(outcome.item_status) + self._close_call(outcome.item_status)
        self.output.finish(outcome.item_status)
        final = self.response(outcome, used)
        events.append(self._event(_FINAL[outcome.status], response=final))
        return events, final

    def failure(self, error: ServiceError, used: common_pb2.Usage | None) -> tuple[list[Event], dict[str, Any]]:
        envelope = error.envelope()["error"]
        events = [
            self._event("error", code=envelope.get("code"), message=envelope["message"], param=envelope.get("param"))
        ]
        code = "rate_limit_exceeded" if error.status == grpc.StatusCode.RESOURCE_EXHAUSTED else "server_error"
        # Items cut short are not closed one by one: the failed response shows them incomplete.
        self.output.finish("incomplete")
        final = self.response(Outcome("failed", error={"code": code, "message": envelope["message"]}), used)
        events.append(self._event("response.failed", response=final))
        return events, final


def _as_service_error(exc: Exception) -> ServiceError:
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, grpc.aio.AioRpcError):
        return ServiceError.from_rpc_error(exc)
    log.error("response stream failed", exc_info=exc)  # never a traceback to the client
    return ServiceError(grpc.StatusCode.INTERNAL, "The server had an error while generating the response.")


async def generate_events(
    events: ResponseEvents, stream: AsyncIterator[text_pb2.GenerateStreamResponse], on_final: OnFinal
) -> AsyncIterator[Event]:
    """The whole event sequence of one response; ``on_final`` gets the final Response object."""
    for opened in events.opening():
        yield opened
    used: common_pb2.Usage | None = None
    finish = text_pb2.FINISH_REASON_UNSPECIFIED
    try:
        async for message in stream:
            if message.HasField("usage"):
                used = message.usage
            for delta in message.deltas:
                if delta.text:
                    for each in events.text(delta.text, list(delta.logprobs)):
                        yield each
                for fragment in delta.tool_calls:
                    for each in events.call(fragment):
                        yield each
                finish = delta.finish_reason or finish
        closing, final = events.closing(Outcome.of(finish), used)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # after the first event the status is sent: the failure is an event
        closing, final = events.failure(_as_service_error(exc), used)
    for each in closing:
        yield each
    await on_final(final)


async def framed(events: AsyncIterator[Event]) -> AsyncIterator[bytes]:
    """SSE frames named by the event type, as OpenAI sends them."""
    async for each in events:
        yield event(each, each["type"])
