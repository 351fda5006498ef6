"""Small helpers for adapters that call a KServe v2 / Triton gRPC server (tritonclient.grpc.aio).

Imported only by adapters that have tritonclient installed.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from modelplex_kit.errors import ServiceError, invalid, unavailable

log = logging.getLogger(__name__)

_MAX_MESSAGE = 300
# Status names (tritonclient reports "StatusCode.X") that mean "the server, not the request".
_RETRYABLE = ("UNAVAILABLE", "NOT_FOUND", "RESOURCE_EXHAUSTED", "CANCELLED")


def tensor(name: str, value: Any, dtype: Any) -> InferInput:
    """A one-element (or given-shape) input tensor."""
    array = np.asarray(value if isinstance(value, list | np.ndarray) else [value], dtype=dtype)
    tensor_ = InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    tensor_.set_data_from_numpy(array)
    return tensor_


def upstream_error(error: Exception, model: str, param: str | None = None) -> ServiceError:
    """A failure of a KServe v2 / Triton server as the ServiceError clients should see.

    Every backend's Triton adapter maps failures here. Only a refusal of the request itself
    (INVALID_ARGUMENT, naming ``param``) shows the server's text; anything else is the
    deployment's problem: a retryable 503 (or 504 on a deadline) whose server text goes to the log.
    """
    status = str(error.status() or "") if isinstance(error, InferenceServerException) else ""
    message = str(error.message() if isinstance(error, InferenceServerException) else error)[:_MAX_MESSAGE]
    if status.endswith("INVALID_ARGUMENT"):
        return invalid(f"The inference server rejected the request: {message}", param)
    log.warning("inference server failed", extra={"model": model, "status": status, "error": message})
    if status.endswith("DEADLINE_EXCEEDED"):
        message = f"The inference server did not finish `{model}` in time."
        return ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, message)
    if status.endswith(_RETRYABLE) or "not found" in message.lower() or "unavailable" in message.lower():
        # The catalog routed here: a model the server lacks (or is loading) is a deployment problem, so 503.
        return unavailable(f"The inference server is not serving model `{model}`; retry shortly.")
    return ServiceError(grpc.StatusCode.INTERNAL, f"The inference server failed on model `{model}`.")
