"""Reads and validates the catalog YAML into protobuf models."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from google.protobuf import struct_pb2
from pydantic import BaseModel, ConfigDict, Field

from modelplex.v1 import catalog_pb2

Capability = Literal[
    "chat", "completions", "tool_use", "vision", "json_schema", "prompt_caching", "logprobs", "multiple_choices"
]
ModalityName = Literal["text", "embeddings", "images", "videos", "speech", "transcription"]


class EngineSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: str
    settings: dict[str, Any] = Field(default_factory=dict)


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1)
    aliases: list[str] = Field(default_factory=list)
    modality: ModalityName
    backend: str = Field(min_length=1, description="gRPC target host:port")
    engine: EngineSpec
    capabilities: list[Capability] = Field(default_factory=list)
    context_length: int = Field(0, ge=0)
    owned_by: str = "modelplex"
    created: int = 0
    description: str = ""

    def to_proto(self) -> catalog_pb2.Model:
        settings = struct_pb2.Struct()
        settings.update(self.engine.settings)
        return catalog_pb2.Model(
            id=self.id,
            aliases=self.aliases,
            modality=catalog_pb2.Modality.Value(f"MODALITY_{self.modality.upper()}"),
            backend_target=self.backend,
            engine=catalog_pb2.Engine(kind=self.engine.kind, settings=settings),
            capabilities=catalog_pb2.Capabilities(**{name: True for name in self.capabilities}),
            context_length=self.context_length,
            owned_by=self.owned_by,
            created=self.created,
            description=self.description,
        )


class CatalogFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    models: list[ModelSpec] = Field(default_factory=list)


def parse_catalog(text: str) -> list[catalog_pb2.Model]:
    """Parses catalog YAML; raises ValueError (pydantic's ValidationError is one) on bad content."""
    data = yaml.safe_load(text) or {}
    return [spec.to_proto() for spec in CatalogFile.model_validate(data).models]


def load_catalog(path: Path) -> list[catalog_pb2.Model]:
    return parse_catalog(path.read_text(encoding="utf-8"))
