from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import SettingsConfigDict

from modelplex_kit.settings import GrpcServiceSettings

DEFAULT_CATALOG = Path(str(resources.files("modelplex_catalog") / "catalog.yaml"))


class CatalogSettings(GrpcServiceSettings):
    """Catalog service settings (env prefix ``MODELPLEX_CATALOG_``)."""

    model_config = SettingsConfigDict(env_prefix="MODELPLEX_CATALOG_", extra="ignore")

    listen: str = "127.0.0.1:50051"
    # The catalog file; MODELPLEX_CATALOG as the issue and the chart name it.
    path: Path = Field(DEFAULT_CATALOG, validation_alias=AliasChoices("MODELPLEX_CATALOG", "MODELPLEX_CATALOG_PATH"))
    # How often the file is checked for changes. Polling (not inotify) because
    # Kubernetes updates a mounted ConfigMap by swapping a symlink.
    poll_seconds: float = 1.0
    # Where models come from: the YAML file (`path`), or Model resources (models.modelplex.io) in
    # `kube_namespace`, listed and watched with the pod's service account.
    source: Literal["file", "kubernetes"] = "file"
    # Empty: the pod's own namespace.
    kube_namespace: str = ""
    # Talk to this URL without credentials (kubectl proxy, tests) instead of the in-cluster API.
    kube_api_url: str = ""
    # Server-side watch timeout; the watch then resumes from the last resourceVersion.
    kube_watch_timeout_seconds: int = Field(240, gt=0)
    kube_backoff_max_seconds: float = Field(30.0, gt=0)
    # Follow each backend's grpc.health and mark models ready/not ready (the edge answers 503 for those
    # that are not). Off: every model is routed, as before.
    follow_readiness: bool = True
    # Longest pause between attempts to reach a backend that does not answer.
    readiness_retry_seconds: float = Field(1.0, gt=0)
    # How often a backend target's name is looked up again (a headless Service: one address per
    # ready pod), so each replica's health is followed as pods come and go.
    readiness_resolve_seconds: float = Field(5.0, gt=0)
