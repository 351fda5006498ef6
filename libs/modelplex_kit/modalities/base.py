"""What the platform needs to know about one modality, as one registry row."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import Message
from pydantic import BaseModel, ConfigDict

from modelplex.v1 import catalog_pb2


class CapabilitySpec(BaseModel):
    """The catalog file's ``capabilities`` of one modality; validated, then turned into the proto."""

    model_config = ConfigDict(extra="forbid")

    def to_proto(self) -> catalog_pb2.Capabilities:
        raise NotImplementedError


# Raises a 400 ServiceError naming the parameter the model cannot serve. A checker may also fit the
# request to the model in place (text: json_schema -> json_object); its name then says so.
Checker = Callable[[Message, catalog_pb2.Capabilities], None]
# Completes a backend request with what its catalog entry adds beyond the id (text: the LoRA adapter it names).
Binder = Callable[[Message, catalog_pb2.Model], None]


def _bind_nothing(request: Message, model: catalog_pb2.Model) -> None:
    return None


@dataclass(frozen=True, slots=True)
class Modality:
    #: As written in the catalog (`modality: embeddings`) and in env/chart names.
    name: str
    #: catalog_pb2.Modality value.
    proto: int
    #: The backend's Python package, started as ``python -m <package>``.
    package: str
    #: Settings prefix of that backend (``MODELPLEX_EMBEDDINGS_``); catalog engine settings become its variables.
    env_prefix: str
    #: gRPC stub class of the backend's service.
    stub: type
    #: Validates the catalog entry's ``capabilities``.
    capabilities: type[CapabilitySpec]
    #: Checks (and may fit) a backend request against a model's capabilities; edge and backend run the same one.
    check: Checker
    #: Port of the backend's gRPC service in containers (the chart's default).
    port: int
    #: Completes every request the edge sends the backend with what the model's entry adds (``Binder``).
    bind: Binder = _bind_nothing

    def capabilities_proto(self, raw: Any) -> catalog_pb2.Capabilities:
        return self.capabilities.model_validate(raw if raw is not None else {}).to_proto()
