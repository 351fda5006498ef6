from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from modelplex_kit.pools.settings import PoolSettings
from modelplex_kit.settings import GrpcServiceSettings


class SpeechSettings(GrpcServiceSettings):
    """Speech backend settings (env prefix ``MODELPLEX_SPEECH_``); each engine reads its own subclass below."""

    model_config = SettingsConfigDict(env_prefix="MODELPLEX_SPEECH_", extra="ignore")

    listen: str = "127.0.0.1:50065"
    # Which adapter serves requests (adapters.ENGINES): one setting, one adapter file.
    engine: str = "espeak"
    # What the engine advertises (the catalog entry should say the same): comma-separated voices,
    # and OpenAI voice names mapped onto them as `alloy=en-us,echo=en-us+m3`.
    voices: str = ""
    voice_aliases: str = ""
    max_input_chars: int = 4096
    # Syntheses in flight; beyond this a request gets a 503 with Retry-After.
    max_queue: int = 64

    def voice_list(self) -> list[str]:
        return [v.strip() for v in self.voices.split(",") if v.strip()]

    def alias_map(self) -> dict[str, str]:
        pairs = (item.split("=", 1) for item in self.voice_aliases.split(",") if "=" in item)
        return {name.strip(): voice.strip() for name, voice in pairs}


class EspeakSettings(SpeechSettings):
    """engine=espeak: espeak-ng in process (one synthesis at a time; espeak-ng is one engine per process)."""

    # espeak-ng voice names (`en` is British English; `+f3`, `+klatt4`... are its voice variants; the Klatt
    # ones are the clearest for speech recognisers, so OpenAI's default-sounding names map onto them).
    voices: str = "en-us+klatt4,en+klatt4,en-us,en,en-us+f3,en-us+m3,en+f2"
    voice_aliases: str = (
        "alloy=en-us+klatt4,ash=en-us,ballad=en,cedar=en-us+m3,coral=en-us+f3,echo=en-us+m3,fable=en+klatt4,"
        "marin=en+f2,nova=en-us+f3,onyx=en-us+m3,sage=en+f2,shimmer=en+f2,verse=en-us+klatt4"
    )


class TritonSettings(SpeechSettings, PoolSettings):
    """engine=triton: a TTS model on Triton (or any KServe v2 server): BYTES text in, PCM out."""

    # The model's name; its host:port is upstream_url (PoolSettings': several, separated by
    # commas, make an engine pool).
    upstream_model: str = ""
    upstream_timeout_seconds: float = 120.0
    # The model's voices (its `voice` input's values); empty `triton_voice_input` = a single-voice model.
    voices: str = "default"
    # Sample rate of the PCM the model returns (INT16 or FP32 mono).
    upstream_sample_rate: int = Field(24000, ge=8000)
    # Tensor names: BYTES `text` [1] (and `voice` [1], FP32 `speed` [1] when named) in; `audio` [-1] out.
    triton_text_input: str = "text"
    triton_voice_input: str = "voice"
    triton_speed_input: str = ""
    triton_audio_output: str = "audio"
    # Decoupled models stream several responses per request (ModelStreamInfer); others answer once (ModelInfer).
    # Empty: read the model's config (model_transaction_policy.decoupled) at the first request.
    triton_decoupled: bool | None = None
