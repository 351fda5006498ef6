from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from modelplex_kit.settings import ServiceSettings


class EdgeSettings(ServiceSettings):
    """Edge settings (env prefix ``MODELPLEX_EDGE_``)."""

    model_config = SettingsConfigDict(env_prefix="MODELPLEX_EDGE_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8080
    catalog_target: str = "127.0.0.1:50051"
    # The one accepted API key until the gatekeeper lands. Never logged.
    dev_api_key: SecretStr = Field(
        SecretStr("sk-modelplex-dev"),
        validation_alias=AliasChoices("MODELPLEX_DEV_API_KEY", "MODELPLEX_EDGE_DEV_API_KEY"),
    )
    # The gatekeeper sidecar (unix:///run/modelplex/gatekeeper.sock, or host:port). Empty: only the
    # dev key above is accepted, without limits.
    gatekeeper_target: str = ""
    # Longest wait for the gatekeeper's decision; past it the request gets 503 + Retry-After.
    gatekeeper_timeout_seconds: float = 2.0
    # Admit most requests in-process from quota leases the sidecar grants (exact limits either way).
    gatekeeper_leases: bool = True
    # While the sidecar is unreachable: "closed" refuses (503 + Retry-After) once a key's lease has
    # expired (within one lease period); "open" keeps serving keys that held a lease, at its size.
    gatekeeper_failure: Literal["open", "closed"] = "closed"
    # Browser origins allowed by CORS; empty keeps CORS closed (a server-to-server API).
    # Comma-separated in the environment, as the Helm chart writes it.
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    max_body_bytes: int = 16 * 1024 * 1024
    # Body limit of the file-upload endpoints (/v1/audio/transcriptions, /translations): OpenAI's 25 MB
    # file plus the form around it. The file itself is held to 25 MB (413) by the endpoint.
    max_upload_bytes: int = 26 * 1024 * 1024
    # Longest wait for the next piece of a request body, and for a request's headers; a slower
    # client gets 408 and its connection is closed.
    body_timeout_seconds: float = 30.0
    header_timeout_seconds: float = 30.0
    # Deadline for one backend call (generation included).
    backend_timeout_seconds: float = 600.0
    # How long startup waits for the first catalog snapshot before serving 503s.
    catalog_wait_seconds: float = 10.0
    # uvicorn's keep-alive for idle client connections.
    keep_alive_seconds: int = 75

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [origin.strip() for origin in value.split(",") if origin.strip()]
        return value
