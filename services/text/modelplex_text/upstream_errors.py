"""Triton's failures as ServiceErrors (an OpenAI-compatible server's: ``modelplex_kit.errors.upstream_http_error``).

What a client sees of an upstream's failure: its status, and its message only where the
message is about the client's request (bounded in size; the rest goes to the log only).
"""

from __future__ import annotations

import logging

import grpc

from modelplex_kit.errors import UPSTREAM_MESSAGE_MAX, ServiceError, invalid, unavailable

log = logging.getLogger(__name__)

MAX_MESSAGE = UPSTREAM_MESSAGE_MAX
# Per-request Triton failures arrive in-band as text only, so they are told apart by
# Triton's wording. Not served: missing from the repository, loading, unloaded.
_NOT_SERVED = ("unknown model", "not ready", "no available version", "not at ready state", "unavailable")
# The model's inputs are not the flavor's: a deployment mistake, never the client's.
_WRONG_LAYOUT = ("inference input", "inputs but got", "unexpected shape", "inference output")


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
