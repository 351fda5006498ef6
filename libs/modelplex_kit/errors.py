"""Errors, from one place.

Every failure in Modelplex is a :class:`ServiceError` carrying a gRPC status
code. Backends raise it and the server interceptor turns it into a gRPC status
(with the offending ``param`` in trailing metadata); the edge turns a gRPC
status back into a ServiceError and renders OpenAI's error envelope. The table
below is the only place where a status code gets its HTTP meaning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import grpc

from modelplex.v1 import common_pb2

log = logging.getLogger(__name__)

ERROR_DETAIL_KEY = "modelplex-error-detail-bin"


@dataclass(frozen=True, slots=True)
class HttpError:
    status: int
    type: str
    code: str | None


_SERVER = "server_error"
_INVALID = "invalid_request_error"

# gRPC status -> HTTP status and OpenAI error type/code (the default code; a
# ServiceError may name a more specific one).
GRPC_TO_HTTP: dict[grpc.StatusCode, HttpError] = {
    grpc.StatusCode.INVALID_ARGUMENT: HttpError(400, _INVALID, None),
    grpc.StatusCode.FAILED_PRECONDITION: HttpError(400, _INVALID, None),
    grpc.StatusCode.OUT_OF_RANGE: HttpError(400, _INVALID, "context_length_exceeded"),
    # OpenAI sends code null for a missing key and "invalid_api_key" for a wrong one (named where raised).
    grpc.StatusCode.UNAUTHENTICATED: HttpError(401, _INVALID, None),
    grpc.StatusCode.PERMISSION_DENIED: HttpError(403, "permission_error", None),
    grpc.StatusCode.NOT_FOUND: HttpError(404, _INVALID, "not_found"),
    grpc.StatusCode.ALREADY_EXISTS: HttpError(409, _INVALID, "conflict"),
    grpc.StatusCode.ABORTED: HttpError(409, _INVALID, "conflict"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: HttpError(429, "requests", "rate_limit_exceeded"),
    grpc.StatusCode.CANCELLED: HttpError(499, _INVALID, "client_closed_request"),
    grpc.StatusCode.UNIMPLEMENTED: HttpError(501, _INVALID, "not_implemented"),
    grpc.StatusCode.UNAVAILABLE: HttpError(503, _SERVER, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: HttpError(504, _SERVER, "timeout"),
    grpc.StatusCode.INTERNAL: HttpError(500, _SERVER, None),
    grpc.StatusCode.UNKNOWN: HttpError(500, _SERVER, None),
    grpc.StatusCode.DATA_LOSS: HttpError(500, _SERVER, None),
}

HTTP_ONLY_TOO_LARGE = HttpError(413, _INVALID, "request_too_large")

# Error codes whose HTTP status no gRPC status expresses; they override the table above.
CODE_TO_HTTP: dict[str, HttpError] = {
    # Idempotency-Key reused with a different body (as OpenAI and Stripe answer it).
    "idempotency_key_reused": HttpError(422, _INVALID, "idempotency_key_reused"),
    # A body within the byte limit whose structure would hold the parser too long (modelplex_edge.json_budget).
    "request_too_large": HTTP_ONLY_TOO_LARGE,
}

# HTTP-only failures the edge detects before any gRPC call is made.
HTTP_ONLY: dict[int, HttpError] = {
    405: HttpError(405, _INVALID, "method_not_allowed"),
    408: HttpError(408, _INVALID, "request_timeout"),
    413: HTTP_ONLY_TOO_LARGE,
}


def envelope(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error body: the only place its shape is written."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class ServiceError(Exception):
    """A failure with a meaning for the API client."""

    def __init__(
        self,
        status: grpc.StatusCode,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        type: str | None = None,
    ) -> None:
        super().__init__(message)
        #: OpenAI's error type where it differs from the status's ("tokens", "insufficient_quota").
        self.type = type
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    @property
    def http(self) -> HttpError:
        if self.code in CODE_TO_HTTP:
            return CODE_TO_HTTP[self.code]
        return GRPC_TO_HTTP.get(self.status, GRPC_TO_HTTP[grpc.StatusCode.UNKNOWN])

    def envelope(self) -> dict[str, Any]:
        http = self.http
        return envelope(self.message, self.type or http.type, self.param, self.code or http.code)

    # -- gRPC wire form -------------------------------------------------
    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        # Always sent: its presence tells the edge the message was written for clients. A status
        # without it comes from gRPC itself (a connection refused, a crashed backend), whose text
        # names internal addresses and must not reach clients.
        retry_after = self.headers.get("retry-after", "")
        detail = common_pb2.ErrorDetail(
            param=self.param or "",
            code=self.code or "",
            retry_after_seconds=int(retry_after) if retry_after.isdigit() else 0,
        )
        return ((ERROR_DETAIL_KEY, detail.SerializeToString()),)

    @classmethod
    def from_rpc_error(cls, error: grpc.aio.AioRpcError | grpc.RpcError) -> ServiceError:
        status = error.code()
        detail = _error_detail(error)
        if detail is None:
            return _transport_failure(status, error)
        message = error.details() or status.name.lower()
        param, code = detail.param or None, detail.code or None
        # Worth retrying soon: a restarting backend, a full queue (the SDKs honour Retry-After).
        retry = status in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
        headers = {"retry-after": str(detail.retry_after_seconds or 1)} if retry else {}
        return cls(status, message, param=param, code=code, headers=headers)


def _error_detail(error: grpc.RpcError) -> common_pb2.ErrorDetail | None:
    for key, value in error.trailing_metadata() or ():
        if key == ERROR_DETAIL_KEY:
            return common_pb2.ErrorDetail.FromString(value)
    return None


# What clients are told when gRPC itself failed; the raw text goes to the log.
#: How gRPC core words a message beyond a channel's or server's max message length ("Received message
#: larger than max (N vs. M)", "Sent message larger than max ...").
_MESSAGE_SIZE = "message larger than max"
_TRANSPORT_MESSAGES = {
    grpc.StatusCode.UNAVAILABLE: "The model backend is unavailable; please retry shortly.",
    grpc.StatusCode.DEADLINE_EXCEEDED: "The model backend did not answer in time.",
    grpc.StatusCode.CANCELLED: "The request was cancelled.",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "The model backend is overloaded; please retry shortly.",
}


def _transport_failure(status: grpc.StatusCode, error: grpc.RpcError) -> ServiceError:
    log.warning("backend call failed", extra={"grpc_code": status.name, "grpc_details": error.details()})
    if status == grpc.StatusCode.RESOURCE_EXHAUSTED and _MESSAGE_SIZE in (error.details() or ""):
        # gRPC's own bound on a message (either side's max message length): no retry ever fits it.
        return ServiceError(
            grpc.StatusCode.INVALID_ARGUMENT,
            "The request is larger than the model's backend accepts; send less (fewer or smaller items).",
            code="request_too_large",
        )
    message = _TRANSPORT_MESSAGES.get(status, "The server had an error while processing your request.")
    if status not in _TRANSPORT_MESSAGES:
        status = grpc.StatusCode.INTERNAL
    # A restarting pod or a full queue: worth retrying soon (the SDKs honour Retry-After).
    headers = (
        {"retry-after": "1"} if status in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED) else {}
    )
    return ServiceError(status, message, headers=headers)


def invalid(message: str, param: str | None = None, code: str | None = None) -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, message, param=param, code=code)


def unsupported(param: str, what: str) -> ServiceError:
    return invalid(f"{what} is not supported by this model.", param=param, code="unsupported_parameter")


def model_not_found(model: str) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.NOT_FOUND,
        f"The model `{model}` does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


def unavailable(message: str, retry_after: int = 1) -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAVAILABLE, message, headers={"retry-after": str(retry_after)})


# Upstream messages are echoed to clients: bound them.
UPSTREAM_MESSAGE_MAX = 2000
# Upstream HTTP client errors that are the API client's fault (the rest are ours).
_UPSTREAM_INVALID = {400, 413, 422}
# How vLLM starts its 400 for a max_tokens beyond what the context leaves (it names no param).
_VLLM_MAX_TOKENS = "'max_tokens' or 'max_completion_tokens' is too large"


def upstream_http_error(status: int, body: dict[str, Any], param: str | None = None) -> ServiceError:
    """An OpenAI-compatible upstream's (vLLM's) failure as clients should see it: the one mapping
    for every backend's ``openai`` adapter.

    Its refusal of the request stays a 400 with its (bounded) message, naming the upstream's
    ``param``, else ``param``; a 404 is the upstream's model; an overloaded upstream is a 429;
    the rest (this backend's credentials, 5xx bodies that can hold tracebacks) is a retryable
    503 whose upstream text goes to the log only.
    """
    message, named, code = _upstream_envelope(body)
    if status in (401, 403):
        # The backend's key, not the client's: an operator must fix it, so the client sees a 503.
        return unavailable("The model server rejected this backend's upstream credentials; an operator must fix them.")
    if status == 404:
        if code == "model_not_found" or "model" in message.lower():
            named, code = "model", "model_not_found"
        return ServiceError(
            grpc.StatusCode.NOT_FOUND, message or "Not found on the model server.", param=named, code=code
        )
    if status in _UPSTREAM_INVALID:
        if named is None and message.startswith(_VLLM_MAX_TOKENS):
            named = "max_tokens"
        return invalid(message or f"The model server refused the request (HTTP {status}).", named or param, code)
    if status == 429:
        return ServiceError(
            grpc.StatusCode.RESOURCE_EXHAUSTED, message or "The model server is overloaded; retry shortly."
        )
    log.warning("upstream failed: HTTP %s %s", status, message)
    return unavailable(f"The model server failed (HTTP {status}); retry shortly.")


def adapter_load_error(adapter: str, status: int, body: dict[str, Any]) -> ServiceError | None:
    """An engine's answer to loading a LoRA adapter (vLLM's ``/v1/load_lora_adapter``) as clients should see it:
    None when the adapter is loaded ("already loaded": another backend loaded it). Its refusal (weights missing or
    damaged, a rank above the engine's maximum, LoRA off; vLLM answers an engine-side failure with a 500 that
    carries the reason) is the adapter's fault, the same on every replica: a 400 naming ``model``, never a
    reason to eject the replica. Anything else is the upstream's failure, mapped as ``upstream_http_error``."""
    message = _upstream_envelope(body)[0]
    if status < 300 or (status == 400 and "already been loaded" in message):
        return None
    if status in (400, 404, 405, 422) or (status == 500 and message):
        why = message or f"HTTP {status}"
        return invalid(f"The adapter {adapter!r} cannot be loaded by the model server: {why}", "model")
    return upstream_http_error(status, body)


def _upstream_envelope(body: dict[str, Any]) -> tuple[str, str | None, str | None]:
    """Message, param and code from OpenAI's envelope, vLLM's flat one or FastAPI's ``detail``."""
    err = body.get("error") if isinstance(body.get("error"), dict) else body
    message = err.get("message") or err.get("error") or ""
    param = err.get("param")
    detail = body.get("detail")
    if isinstance(detail, str):
        message = message or detail
    elif isinstance(detail, list) and detail and isinstance(detail[0], dict):  # FastAPI validation (422)
        message = message or str(detail[0].get("msg", ""))
        param = param or ".".join(str(p) for p in detail[0].get("loc", ()) if p != "body") or None
    code = err.get("code")  # vLLM puts the HTTP status here; only OpenAI's string codes mean anything
    return str(message)[:UPSTREAM_MESSAGE_MAX], _str_or_none(param), _str_or_none(code)


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None
