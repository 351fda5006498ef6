"""A call's priority, carried edge -> backend as gRPC metadata, the same header for every modality.

The edge sends ``x-modelplex-priority: batch`` on a batch line's calls (absent: interactive). Every gRPC
server built by ``modelplex_kit.grpc_server`` puts it in ``priority_var`` for the call's duration, so an
engine that schedules (the llama.cpp batch scheduler) reads it without a proto field per modality.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterable

PRIORITY_HEADER = "x-modelplex-priority"
#: Below interactive traffic: served when no interactive work waits.
BATCH = "batch"

#: Endpoint names the edge and the gatekeeper agree on: a batch's creation (its identity check gets a ticket
#: for the lines) and the prefix of its lines' names ("batch:chat.completions"), metered outside RPM/TPM.
BATCH_CREATE_ENDPOINT, BATCH_LINE_PREFIX = "batches", "batch:"

priority_var: contextvars.ContextVar[str] = contextvars.ContextVar("priority", default="")


def incoming_priority(metadata: Iterable[tuple[str, str | bytes]]) -> str:
    for key, value in metadata:
        if key == PRIORITY_HEADER and isinstance(value, str):
            return value
    return ""


def is_batch() -> bool:
    """Whether the current call is batch work."""
    return priority_var.get() == BATCH
