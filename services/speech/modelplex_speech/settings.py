from __future__ import annotations

from typing import Literal

from pydantic_settings import SettingsConfigDict

from modelplex_kit.settings import GrpcServiceSettings


class SpeechSettings(GrpcServiceSettings):
    """Speech backend settings (env prefix ``MODELPLEX_SPEECH_``)."""

    model_config = SettingsConfigDict(env_prefix="MODELPLEX_SPEECH_", extra="ignore")

    listen: str = "127.0.0.1:50065"
    # Which adapter serves requests: one setting, one adapter file.
    engine: Literal["espeak"] = "espeak"
    # What the engine advertises (the catalog entry should say the same): comma-separated voices,
    # and OpenAI voice names mapped onto them as `alloy=en-us,echo=en-us+m3`.
    # espeak-ng voice names (`en` is British English; `+f3`, `+klatt4`... are its voice variants; the Klatt
    # ones are the clearest for speech recognisers, so OpenAI's default-sounding names map onto them).
    voices: str = "en-us+klatt4,en+klatt4,en-us,en,en-us+f3,en-us+m3,en+f2"
    voice_aliases: str = (
        "alloy=en-us+klatt4,ash=en-us,ballad=en,cedar=en-us+m3,coral=en-us+f3,echo=en-us+m3,fable=en+klatt4,"
        "marin=en+f2,nova=en-us+f3,onyx=en-us+m3,sage=en+f2,shimmer=en+f2,verse=en-us+klatt4"
    )
    max_input_chars: int = 4096
    # Concurrent syntheses; requests beyond wait (espeak-ng itself is one engine per process).
    max_queue: int = 64

    # triton: host:port of Triton's gRPC endpoint and the model's name there.
    upstream_url: str = ""
    upstream_model: str = ""
    upstream_timeout_seconds: float = 120.0
    # triton: sample rate of the PCM the model returns (16-bit or float32 mono).
    upstream_sample_rate: int = 24000

    def voice_list(self) -> list[str]:
        return [v.strip() for v in self.voices.split(",") if v.strip()]

    def alias_map(self) -> dict[str, str]:
        pairs = (item.split("=", 1) for item in self.voice_aliases.split(",") if "=" in item)
        return {name.strip(): voice.strip() for name, voice in pairs}
