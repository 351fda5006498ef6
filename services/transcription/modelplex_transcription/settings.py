from __future__ import annotations

from typing import Literal

from pydantic import SecretStr
from pydantic_settings import SettingsConfigDict

from modelplex_kit.settings import GrpcServiceSettings


class TranscriptionSettings(GrpcServiceSettings):
    """Transcription backend settings (env prefix ``MODELPLEX_TRANSCRIPTION_``)."""

    model_config = SettingsConfigDict(env_prefix="MODELPLEX_TRANSCRIPTION_", extra="ignore")

    listen: str = "127.0.0.1:50066"
    # Which adapter serves requests: one setting, one adapter file.
    engine: Literal["pocketsphinx"] = "pocketsphinx"
    # The bounds on one file (see decode.py): longer audio is a 400; so is a decode slower than the timeout.
    max_audio_seconds: int = 3600
    decode_timeout_seconds: float = 300.0
    # Files decoded and recognised at once; more wait, and beyond max_queue get a 503.
    max_concurrency: int = 2
    max_queue: int = 16
    # ISO-639-1 codes the engine understands (comma-separated; empty: any).
    languages: str = "en"

    # pocketsphinx: longest utterance handed to the recogniser at once (continuous speech is cut here).
    max_utterance_seconds: float = 20.0

    # openai: base URL of an OpenAI-compatible server (vLLM serving Whisper), e.g. http://vllm-whisper:8000/v1.
    # triton: host:port of Triton's gRPC endpoint.
    upstream_url: str = ""
    upstream_model: str = ""
    upstream_api_key: SecretStr = SecretStr("")
    upstream_timeout_seconds: float = 600.0
    # The upstream model translates into English itself (Whisper does: task=translate).
    upstream_translates: bool = True

    def language_list(self) -> list[str]:
        return [code.strip().lower() for code in self.languages.split(",") if code.strip()]
