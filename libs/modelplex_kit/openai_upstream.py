"""One OpenAI-compatible HTTP upstream (a vLLM pod), shared by every backend's ``openai`` adapter.

What vLLM's wire format has in common across modalities lives here once: the keep-alive
connection pool and its one retry of a stale connection, the JSON POST, the SSE event stream
(``[DONE]``, a stream cut short, an error event mid-stream), the usage block, and the mapping of
the upstream's failures (``modelplex_kit.errors.upstream_http_error``). Each adapter keeps only
its own request and response shapes.

The HTTP client is aiohttp: on this hop it costs about half of what httpx did per request.
Closing a response before its end is how an abandoned request is aborted upstream: vLLM stops
generating when its client disconnects.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from typing import Any

import aiohttp
import orjson

from modelplex.v1 import common_pb2
from modelplex_kit.engine_health import openai_readiness, openai_ready
from modelplex_kit.errors import unavailable, upstream_http_error

log = logging.getLogger(__name__)

# Below uvicorn's (so vLLM's) 5 s keep-alive: we drop an idle connection before the server
# does, which makes reusing one it has just closed (see _send's retry) rarer.
_KEEPALIVE_S = 4.0
# How a reused keep-alive connection the server had just closed fails before any response.
_JSON = {"Content-Type": "application/json"}
_STALE_CONNECTION = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientConnectionResetError)


class OpenAIUpstream:
    """The connection pool to one OpenAI-compatible server and the calls every adapter makes on it."""

    def __init__(
        self,
        base_url: str,
        api_key: str = "",
        *,
        max_connections: int = 256,
        timeout_seconds: float = 600.0,
        what: str = "model server",
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._connections = max_connections
        # Bounds on waiting (for a connection, then for each read), not on the whole request:
        # a long generation that keeps streaming must not be cut off at a fixed total.
        self._timeout = aiohttp.ClientTimeout(total=None, connect=timeout_seconds, sock_read=timeout_seconds)
        self._what = what
        self._client: aiohttp.ClientSession | None = None

    def _session(self) -> aiohttp.ClientSession:
        # Made on first use, not in __init__: a session binds to the event loop running it.
        if self._client is None:
            connector = aiohttp.TCPConnector(limit=self._connections, keepalive_timeout=_KEEPALIVE_S)
            self._client = aiohttp.ClientSession(headers=self._headers, connector=connector, timeout=self._timeout)
        return self._client

    async def ready(self) -> bool:
        return await openai_ready(self._session(), self.base_url)

    async def readiness(self) -> bool | None:
        """``ready``, or None when the server did not answer in time (busy, not known to be down)."""
        return await openai_readiness(self._session(), self.base_url)

    async def metrics(self) -> str | None:
        """The server's Prometheus text (``/metrics`` beside ``/v1``), None if it serves none.

        Transport failures are raised as aiohttp's: a pool tells a refused connection (down) from
        a slow one.
        """
        url = f"{self.base_url.removesuffix('/v1')}/metrics"
        async with self._session().get(url, allow_redirects=False) as response:
            return await response.text(errors="replace") if response.status == 200 else None

    async def tokenize(self, body: dict[str, Any], timeout_seconds: float) -> list[int] | None:
        """The tokens the server makes of a prompt or of chat messages (vLLM's ``/tokenize`` beside
        ``/v1``); None where it does not answer with them (another server, a failure, too slow)."""
        url = f"{self.base_url.removesuffix('/v1')}/tokenize"
        try:
            async with asyncio.timeout(timeout_seconds):
                async with self._session().post(url, json=body, allow_redirects=False) as response:
                    answer = json_or_empty(await response.read()) if response.status == 200 else {}
        except (TimeoutError, aiohttp.ClientError):
            return None
        tokens = answer.get("tokens")
        return tokens if isinstance(tokens, list) and all(isinstance(t, int) for t in tokens) else None

    async def manage(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """A management POST (vLLM's ``load_lora_adapter``, which answers plain text on success): its
        status and JSON body ({} when not JSON). Transport failures are UNAVAILABLE, as for a call."""
        async with self.post(path, body) as response:
            return response.status, json_or_empty(await response.read())

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def call(self, path: str, body: dict[str, Any], *, param: str | None = None) -> dict[str, Any]:
        """One unary call: the answer's JSON object, or the upstream's failure as a ServiceError."""
        async with self.post(path, body) as response:
            answer = json_or_empty(await response.read())
        if response.status >= 400:
            raise upstream_http_error(response.status, answer, param)
        if not answer:
            raise unavailable(f"The {self._what} sent a malformed answer; retry shortly.")
        return answer

    async def events(self, path: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """A streamed call's SSE events, each as its JSON object, until ``[DONE]``."""
        async with self.post(path, body) as response:
            if response.status >= 400:
                raise upstream_http_error(response.status, json_or_empty(await response.read()))
            async with aclosing(_sse_events(response, self._what)) as events:
                async for event in events:
                    yield event

    @asynccontextmanager
    async def post(
        self, path: str, body: dict[str, Any] | Callable[[], aiohttp.FormData]
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """A POST whose answer the caller reads; transport failures become UNAVAILABLE.

        ``body``: a JSON object, or a function making a multipart form (made anew for a retry:
        a form is consumed by sending it).
        """
        if callable(body):
            make_data: Callable[[], Any] = body
            headers = None  # aiohttp writes the multipart Content-Type with its boundary
        else:
            # Compact, non-ASCII kept and NaN refused: the bytes httpx used to send.
            payload = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
            make_data = lambda: payload  # noqa: E731 - the same bytes for a retry
            headers = _JSON
        try:
            response = await self._send(f"{self.base_url}/{path}", make_data, headers)
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
            raise unavailable(f"The {self._what} timed out; retry shortly.") from exc
        except aiohttp.ClientError as exc:
            log.warning("upstream unreachable: %r", exc)
            raise unavailable(f"The {self._what} is unreachable; retry shortly.") from exc

    async def _send(
        self, url: str, make_data: Callable[[], Any], headers: dict[str, str] | None
    ) -> aiohttp.ClientResponse:
        # A redirect is answered as it stands: following it would turn the POST into a GET.
        def post() -> Any:
            return self._session().post(url, data=make_data(), headers=headers, allow_redirects=False)

        try:
            return await post()
        except aiohttp.ClientConnectorError:
            raise  # refused or unresolved: nothing was sent, and a fresh connection fares no better
        except _STALE_CONNECTION:
            # Failing before any response is the signature of a pooled keep-alive connection
            # the server had just closed (uvicorn does after a failed stream): the request did
            # not run, and inference has no side effects, so retry once on a fresh connection.
            # (aiohttp retries this itself only for idempotent methods, never for a POST.)
            return await post()


def usage_of(usage: dict[str, Any] | None, streamed_chunks: int = 0) -> common_pb2.Usage:
    """The upstream's usage block; vLLM's ``prompt_tokens_details.cached_tokens`` is its prefix-cache hits."""
    if not usage:
        # Servers without stream_options (llama.cpp's) send none. Token-streaming servers send
        # about one token per chunk, so the chunk count is a lower bound worth metering.
        return common_pb2.Usage(completion_tokens=streamed_chunks, total_tokens=streamed_chunks)
    details = usage.get("prompt_tokens_details") or {}
    prompt, cached = usage.get("prompt_tokens") or 0, details.get("cached_tokens") or 0
    return common_pb2.Usage(
        prompt_tokens=prompt,
        completion_tokens=usage.get("completion_tokens") or 0,
        total_tokens=usage.get("total_tokens") or 0,
        cached_prompt_tokens=cached,
        # With prefix caching, what was not read from the cache was computed and written to it.
        cache_creation_prompt_tokens=max(prompt - cached, 0),
    )


def json_or_empty(raw: bytes) -> dict[str, Any]:
    value = _loads(raw)
    return value if isinstance(value, dict) else {}


def _loads(raw: bytes) -> Any:
    """orjson (a tenth of json's cost per streamed chunk), falling back to json where orjson is
    stricter (NaN and Infinity, which some servers put in logprobs; lone surrogates)."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


# -- SSE ----------------------------------------------------------------------
async def _sse_events(response: aiohttp.ClientResponse, what: str) -> AsyncIterator[dict[str, Any]]:
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
                    yield _parse_event(payload, what)
    if data != [b"[DONE]"]:  # tolerate a last line without its blank terminator
        # llama.cpp's server, for one, ends the stream silently when generation raises.
        raise unavailable(f"The {what} ended the stream before finishing; retry shortly.")


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


def _parse_event(payload: bytes, what: str) -> dict[str, Any]:
    event = json_or_empty(payload)
    if not event:
        raise unavailable(f"The {what} sent a malformed stream event; retry shortly.")
    if "error" in event or event.get("object") == "error":  # how vLLM reports a failure mid-stream
        err = event.get("error", event)
        code = err.get("code") if isinstance(err, dict) else None
        # vLLM's code is the HTTP status it would have answered; anything else is a server failure.
        raise upstream_http_error(code if isinstance(code, int) and 400 <= code < 600 else 500, event)
    return event
