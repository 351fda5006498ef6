"""Reads and validates the catalog YAML into protobuf models.

An entry's ``modality`` picks its row in the modality registry, which says how
that modality's ``capabilities`` are written and validated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from google.protobuf import struct_pb2
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from modelplex.v1 import catalog_pb2
from modelplex_kit.modalities import REGISTRY


class EngineSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: str
    settings: dict[str, Any] = Field(default_factory=dict)


class PoolSpec(BaseModel):
    """A model's engine replicas as deployed (the chart's `pool`); the backend discovers them itself."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    replicas: int | None = Field(None, ge=0)
    selector: dict[str, str] = Field(default_factory=dict)
    inference_pool: str = Field("", alias="inferencePool")
    port: int | str | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> PoolSpec:
        if self.selector and self.inference_pool:
            raise ValueError("a pool is a selector or an InferencePool, not both")
        return self


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1)
    aliases: list[str] = Field(default_factory=list)
    modality: str
    backend: str = Field(min_length=1, description="gRPC target host:port")
    engine: EngineSpec
    pool: PoolSpec | None = None
    # Written per modality (a list of flags for text, a mapping for the others).
    capabilities: Any = None
    context_length: int = Field(0, ge=0)
    # Text: output tokens generated when a request sets no max_tokens (None: until the context is full).
    default_max_tokens: int | None = Field(None, ge=1, le=2**32 - 1)
    owned_by: str = "modelplex"
    created: int = 0
    description: str = ""

    @field_validator("modality")
    @classmethod
    def _known_modality(cls, value: str) -> str:
        if value not in REGISTRY:
            raise ValueError(f"unknown modality {value!r}; known: {', '.join(REGISTRY)}")
        return value

    def to_proto(self) -> catalog_pb2.Model:
        row = REGISTRY[self.modality]
        settings = struct_pb2.Struct()
        settings.update(self.engine.settings)
        return catalog_pb2.Model(
            id=self.id,
            aliases=self.aliases,
            modality=row.proto,
            backend_target=self.backend,
            engine=catalog_pb2.Engine(kind=self.engine.kind, settings=settings),
            capabilities=row.capabilities_proto(self.capabilities),
            context_length=self.context_length,
            default_max_tokens=self.default_max_tokens,
            owned_by=self.owned_by,
            created=self.created,
            description=self.description,
        )


class CatalogFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # Required: an empty or truncated file must not pass as a catalog without models
    # (every model would turn into a 404). `models: []` says so explicitly.
    models: list[ModelSpec]


def parse_catalog(text: str) -> list[catalog_pb2.Model]:
    """Parses catalog YAML; raises ValueError (pydantic's ValidationError is one) on bad content."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:  # a truncated or mangled file
        raise ValueError(f"the catalog is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError("the catalog must be a YAML mapping with a `models` list")
    specs = CatalogFile.model_validate(data).models
    return [spec.to_proto() for spec in specs]


def load_catalog(path: Path) -> list[catalog_pb2.Model]:
    return parse_catalog(path.read_text(encoding="utf-8"))
