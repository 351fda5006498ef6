"""An OpenAI-compatible server's HTTP failures as ServiceErrors (Triton's: modelplex_kit.kserve_v2.upstream_error).

What a client sees of an upstream's failure: its status, and its message only where the message
is about the client's request (bounded in size; 5xx bodies, which can hold tracebacks, go to the
log only).
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
