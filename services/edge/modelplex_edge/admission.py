"""Who is calling and whether they may: the pipeline's admit and account hooks.

The pipeline asks ``Admission.admit`` before any backend sees a request (with
the key as sent, the model, the endpoint and a cost estimate) and calls
``Admission.account`` exactly once when it is over, with what it consumed. The
gatekeeper sidecar's client implements this protocol; ``DevKeyAdmission`` is the
single-key stand-in for a laptop. Keys are compared in constant time and never
logged or echoed; downstream services only see an opaque principal id.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import grpc

from modelplex.v1 import common_pb2
from modelplex_kit.errors import ServiceError

if TYPE_CHECKING:
    from modelplex_edge.leases import Draw

_NO_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer "
    "auth (i.e. Authorization: Bearer YOUR_KEY)."
)
_TWO_KEYS = "Send exactly one Authorization header (Authorization: Bearer YOUR_KEY); this request had several."
_BAD_SCHEME = "The Authorization header must use Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."


@dataclass(frozen=True, slots=True)
class Ask:
    """What admission sees of a request."""

    #: Every Authorization header value as sent (more than one is refused).
    authorization: tuple[str, ...]
    #: e.g. "chat.completions", "embeddings", "models".
    endpoint: str
    #: Canonical catalog id; "" when the request is refused before a model is known.
    model: str = ""
    #: Tokens the request may consume (prompt estimate + output bound), reserved against limits.
    cost: int = 0


@dataclass(slots=True)
class Admitted:
    """An admitted request: who it is and what its response must carry."""

    principal_id: str
    endpoint: str = ""
    model: str = ""
    #: x-ratelimit-* and the like, added to the response.
    headers: dict[str, str] = field(default_factory=dict)
    #: Globs of the models this caller may use.
    models: tuple[str, ...] = ("*",)
    #: Opaque handle for ``account`` (the gatekeeper's admission id).
    ticket: str = ""
    #: The key's project; stored state (responses) is visible to the keys of one project only.
    project: str = ""
    #: Set when admitted in-process from a quota lease (what it drew, given back at ``account``).
    lease: Draw | None = None
    #: The stored response this call produces, when it runs apart from its create request (a background
    #: response): the usage record names it.
    response_id: str = ""

    @property
    def scope(self) -> str:
        """Who owns what this caller stores: its project, or the key itself where there are no projects."""
        return self.project or self.principal_id

    def may_use(self, model_id: str) -> bool:
        return any(fnmatch.fnmatchcase(model_id, glob) for glob in self.models)


# Why a request ended before its backend finished (AccountRequest.ended); "" when it ran to its end.
CLIENT_DISCONNECT, DRAIN, UPSTREAM_FAILURE = "client_disconnect", "drain", "upstream_failure"


@dataclass(slots=True)
class Consumption:
    """What one request consumed, for metering and token limits.

    A backend reports exact totals when it finishes (``add_usage``, units) and running totals while it
    streams (``running_usage``, ``running_units``). A stream that ends early has no final totals: it is
    accounted what its running totals had reached (``settle``), so closing the connection early never
    makes a request free.
    """

    usage: common_pb2.Usage = field(default_factory=common_pb2.Usage)
    #: Non-token units: images, seconds of audio or video, characters of speech.
    units: float = 0.0
    unit_kind: str = ""
    #: Why it ended early (CLIENT_DISCONNECT, DRAIN, UPSTREAM_FAILURE); "" when it ran to its end.
    ended: str = ""
    #: The running totals of the backend stream under way (cleared when its final totals arrive).
    running: common_pb2.Usage = field(default_factory=common_pb2.Usage)
    running_units: float = 0.0

    def add_usage(self, usage: common_pb2.Usage) -> None:
        for name in ("prompt_tokens", "completion_tokens", "total_tokens", "cached_prompt_tokens"):
            setattr(self.usage, name, getattr(self.usage, name) + getattr(usage, name))
        self.usage.cache_creation_prompt_tokens += usage.cache_creation_prompt_tokens
        self.running.Clear()

    def running_usage(self, usage: common_pb2.Usage) -> None:
        self.running.CopyFrom(usage)

    def add_units(self, units: float, kind: str) -> None:
        """Final units of one backend answer (they replace that answer's running count)."""
        self.units += units
        self.unit_kind = kind
        self.running_units = 0.0

    def running_count(self, units: float, kind: str) -> None:
        self.running_units = units
        self.unit_kind = kind

    def settle(self) -> None:
        """Folds what an unfinished stream had consumed into the totals (once, when the request is over)."""
        if self.running.prompt_tokens or self.running.completion_tokens:
            self.add_usage(self.running)
        self.units += self.running_units
        self.running_units = 0.0


class Admission(Protocol):
    async def admit(self, ask: Ask) -> Admitted:
        """Admits the request or raises a ServiceError: 401 (key), 404 (model not allowed), 429 (limits)."""
        ...

    async def account(self, admitted: Admitted, used: Consumption, failed: bool) -> None:
        """Reports what an admitted request consumed and releases what it held; called exactly once."""
        ...

    def hand_off(self, admitted: Admitted) -> None:
        """The request goes on in another process (the jobs process), which accounts it: this one stops
        answering for it (the sidecar client no longer names it when a new stream resumes its requests)."""
        ...

    def take_over(self, admitted: Admitted) -> None:
        """This process now runs a request admitted by another and will account it: the gatekeeper holds its
        slot for this process (released if this process dies without accounting it)."""
        ...

    async def close(self) -> None: ...


def bearer_key(authorization: tuple[str, ...]) -> str:
    """The key of the one ``Authorization: Bearer`` header, or a 401."""
    if not authorization:
        raise ServiceError(grpc.StatusCode.UNAUTHENTICATED, _NO_KEY)
    if len(authorization) > 1:
        raise ServiceError(grpc.StatusCode.UNAUTHENTICATED, _TWO_KEYS, code="invalid_api_key")
    scheme, _, key = authorization[0].strip().partition(" ")
    if scheme.lower() != "bearer":
        raise ServiceError(grpc.StatusCode.UNAUTHENTICATED, _BAD_SCHEME, code="invalid_api_key")
    if not key.strip():
        raise ServiceError(grpc.StatusCode.UNAUTHENTICATED, _NO_KEY)
    return key.strip()


def masked(key: str) -> str:
    """sk-abc…xyz: enough for a person to recognise their key, useless to anyone else."""
    printable = "".join(c if c.isascii() and c.isprintable() else "?" for c in key)
    if len(printable) < 12:
        return "***"
    return f"{printable[:6]}…{printable[-3:]}"


def invalid_key(key: str) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.UNAUTHENTICATED,
        f"Incorrect API key provided: {masked(key)}. Check the key you configured for this Modelplex deployment.",
        code="invalid_api_key",
    )


def principal_of(key: str) -> str:
    return "key_" + hashlib.sha256(key.encode()).hexdigest()[:16]


class DevKeyAdmission:
    """Accepts exactly one configured key (MODELPLEX_DEV_API_KEY), with no limits."""

    def __init__(self, key: str) -> None:
        self._key = key.encode()
        self._principal = principal_of(key)

    async def admit(self, ask: Ask) -> Admitted:
        key = bearer_key(ask.authorization)
        if not hmac.compare_digest(key.encode(), self._key):
            raise invalid_key(key)
        return Admitted(self._principal, endpoint=ask.endpoint, model=ask.model)

    async def account(self, admitted: Admitted, used: Consumption, failed: bool) -> None:
        return None  # no limits to release; the pipeline meters usage into Prometheus itself

    def hand_off(self, admitted: Admitted) -> None:
        return None

    def take_over(self, admitted: Admitted) -> None:
        return None

    async def close(self) -> None:
        return None
