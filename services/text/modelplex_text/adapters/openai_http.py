"""The remote engine: an OpenAI-compatible HTTP server (a vLLM pod).

The upstream already speaks our API's dialect, so the adapter only re-encodes
the request as OpenAI JSON (streamed for GenerateStream, one non-streaming call
for Generate) and maps upstream failures to gRPC statuses. The HTTP client is
aiohttp: on this hop it costs about half of what httpx did per request.
Closing the HTTP response is how an abandoned request gets aborted upstream:
vLLM stops generating when its client disconnects.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from typing import Any

import aiohttp

from modelplex.v1 import catalog_pb2, text_pb2
from modelplex_kit.engine_health import openai_ready
from modelplex_kit.errors import unavailable
from modelplex_text.adapters.openai_wire import (
    as_chunk_choice,
    choice_delta,
    json_or_empty,
    to_usage,
    upstream_request,
)
from modelplex_text.engine import EngineEvent
from modelplex_text.settings import OpenAISettings
from modelplex_text.upstream_errors import from_http

log = logging.getLogger(__name__)

# Below uvicorn's (so vLLM's) 5 s keep-alive: we drop an idle connection before the server
# does, which makes reusing one it has just closed (see _send's retry) rarer.
_KEEPALIVE_S = 4.0
# How a reused keep-alive connection the server had just closed fails before any response.
_STALE_CONNECTION = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientConnectionResetError)


class OpenAIHttpEngine:
    # Everything the protocol can express; the catalog entry narrows it per model.
    capabilities = catalog_pb2.TextCapabilities(
        chat=True,
        completions=True,
        tool_use=True,
        vision=True,
        json_schema=True,
        prompt_caching=True,
        logprobs=True,
        multiple_choices=True,
    )

    def __init__(self, settings: OpenAISettings) -> None:
        if not settings.upstream_url:
            raise ValueError("engine=openai needs MODELPLEX_TEXT_UPSTREAM_URL (e.g. http://vllm:8000/v1)")
        key = settings.upstream_api_key.get_secret_value()
        self._model = settings.upstream_model
        self._base_url = settings.upstream_url.rstrip("/")
        self._headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
        self._connections = settings.upstream_max_connections
        timeout = settings.upstream_timeout_seconds
        # Bounds on waiting (for a connection, then for each read), not on the whole request:
        # a long generation that keeps streaming must not be cut off at a fixed total.
        self._timeout = aiohttp.ClientTimeout(total=None, connect=timeout, sock_read=timeout)
        self._client: aiohttp.ClientSession | None = None

    def _session(self) -> aiohttp.ClientSession:
        # Made on first use, not in __init__: a session binds to the event loop running it.
        if self._client is None:
            connector = aiohttp.TCPConnector(limit=self._connections, keepalive_timeout=_KEEPALIVE_S)
            self._client = aiohttp.ClientSession(headers=self._headers, connector=connector, timeout=self._timeout)
        return self._client

    async def ready(self) -> bool:
        return await openai_ready(self._session(), self._base_url)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def stream(
        self, request: text_pb2.GenerateRequest, *, incremental: bool = True
    ) -> AsyncIterator[EngineEvent]:
        if not incremental:
            async for event in self._complete(request):
                yield event
            return
        path, body = upstream_request(request, self._model or request.model)
        usage, streamed = None, 0
        async with self._post(path, body) as response:
            if response.status >= 400:
                raise from_http(response.status, json_or_empty(await response.read()))
            async with aclosing(_sse_events(response)) as events:
                async for event in events:
                    usage = event.get("usage") or usage
                    for choice in event.get("choices") or ():
                        delta = choice_delta(choice)
                        streamed += bool(delta.text or delta.tool_calls)
                        if delta.text or delta.tool_calls or delta.logprobs or delta.finish_reason:
                            yield delta
        yield to_usage(usage, streamed)

    async def _complete(self, request: text_pb2.GenerateRequest) -> AsyncIterator[EngineEvent]:
        """One non-streaming upstream call: a whole answer costs one JSON parse, not one per token."""
        path, body = upstream_request(request, self._model or request.model, stream=False)
        async with self._post(path, body) as response:
            answer = json_or_empty(await response.read())
        if response.status >= 400:
            raise from_http(response.status, answer)
        if not isinstance(answer.get("choices"), list):
            raise unavailable("The model server sent a malformed answer; retry shortly.")
        for choice in answer["choices"]:
            yield choice_delta(as_chunk_choice(choice))
        yield to_usage(answer.get("usage"), 0)

    @asynccontextmanager
    async def _post(self, path: str, body: dict[str, Any]) -> AsyncIterator[aiohttp.ClientResponse]:
        """A POST whose body the caller reads; transport failures become UNAVAILABLE."""
        # Compact, non-ASCII kept and NaN refused: the bytes httpx used to send.
        payload = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
        try:
            response = await self._send(f"{self._base_url}/{path}", payload)
            try:
                yield response
            finally:
                # A body read to its end frees the connection for reuse. Anything else (the
                # consumer left early, was cancelled, failed) closes it: the disconnect is
                # what makes the upstream stop generating.
                if response.content.at_eof():
                    response.release()
                else:
                    response.close()
        except TimeoutError as exc:  # aiohttp's own timeouts subclass it too
            raise unavailable("The model server timed out; retry shortly.") from exc
        except aiohttp.ClientError as exc:
            log.warning("upstream unreachable: %r", exc)
            raise unavailable("The model server is unreachable; retry shortly.") from exc

    async def _send(self, url: str, payload: bytes) -> aiohttp.ClientResponse:
        # A redirect is answered as it stands, as httpx did: following it would turn the POST into a GET.
        post = functools.partial(self._session().post, url, data=payload, allow_redirects=False)
        try:
            return await post()
        except aiohttp.ClientConnectorError:
            raise  # refused or unresolved: nothing was sent, and a fresh connection fares no better
        except _STALE_CONNECTION:
            # Failing before any response is the signature of a pooled keep-alive connection
            # the server had just closed (uvicorn does after a failed stream): the request did
            # not run, and a generation has no side effects, so retry once on a fresh connection.
            # (aiohttp retries this itself only for idempotent methods, never for a POST.)
            return await post()


# -- response: SSE chunks -> engine events ----------------------------------
async def _sse_events(response: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """Yields each event's JSON until ``[DONE]``; a stream cut short is an upstream failure."""
    data: list[bytes] = []
    async with aclosing(_line_batches(response.content)) as batches:
        async for lines in batches:
            for line in lines:
                if line.startswith(b"data:"):
                    data.append(line[5:].removeprefix(b" "))
                elif not line and data:  # a blank line ends an event; other fields (pings, ids) carry nothing
                    payload, data = b"\n".join(data), []
                    if payload == b"[DONE]":
                        # Read to the end of the body: a fully read response returns its
                        # keep-alive connection to the pool instead of being dropped.
                        async for _ in batches:
                            pass
                        return
                    yield _parse_event(payload)
    if data != [b"[DONE]"]:  # tolerate a last line without its blank terminator
        # llama.cpp's server, for one, ends the stream silently when generation raises.
        raise unavailable("The model server ended the stream before finishing; retry shortly.")


async def _line_batches(content: aiohttp.StreamReader) -> AsyncIterator[list[bytes]]:
    """The body's lines (ended by ``\\n`` or ``\\r\\n``), in one batch per network read.

    Split here rather than by ``readline()``: one await per read instead of one per
    line, and no 128 KiB cap on a line (an echoed prompt's logprobs can exceed it).
    """
    rest = b""
    async for chunk in content.iter_any():
        *lines, rest = (rest + chunk).split(b"\n")
        if lines:
            yield [line.removesuffix(b"\r") for line in lines]
    if rest:  # a last line without its newline
        yield [rest.removesuffix(b"\r")]


def _parse_event(payload: bytes) -> dict[str, Any]:
    event = json_or_empty(payload)
    if not event:
        raise unavailable("The model server sent a malformed stream event; retry shortly.")
    if "error" in event or event.get("object") == "error":  # how vLLM reports a failure mid-stream
        err = event.get("error", event)
        code = err.get("code") if isinstance(err, dict) else None
        # vLLM's code is the HTTP status it would have answered; anything else is a server failure.
        raise from_http(code if isinstance(code, int) and 400 <= code < 600 else 500, event)
    return event
