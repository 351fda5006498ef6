"""Reads and validates the catalog YAML into protobuf models.

An entry's ``modality`` picks its row in the modality registry, which says how
that modality's ``capabilities`` are written and validated.

An entry with ``adapter`` is a LoRA adapter of another text model (its ``base``): it is served by the
base's backend and engine, so what it does not set (modality, backend, engine, capabilities, context
length, output default, owner) it takes from the base; the engine loads the adapter on demand.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from google.protobuf import struct_pb2
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from modelplex.v1 import catalog_pb2
from modelplex_kit.cold_start import DEFAULT_COLD_START_TIMEOUT_S
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


class AdapterSpec(BaseModel):
    """A LoRA adapter entry's own part: its base model and where its weights are."""

    model_config = ConfigDict(extra="forbid")
    base: str = Field(min_length=1, description="the base model's id or alias")
    source: str = Field(min_length=1, description="a path on the engine, or a Hugging Face repo id")
    rank: int = Field(0, ge=0, le=1024)


# What an adapter entry takes from its base when it does not set it.
_INHERITED = ("modality", "backend", "engine", "capabilities", "context_length", "default_max_tokens", "owned_by")


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1)
    aliases: list[str] = Field(default_factory=list)
    # Required of every entry but an adapter's (which takes them from its base).
    modality: str = ""
    backend: str = Field("", description="gRPC target host:port")
    engine: EngineSpec | None = None
    adapter: AdapterSpec | None = None
    pool: PoolSpec | None = None
    # Written per modality (a list of flags for text, a mapping for the others).
    capabilities: Any = None
    context_length: int = Field(0, ge=0)
    # Text: output tokens generated when a request sets no max_tokens (None: until the context is full).
    default_max_tokens: int | None = Field(None, ge=1, le=2**32 - 1)
    owned_by: str = "modelplex"
    created: int = 0
    description: str = ""
    # Its engines may scale to zero (the chart's KEDA objects go to 0 replicas): a request that finds none
    # ready is held up to cold_start_timeout seconds while one starts (its backend's
    # POOL_COLD_START_TIMEOUT_SECONDS), then 503 with Retry-After. Only a remote engine's pool scales.
    scale_to_zero: bool = False
    cold_start_timeout: float = Field(DEFAULT_COLD_START_TIMEOUT_S, gt=0)

    @field_validator("modality")
    @classmethod
    def _known_modality(cls, value: str) -> str:
        if value and value not in REGISTRY:
            raise ValueError(f"unknown modality {value!r}; known: {', '.join(REGISTRY)}")
        return value

    @model_validator(mode="after")
    def _complete_unless_adapter(self) -> ModelSpec:
        if self.adapter is None:
            missing = [name for name in ("modality", "backend", "engine") if not getattr(self, name)]
            if missing:
                raise ValueError(f"a model needs {', '.join(missing)} (only an adapter takes them from its base)")
        else:
            if self.modality not in ("", "text"):
                raise ValueError("an adapter is a text model's LoRA adapter: modality text")
            if self.pool is not None:
                raise ValueError("an adapter runs on its base's engines: no pool of its own")
            if self.scale_to_zero:
                raise ValueError("an adapter runs on its base's engines: the base scales to zero, not the adapter")
        return self

    def on_base(self, base: ModelSpec) -> ModelSpec:
        """This adapter entry completed from its base (ValueError when that cannot be its base)."""
        assert self.adapter is not None
        if base.adapter is not None:
            raise ValueError(f"adapter {self.id!r}: its base {base.id!r} is itself an adapter")
        if base.modality != "text":
            raise ValueError(f"adapter {self.id!r}: its base {base.id!r} is not a text model")
        inherited = {name: getattr(base, name) for name in _INHERITED if name not in self.model_fields_set}
        adapter = self.adapter.model_copy(update={"base": base.id})
        return self.model_copy(update={**inherited, "adapter": adapter})

    def to_proto(self) -> catalog_pb2.Model:
        if self.engine is None or not self.modality:
            raise ValueError(f"adapter {self.id!r} was not completed from its base")
        row = REGISTRY[self.modality]
        settings = struct_pb2.Struct()
        settings.update(self.engine.settings)
        adapter = self.adapter
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
            adapter=catalog_pb2.Adapter(base=adapter.base, source=adapter.source, rank=adapter.rank)
            if adapter is not None
            else None,
        )


def with_bases(specs: list[ModelSpec]) -> tuple[list[ModelSpec], dict[str, str]]:
    """Every adapter entry completed from its base, named by id or alias among ``specs``. Returns the
    entries that stand and, per adapter that cannot (its base missing, an adapter, or not text), why not."""
    by_name = {name: spec for spec in specs if spec.adapter is None for name in (spec.id, *spec.aliases)}
    adapters = {name for spec in specs if spec.adapter is not None for name in (spec.id, *spec.aliases)}
    standing, refused = [], {}
    for spec in specs:
        if spec.adapter is None:
            standing.append(spec)
            continue
        base = by_name.get(spec.adapter.base)
        try:
            if base is None:
                why = "is itself an adapter" if spec.adapter.base in adapters else "is not in the catalog"
                raise ValueError(f"adapter {spec.id!r}: its base {spec.adapter.base!r} {why}")
            standing.append(spec.on_base(base))
        except ValueError as exc:
            refused[spec.id] = str(exc)
    return standing, refused


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
    specs, refused = with_bases(CatalogFile.model_validate(data).models)
    if refused:
        raise ValueError("; ".join(refused.values()))
    return [spec.to_proto() for spec in specs]


def load_catalog(path: Path) -> list[catalog_pb2.Model]:
    return parse_catalog(path.read_text(encoding="utf-8"))
