"""uvicorn's httptools protocol with a deadline on request headers.

uvicorn bounds idle keep-alive connections, but a client that opens a
connection and then sends nothing, or sends its headers a byte at a time,
holds it for as long as it likes. Here every request's headers must be
complete within ``header_timeout`` seconds of the connection opening (or of
the request's first byte, on a kept-alive connection); otherwise the client
gets a 408 and the connection is closed.
"""

from __future__ import annotations

import asyncio

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from modelplex_kit.errors import HTTP_ONLY, envelope

_TIMEOUT = HTTP_ONLY[408]


def _408(seconds: float) -> bytes:
    body = orjson.dumps(
        envelope(
            f"The request headers were not received within {seconds:g} seconds.", _TIMEOUT.type, None, _TIMEOUT.code
        )
    )
    head = (
        b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n\r\n"
    )
    return head + body


class HeaderTimeoutProtocol(HttpToolsProtocol):
    header_timeout: float = 30.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_deadline: asyncio.TimerHandle | None = None
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._header_deadline is None:
            self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # The kept-alive connection's next request arms a new deadline at its first byte; until
        # then uvicorn's keep-alive timeout bounds the idle wait.

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._header_deadline = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if not self.transport.is_closing():
            self.logger.info("request headers too slow; closing the connection")
            self.transport.write(_408(self.header_timeout))
            self.transport.close()
