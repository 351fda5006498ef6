from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from modelplex_kit.pools.settings import PoolSettings
from modelplex_kit.settings import GrpcServiceSettings


class TranscriptionSettings(GrpcServiceSettings):
    """Transcription backend settings (env prefix ``MODELPLEX_TRANSCRIPTION_``); each engine reads its own
    subclass below."""

    model_config = SettingsConfigDict(env_prefix="MODELPLEX_TRANSCRIPTION_", extra="ignore")

    listen: str = "127.0.0.1:50066"
    # Which adapter serves requests (adapters.ENGINES): one setting, one adapter file.
    engine: str = "pocketsphinx"
    # The bounds on one file (see decode.py): longer audio is a 400; so is a decode slower than the timeout.
    max_audio_seconds: int = 3600
    decode_timeout_seconds: float = 300.0
    # Files decoded and recognised at once; more wait, and beyond max_queue get a 503.
    max_concurrency: int = Field(2, ge=1)
    max_queue: int = 16
    # ISO-639-1 codes the engine understands (comma-separated; empty: any).
    languages: str = "en"

    def language_list(self) -> list[str]:
        return [code.strip().lower() for code in self.languages.split(",") if code.strip()]


class PocketsphinxSettings(TranscriptionSettings):
    """engine=pocketsphinx (alias `local`): pocketsphinx's bundled en-us model in process."""

    # Longest utterance handed to the recogniser at once (continuous speech is cut here).
    max_utterance_seconds: float = 20.0


class UpstreamSettings(TranscriptionSettings, PoolSettings):
    """engine=openai (vLLM serving Whisper, /v1/audio/transcriptions) or triton (Whisper on Triton, KServe v2).

    ``upstream_url``: openai: a base URL, e.g. http://vllm-whisper:8000/v1, or several separated by
    commas (an engine pool, modelplex_kit.pools, whose other settings apply too); triton: host:port
    of the gRPC endpoint.
    """

    # The model's name upstream (vLLM's served model name, Triton's model name).
    upstream_model: str = ""
    upstream_api_key: SecretStr = SecretStr("")
    upstream_timeout_seconds: float = 600.0
    # Whisper is multilingual; empty: any language.
    languages: str = ""
    max_concurrency: int = Field(8, ge=1)
    max_queue: int = 64
    # The upstream model translates into English itself (Whisper does: task=translate).
    upstream_translates: bool = True
    # The upstream returns word timestamps (vLLM's Whisper does not; a 400 is better than an empty list).
    upstream_word_timestamps: bool = False
    # openai: stream text upstream (vLLM's stream=true) when the client streams and needs no timestamps.
    upstream_stream: bool = True
    # triton: tensor names of a TensorRT-LLM-style Whisper (whisper_bls): FP32 `WAV` [1, samples] and
    # INT32 `WAV_LENS` [1, 1] at 16 kHz, BYTES `TEXT_PREFIX` [1, 1] (Whisper's task tokens) in; BYTES
    # `TRANSCRIPTS` [1, 1] out. Empty prefix/lens names: the model takes no such input.
    triton_audio_input: str = "WAV"
    triton_lengths_input: str = "WAV_LENS"
    triton_prefix_input: str = "TEXT_PREFIX"
    triton_text_output: str = "TRANSCRIPTS"
    # The model takes a batch dimension ([1, samples]); false: plain [samples].
    triton_batched: bool = True
