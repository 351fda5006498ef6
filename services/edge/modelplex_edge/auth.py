"""Who is calling. Until the gatekeeper sidecar lands, one dev key is accepted.

The key is compared in constant time and never logged or echoed; downstream
services only see an opaque principal id derived from it.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Protocol

import grpc

from modelplex.v1 import common_pb2
from modelplex_kit.errors import ServiceError
from modelplex_kit.logging import request_id_var

_NO_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer "
    "auth (i.e. Authorization: Bearer YOUR_KEY)."
)
_BAD_KEY = "Incorrect API key provided. Check the key you configured for this Modelplex deployment."


@dataclass(frozen=True, slots=True)
class Caller:
    principal_id: str
    request_id: str

    def meta(self, end_user: str | None = None) -> common_pb2.RequestMeta:
        return common_pb2.RequestMeta(
            request_id=self.request_id, principal_id=self.principal_id, end_user=end_user or ""
        )


def bearer_key(authorization: str | None) -> str:
    scheme, _, key = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise ServiceError(grpc.StatusCode.UNAUTHENTICATED, _NO_KEY)
    return key.strip()


class Authorizer(Protocol):
    """Decides who is calling, or raises a 401/429 ServiceError.

    The gatekeeper sidecar's client will implement this too (with rate limits
    and the x-ratelimit-* headers); the routes only see ``Caller``.
    """

    def authorize(self, authorization: str | None) -> Caller: ...


class DevKeyAuthorizer:
    """Accepts exactly one configured key (MODELPLEX_DEV_API_KEY)."""

    def __init__(self, key: str) -> None:
        self._key = key.encode()
        self._principal = "key_" + hashlib.sha256(self._key).hexdigest()[:16]

    def authorize(self, authorization: str | None) -> Caller:
        key = bearer_key(authorization)
        if not hmac.compare_digest(key.encode(), self._key):
            raise ServiceError(grpc.StatusCode.UNAUTHENTICATED, _BAD_KEY)
        return Caller(self._principal, request_id_var.get())
