from __future__ import annotations

from pydantic import BaseModel, Field
from pydantic_settings import SettingsConfigDict

from modelplex_kit.modalities.images import OPENAI_MAX_PROMPT_CHARS, OPENAI_SIZES
from modelplex_kit.pools.settings import PoolSettings
from modelplex_kit.settings import GrpcServiceSettings


class TritonSettings(BaseModel):
    """triton: a diffusion pipeline served by Triton (KServe v2 gRPC)."""

    # host:port of Triton's gRPC endpoint, and the model name there.
    upstream_url: str = ""
    upstream_model: str = ""
    upstream_timeout_seconds: float = 300.0


class ImagesSettings(GrpcServiceSettings, PoolSettings):
    """Images backend settings (env prefix ``MODELPLEX_IMAGES_``)."""

    model_config = SettingsConfigDict(env_prefix="MODELPLEX_IMAGES_", extra="ignore")

    listen: str = "127.0.0.1:50063"
    # Which adapter renders: one setting, one adapter file.
    # A row of adapters.ENGINES (an unknown name stops startup with the known ones).
    engine: str = "procedural"
    # Sizes this backend renders ("WIDTHxHEIGHT"), comma-separated in the environment.
    sizes: str = ",".join(OPENAI_SIZES)
    max_n: int = Field(10, ge=1)
    # Longest prompt in characters, checked here as well as at the edge (OpenAI's 32000 by default):
    # unchecked, an 8 MB prompt sent to the backend directly was rendered.
    max_prompt_chars: int = Field(OPENAI_MAX_PROMPT_CHARS, ge=1)
    # Images rendered at once; more requests wait their turn.
    max_concurrency: int = Field(2, ge=1)
    # Requests waiting beyond this get 503 with Retry-After.
    max_queue: int = Field(64, ge=0)

    # triton only; flat variables as the launcher writes them (MODELPLEX_IMAGES_UPSTREAM_URL ...).
    # upstream_url (PoolSettings'): host:port, or several separated by commas (an engine pool).
    upstream_model: str = ""
    upstream_timeout_seconds: float = 300.0

    def size_list(self) -> list[str]:
        return [size.strip() for size in self.sizes.split(",") if size.strip()]

    def triton(self) -> TritonSettings:
        return TritonSettings(
            upstream_url=self.upstream_url,
            upstream_model=self.upstream_model,
            upstream_timeout_seconds=self.upstream_timeout_seconds,
        )
