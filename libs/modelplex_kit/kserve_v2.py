"""Small helpers for adapters that call a KServe v2 / Triton gRPC server (tritonclient.grpc.aio).

Imported only by adapters that have tritonclient installed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from modelplex_kit.errors import UPSTREAM_MESSAGE_MAX, ServiceError, invalid, unavailable

log = logging.getLogger(__name__)

# Server text echoed to clients (only in a refusal of their request) is cut to this; the rest goes to the log.
MAX_MESSAGE = UPSTREAM_MESSAGE_MAX  # one cap on echoed upstream text, as the HTTP upstreams'
# Status names (tritonclient reports "StatusCode.X") that mean "the server, not the request".
_RETRYABLE = ("UNAVAILABLE", "NOT_FOUND", "RESOURCE_EXHAUSTED", "CANCELLED")
# A stream's in-band failure is text only (no status), told apart by Triton's wording.
# Not served: missing from the repository, loading, unloaded.
_NOT_SERVED = ("unknown model", "not ready", "no available version", "not at ready state", "unavailable")
# What tritonserver's Python backend sends, in-band, for an exception its model's execute() raised
# (a unary call gets the same text with status INTERNAL): the model failed, not the request.
_MODEL_RAISED = "Failed to process the request(s) for model"
# The model's inputs are not the ones the adapter sends: a deployment mistake, never the client's.
_WRONG_LAYOUT = ("inference input", "inputs but got", "unexpected shape", "inference output")


#: How long a stream may take to end after its request's last response, before it is cancelled anyway.
STREAM_END_GRACE_S = 5.0


async def stream_end(responses: AsyncIterator[Any]) -> None:
    """Waits for Triton to end a ModelStreamInfer stream after the request's last response (the adapter
    half-closed it); every Triton adapter calls this before its ``finally: responses.cancel()``.

    Cancelling the call right then races Triton (2.51) finishing it: a cancellation that arrives after
    the last response was written is never completed, and the model can no longer unload (stuck
    UNLOADING, and tritonserver's exit waits out its timeout). Cancelling stays the way to abort a
    request still running.
    """

    async def drain() -> None:
        async for _ in responses:
            pass

    try:
        await asyncio.wait_for(drain(), STREAM_END_GRACE_S)
    except (TimeoutError, grpc.aio.AioRpcError):
        pass  # the caller's cancel() then ends it: the request itself is complete either way


def tensor(name: str, value: Any, dtype: Any) -> InferInput:
    """A one-element (or given-shape) input tensor."""
    array = np.asarray(value if isinstance(value, list | np.ndarray) else [value], dtype=dtype)
    tensor_ = InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    tensor_.set_data_from_numpy(array)
    return tensor_


def upstream_error(error: Exception, model: str, param: str | None = None) -> ServiceError:
    """A failure of a KServe v2 / Triton server as the ServiceError clients should see.

    The one mapping for every Triton adapter (text, embeddings, speech, transcription, images,
    videos), whether the failure is a call's status (tritonclient's InferenceServerException, or
    grpc's AioRpcError from a stream) or a stream's in-band ``error_message`` (text only). Only a
    refusal of the request itself (naming ``param``) shows the server's text, cut to MAX_MESSAGE;
    anything else is the deployment's problem, whose server text goes to the log.
    """
    status, message = _status_and_message(error)
    if status.endswith("INVALID_ARGUMENT"):
        return invalid(f"The inference server rejected the request: {message}", param)
    if not status:
        return _in_band_error(message, model, param)
    log.warning("inference server failed", extra={"model": model, "status": status, "error": message})
    if status.endswith("DEADLINE_EXCEEDED"):
        message = f"The inference server did not finish `{model}` in time."
        return ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, message)
    if status.endswith(_RETRYABLE) or "not found" in message.lower() or "unavailable" in message.lower():
        # The catalog routed here: a model the server lacks (or is loading) is a deployment problem, so 503.
        return unavailable(f"The inference server is not serving model `{model}`; retry shortly.")
    return ServiceError(grpc.StatusCode.INTERNAL, f"The inference server failed on model `{model}`.")


def _status_and_message(error: Exception) -> tuple[str, str]:
    """("StatusCode.X" or "" for an in-band failure, the server's text cut to MAX_MESSAGE)."""
    if isinstance(error, grpc.aio.AioRpcError):  # the stream itself failed: connection, deadline, server
        status, message = str(error.code()), error.details() or error.code().name
    elif isinstance(error, InferenceServerException):  # its text is behind message()
        status, message = str(error.status() or ""), str(error.message())
    else:
        status, message = "", str(error)
    return status, message[:MAX_MESSAGE]


def _in_band_error(message: str, model: str, param: str | None) -> ServiceError:
    """A stream's in-band failure: Triton keeps the stream open and sends only its text."""
    if any(hint in message.lower() for hint in _NOT_SERVED):
        log.warning("inference server is not serving the model", extra={"model": model, "error": message})
        return unavailable(f"The inference server is not serving model `{model}` yet; retry shortly.")
    if message.startswith(_MODEL_RAISED):
        log.warning("inference server's model raised", extra={"model": model, "error": message})
        return ServiceError(grpc.StatusCode.INTERNAL, f"The inference server failed on model `{model}`.")
    if any(hint in message for hint in _WRONG_LAYOUT):
        # Names the input the server refused (no address or trace): what the operator needs to fix
        # the adapter's tensor settings (the text backend's triton_flavor).
        return ServiceError(
            grpc.StatusCode.INTERNAL, f"Model `{model}` does not take the inputs this adapter sends: {message}"
        )
    # A per-request refusal (vLLM's validation of sampling parameters arrives this way).
    return invalid(f"The inference server rejected the request: {message}", param)
