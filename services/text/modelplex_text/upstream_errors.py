"""Upstream failures (an OpenAI-compatible server's HTTP answers, Triton's gRPC errors) as ServiceErrors.

One place decides what a client sees of an upstream's failure: its status, and
its message only where the message is about the client's request (bounded in
size; 5xx bodies, which can hold tracebacks, go to the log only).
"""

from __future__ import annotations

import logging
from typing import Any

import grpc

from modelplex_kit.errors import ServiceError, invalid, unavailable

log = logging.getLogger(__name__)

MAX_MESSAGE = 2000  # upstream messages are echoed to clients; bound them
# Upstream HTTP client errors that are the API client's fault (the rest are ours).
_INVALID_STATUSES = {400, 413, 422}
# How vLLM starts its 400 for a max_tokens beyond what the context leaves.
_VLLM_MAX_TOKENS = "'max_tokens' or 'max_completion_tokens' is too large"
# Per-request Triton failures arrive in-band as text only, so they are told apart by
# Triton's wording. Not served: missing from the repository, loading, unloaded.
_NOT_SERVED = ("unknown model", "not ready", "no available version", "not at ready state", "unavailable")
# The model's inputs are not the flavor's: a deployment mistake, never the client's.
_WRONG_LAYOUT = ("inference input", "inputs but got", "unexpected shape", "inference output")


def from_http(status: int, body: dict[str, Any]) -> ServiceError:
    """Maps an upstream HTTP failure to the status our client should see."""
    message, param, code = _envelope(body)
    if status in (401, 403):
        # The backend's key, not the client's: an operator must fix it, so the client sees a 503.
        return unavailable("The model server rejected this backend's upstream credentials; an operator must fix them.")
    if status == 404:
        if code == "model_not_found" or "model" in message.lower():
            param, code = "model", "model_not_found"
        message = message or "Not found on the model server."
        return ServiceError(grpc.StatusCode.NOT_FOUND, message, param=param, code=code)
    if status in _INVALID_STATUSES:
        if param is None and message.startswith(_VLLM_MAX_TOKENS):  # vLLM names no param for this one
            param = "max_tokens"
        return invalid(message or f"The model server refused the request (HTTP {status}).", param, code)
    if status == 429:
        message = message or "The model server is overloaded; retry shortly."
        return ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
    # 5xx bodies can hold tracebacks: log them for the operator, never pass them on.
    log.warning("upstream failed: HTTP %s %s", status, message)
    return unavailable(f"The model server failed (HTTP {status}); retry shortly.")


def _envelope(body: dict[str, Any]) -> tuple[str, str | None, str | None]:
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
    return str(message)[:MAX_MESSAGE], _str_or_none(param), _str_or_none(code)


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def from_triton(error: Exception, model: str) -> ServiceError:
    """A Triton failure as the ServiceError our clients should see.

    Only a refusal of the request itself shows Triton's text; anything else is a deployment or
    server problem, whose text (addresses, stack details) goes to the log with the request id.
    """
    if isinstance(error, grpc.aio.AioRpcError):  # the stream itself failed: connection, deadline, server
        details = (error.details() or error.code().name)[:MAX_MESSAGE]
        if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
            return invalid(f"Triton rejected the request: {details}")
        log.warning("triton call failed", extra={"grpc_code": error.code().name, "error": details})
        if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, "Triton did not finish in time.")
        return unavailable("Triton is unavailable; retry shortly.")
    # tritonclient's InferenceServerException keeps its text behind a message() method.
    text = error.message() if callable(getattr(error, "message", None)) else error
    message = str(text)[:MAX_MESSAGE]
    if any(hint in message.lower() for hint in _NOT_SERVED):
        # The catalog routed here, so a model Triton does not serve is a deployment problem (or
        # a model still loading): 503, retryable, not a 404 that blames the client.
        log.warning("triton is not serving the model", extra={"model": model, "error": message})
        return unavailable(f"Triton is not serving model `{model}` yet; retry shortly.")
    if any(hint in message for hint in _WRONG_LAYOUT):
        # Names the input Triton refused (no address or trace): what the operator needs to fix the flavor.
        return ServiceError(grpc.StatusCode.INTERNAL, f"Triton model `{model}` does not fit triton_flavor: {message}")
    return invalid(f"Triton rejected the request: {message}")
