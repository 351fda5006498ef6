"""OpenAI sampling parameters with OpenAI's defaults: the one typed form engines that sample read."""

from __future__ import annotations

from dataclasses import dataclass

from modelplex.v1 import text_pb2


@dataclass(frozen=True, slots=True)
class SamplingParams:
    temperature: float
    top_p: float
    #: None means "until the context ends" (an engine turns it into its own budget).
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    #: Per choice: the request's seed plus the choice's index (see ``choices.stream_choices``).
    seed: int | None = None
    #: Logprobs wanted, with this many alternatives per token (0: the chosen token's only); None: none.
    #: (The field names are vLLM's SamplingParams', so remote engines can take them as they are.)
    logprobs: int | None = None

    @classmethod
    def from_request(
        cls, request: text_pb2.GenerateRequest, default_temperature: float = 1.0, default_top_p: float = 1.0
    ) -> SamplingParams:
        """Unset temperature/top_p take the model's defaults (OpenAI's are 1.0; like vLLM, a model's
        recommended generation settings win). The seed is left to each choice."""
        s = request.sampling
        return cls(
            temperature=s.temperature if s.HasField("temperature") else default_temperature,
            top_p=s.top_p if s.HasField("top_p") else default_top_p,
            max_tokens=s.max_tokens if s.HasField("max_tokens") else None,
            stop=tuple(s.stop),
            presence_penalty=s.presence_penalty,
            frequency_penalty=s.frequency_penalty,
            logprobs=request.top_logprobs if request.logprobs else None,
        )
