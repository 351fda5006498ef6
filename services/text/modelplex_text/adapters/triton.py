"""The Triton engine: decoupled streaming inference over Triton's gRPC API.

Triton only generates tokens (a TRT-LLM ensemble/BLS model or a vLLM-backend
model); chat templating and token counting happen here, with the model's GGUF
tokenizer loaded vocab-only (no weights), so prompts render exactly as on the
llama.cpp engine and usage needs no extra Triton outputs. Each choice is one
ModelStreamInfer stream: one request, then half-close; Triton streams text
deltas and ends the stream after the final response (or in-band error), which
the adapter waits for. Closing the stream early cancels the gRPC call, which is
how Triton learns to abort the request.

Guided decoding (vLLM flavor): the backend's ``sampling_parameters`` JSON
takes ``structured_outputs`` as a JSON *string* of vLLM's
StructuredOutputsParams ({"json": schema} or {"json_object": true}); this is
what current releases of triton-inference-server/vllm_backend parse (older
ones, before vLLM 0.11, called the key ``guided_decoding``).

Logprobs (vLLM flavor): ``logprobs`` in the sampling parameters plus the
``return_logprobs`` input make the backend send a ``logprobs`` output with each
response: JSON, one ``{token_id: {logprob, rank, decoded_token}}`` per new
token, the sampled token first (vLLM's order). TRT-LLM ensembles have no such
output, so there a request for logprobs is a 400 naming ``logprobs``.

Cached tokens (vLLM flavor): the vLLM backend's contract does not report prefix-cache hits, so
usage's cached_tokens is unknown there. Our implementation (deploy/triton/backends/vllm) adds a
``num_cached_tokens`` output (asked for with ``return_num_cached_tokens``); it is requested only
where the model's config declares it, so a stock vLLM-backend model is sent the contract alone.

Refusals: the vLLM backend answers a request vLLM refuses in-band ("Error generating stream: top_p
must be in (0, 1], got 0.0. (parameter=top_p, value=0.0)"); the field it names becomes the 400's
``param``.
"""

from __future__ import annotations

import asyncio
import codecs
import dataclasses
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

import grpc
import numpy as np
from llama_cpp import Llama
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import np_to_triton_dtype

from modelplex.v1 import catalog_pb2, text_pb2
from modelplex_kit.kserve_v2 import stream_end, upstream_error
from modelplex_kit.pools.picker import PickRequest
from modelplex_kit.pools.triton import TritonPool
from modelplex_text import gguf
from modelplex_text.choices import ChoiceEnd, ChoicePiece, ChoiceText, completion_budget, refuse_suffix, stream_choices
from modelplex_text.engine import EngineEvent
from modelplex_text.prompting import OutputConstraint, plan_prompt
from modelplex_text.sampling import SamplingParams
from modelplex_text.settings import TritonSettings

log = logging.getLogger(__name__)


#: Inputs for one choice; its SamplingParams always carry max_tokens (Triton has no "until the context ends").
InputBuilder = Callable[[str, SamplingParams, OutputConstraint | None], list[InferInput]]


def _tensor(name: str, values: list, dtype: Any) -> InferInput:
    array = np.array(values, dtype=dtype)
    tensor = InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    tensor.set_data_from_numpy(array)
    return tensor


def _structured_outputs(constraint: OutputConstraint | None) -> dict[str, Any] | None:
    if constraint is None or constraint.kind == "tool_call_or_text":
        # vLLM has no "prose or tagged call" guide short of structural tags;
        # like vLLM's own server with tool_choice=auto, the model decides freely.
        return None
    if constraint.kind == "json_object":
        return {"json_object": True}
    return {"json": constraint.schema}


def vllm_inputs(prompt: str, params: SamplingParams, constraint: OutputConstraint | None) -> list[InferInput]:
    """Inputs of Triton's vLLM backend (max_batch_size 0: no batch dimension)."""
    # Our field names are vLLM's SamplingParams'; an absent one takes vLLM's default.
    sampling = {key: value for key, value in dataclasses.asdict(params).items() if value is not None}
    sampling["stop"] = list(params.stop)
    guide = _structured_outputs(constraint)
    if guide is not None:
        sampling["structured_outputs"] = json.dumps(guide)  # the backend json.loads this string again
    inputs = [
        _tensor("text_input", [prompt.encode()], np.object_),
        _tensor("stream", [True], np.bool_),
        _tensor("sampling_parameters", [json.dumps(sampling).encode()], np.object_),
        _tensor("exclude_input_in_output", [True], np.bool_),
    ]
    if params.logprobs is not None:
        inputs.append(_tensor("return_logprobs", [True], np.bool_))
    return inputs


def vllm_logprobs(raw: bytes, top: int) -> list[text_pb2.TokenLogprob]:
    """The vLLM backend's ``logprobs`` output of one response: one entry per token it carries.

    Each position maps token ids to ``{logprob, rank, decoded_token}``: the sampled
    token first, then the ``top`` most likely (the sampled one among them when it
    ranks there). Ids are not kept: OpenAI's logprobs name tokens by text and bytes.
    """
    positions = json.loads(raw) or []  # the backend sends "null" when vLLM kept none
    scored = []
    for position in positions:
        entries = list(position.values())
        if not entries:
            continue
        ranked = sorted((e for e in entries if (e.get("rank") or top + 1) <= top), key=lambda e: e["rank"])
        scored.append(_vllm_scored(text_pb2.TokenLogprob, entries[0]))
        scored[-1].top_logprobs.extend(_vllm_scored(text_pb2.TopLogprob, e) for e in ranked)
    return scored


def _vllm_scored(kind, entry: dict[str, Any]):
    token = entry.get("decoded_token") or ""
    # OpenAI's stand-in for "very unlikely"; vLLM may send -inf (JSON -Infinity) for a masked token.
    logprob = max(float(entry.get("logprob") if entry.get("logprob") is not None else -9999.0), -9999.0)
    return kind(token=token, logprob=logprob, token_bytes=token.encode())


def trtllm_inputs(prompt: str, params: SamplingParams, constraint: OutputConstraint | None) -> list[InferInput]:
    """Inputs of the TRT-LLM ensemble/BLS model; it batches, so every tensor has a batch dimension of 1.

    The constraint is not sent: guided decoding needs inputs and a server-side
    xgrammar setup that stock ensembles lack; the prompt still asks for the format.
    """
    inputs = [
        _tensor("text_input", [[prompt.encode()]], np.object_),
        _tensor("max_tokens", [[params.max_tokens]], np.int32),
        _tensor("stream", [[True]], np.bool_),
        _tensor("temperature", [[params.temperature]], np.float32),
        _tensor("top_p", [[params.top_p]], np.float32),
    ]
    if params.presence_penalty:
        inputs.append(_tensor("presence_penalty", [[params.presence_penalty]], np.float32))
    if params.frequency_penalty:
        inputs.append(_tensor("frequency_penalty", [[params.frequency_penalty]], np.float32))
    if params.stop:
        inputs.append(_tensor("stop_words", [[stop.encode() for stop in params.stop]], np.object_))
    if params.seed is not None:
        inputs.append(_tensor("random_seed", [[params.seed % 2**64]], np.uint64))  # OpenAI seeds may be negative
    return inputs


_INPUTS: dict[str, InputBuilder] = {"vllm": vllm_inputs, "trtllm": trtllm_inputs}


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _logprobs_of(result, top: int | None) -> list[text_pb2.TokenLogprob]:
    if top is None:
        return []
    output = result.as_numpy("logprobs")
    return [lp for raw in (output.ravel() if output is not None else ()) for lp in vllm_logprobs(raw, top)]


# vLLM names the field it refuses: "top_p must be in (0, 1], got 0.0. (parameter=top_p, value=0.0)".
_REFUSED_FIELD = re.compile(r"\(parameter=(\w+)")
# Our SamplingParams fields are vLLM's; each refused one as the OpenAI request names it.
_OPENAI_PARAM = {field.name: field.name for field in dataclasses.fields(SamplingParams)} | {"logprobs": "top_logprobs"}


def refused_param(error: Exception) -> str | None:
    """The request parameter an in-band refusal of the vLLM backend names, if it is one we sent."""
    found = _REFUSED_FIELD.search(str(error))
    return _OPENAI_PARAM.get(found.group(1)) if found else None


@dataclasses.dataclass
class _StreamFacts:
    """What one choice's stream reported besides text: the prompt tokens served from the prefix cache."""

    cached_prompt_tokens: int | None = None


def _cached_tokens(result) -> int | None:
    output = result.as_numpy("num_cached_tokens")
    return None if output is None else int(output.ravel()[0])


def _is_final(result) -> bool:
    parameters = result.get_response().parameters
    return "triton_final_response" in parameters and parameters["triton_final_response"].bool_param


class TritonEngine:
    def __init__(self, settings: TritonSettings) -> None:
        if not settings.upstream_url or not settings.upstream_model:
            raise ValueError(
                "engine=triton needs MODELPLEX_TEXT_UPSTREAM_URL (host:port) and MODELPLEX_TEXT_UPSTREAM_MODEL"
            )
        path = gguf.model_path(settings.tokenizer_path)
        self._tokenizer = Llama(model_path=path, vocab_only=True, verbose=False)
        self._template = gguf.chat_template(self._tokenizer)
        # Triton's side tokenizes the text prompt and adds BOS when the model wants one (what
        # tokenizer.ggml.add_bos_token records); a BOS rendered by the chat template would be doubled.
        adds_bos = self._tokenizer.metadata.get("tokenizer.ggml.add_bos_token") == "true"
        self._bos = self._template.bos_token if adds_bos else ""
        self._url, self._model = settings.upstream_url, settings.upstream_model
        self._build_inputs = _INPUTS[settings.triton_flavor]
        self._timeout = settings.upstream_timeout_seconds  # a deadline per choice's stream, not a silence limit
        self._max_seconds = settings.max_request_seconds
        # Triton has no max_tokens "until the context is full"; this is the model's context length.
        self._context_length = settings.context_length
        self._defaults = (settings.default_temperature, settings.default_top_p)
        self._flavor = settings.triton_flavor
        # Whether the model declares num_cached_tokens (our vLLM backend's extension); None: not yet asked.
        self._reports_cached: bool | None = None
        self._pool = TritonPool("text", settings, self._model)
        self.capabilities = catalog_pb2.TextCapabilities(
            chat=True,
            completions=True,
            tool_use=True,
            multiple_choices=True,
            json_schema=settings.triton_flavor == "vllm",  # only there is guided decoding sent
            logprobs=settings.triton_flavor == "vllm",  # only that backend returns them
        )
        log.info("triton engine ready", extra={"url": self._url, "model": self._model, "tokenizer": path})

    async def ready(self) -> bool:
        return await self._pool.ready()

    async def close(self) -> None:
        await self._pool.close()

    def _count(self, text: str) -> int:
        return len(self._tokenizer.tokenize(text.encode(), add_bos=False, special=True)) if text else 0

    def _params(self, request: text_pb2.GenerateRequest, prompt_tokens: int) -> SamplingParams:
        # Both backends need a number (vLLM's default is 16): what the context leaves, or a 400 beyond it.
        budget = completion_budget(request, prompt_tokens, self._context_length)
        return dataclasses.replace(SamplingParams.from_request(request, *self._defaults), max_tokens=budget)

    async def stream(
        self, request: text_pb2.GenerateRequest, *, incremental: bool = True
    ) -> AsyncIterator[EngineEvent]:
        refuse_suffix(request)
        plan = plan_prompt(request, self._template)
        prompt = plan.prompt.removeprefix(self._bos)
        prompt_tokens = self._count(prompt) + bool(self._bos)
        params = self._params(request, prompt_tokens)
        # The rendered prompt itself: the engine's prefix cache holds exactly its blocks.
        pick = PickRequest(prompt=prompt, session=request.prompt_cache_key or request.user)

        def generate(index: int, seed: int | None, deadline: float | None) -> AsyncIterator[ChoicePiece]:
            return self._choice(prompt, plan.constraint, dataclasses.replace(params, seed=seed), deadline, pick)

        choices = stream_choices(
            request,
            generate,
            prompt_tokens=prompt_tokens,
            tool_call_forced=plan.tool_call_forced,
            max_seconds=self._max_seconds,
        )
        async with aclosing(choices) as events:
            async for event in events:
                yield event

    async def _choice(
        self,
        prompt: str,
        constraint: OutputConstraint | None,
        params: SamplingParams,
        deadline: float | None,
        pick: PickRequest,
    ) -> AsyncIterator[ChoicePiece]:
        """One choice: Triton's text deltas, then how it ended (tokens counted with the model's tokenizer)."""
        generated: list[str] = []
        timed_out = False
        facts = _StreamFacts()

        def on(client: InferenceServerClient) -> AsyncIterator[ChoiceText]:
            return self._generate(client, prompt, constraint, params, facts)

        async with aclosing(self._pool.stream(on, pick=pick)) as pieces:
            while True:
                try:
                    # Bounded per wait, not by a timeout around the yields: that would cancel our consumer.
                    piece = await asyncio.wait_for(anext(pieces), _remaining(deadline))
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    timed_out = True  # the stream was cancelled, which aborts the request in Triton
                    break
                generated.append(piece.text)
                yield piece
        completion_tokens = self._count("".join(generated))
        ran_out = timed_out or completion_tokens >= params.max_tokens
        yield ChoiceEnd("length" if ran_out else "stop", completion_tokens, facts.cached_prompt_tokens, timed_out)

    async def _reports_cached_tokens(self, client: InferenceServerClient) -> bool:
        """Whether the model declares the num_cached_tokens output (asked once; a failure asks again later)."""
        if self._reports_cached is None and self._flavor == "vllm":
            try:
                config = await client.get_model_config(self._model, as_json=True)
            except Exception:  # not served (yet): the request itself will say so
                return False
            outputs = config.get("config", {}).get("output", [])
            self._reports_cached = any(output.get("name") == "num_cached_tokens" for output in outputs)
        return bool(self._reports_cached)

    async def _generate(
        self,
        client: InferenceServerClient,
        prompt: str,
        constraint: OutputConstraint | None,
        params: SamplingParams,
        facts: _StreamFacts,
    ) -> AsyncIterator[ChoiceText]:
        """Streams one choice's text deltas (with their tokens' logprobs, when asked) from one Triton stream."""
        inputs = self._build_inputs(prompt, params, constraint)
        outputs = [InferRequestedOutput("text_output")]
        if params.logprobs is not None:
            outputs.append(InferRequestedOutput("logprobs"))
        if await self._reports_cached_tokens(client):
            inputs.append(_tensor("return_num_cached_tokens", [True], np.bool_))
            outputs.append(InferRequestedOutput("num_cached_tokens"))
        request = {"model_name": self._model, "inputs": inputs, "outputs": outputs, "request_id": uuid.uuid4().hex}

        async def one_request() -> AsyncIterator[dict[str, Any]]:
            yield request  # then half-close: Triton ends the stream after the last response

        # Deltas may split a multi-byte character (TRT-LLM detokenizes per token).
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        responses = client.stream_infer(inputs_iterator=one_request(), stream_timeout=self._timeout)
        try:
            async for result, error in responses:
                if error is not None:  # in-band, and final: the request is over
                    await stream_end(responses)
                    raise upstream_error(error, self._model, refused_param(error))
                output = result.as_numpy("text_output")
                text = decoder.decode(b"".join(output.ravel())) if output is not None else ""
                scored = _logprobs_of(result, params.logprobs)
                if (cached := _cached_tokens(result)) is not None:
                    facts.cached_prompt_tokens = cached
                if text or scored:
                    yield ChoiceText(text, tuple(scored))
                if _is_final(result):  # may come with the last delta (vLLM) or empty (TRT-LLM)
                    await stream_end(responses)
                    break
        except grpc.aio.AioRpcError as exc:
            raise upstream_error(exc, self._model) from exc
        finally:
            # A no-op once the stream ended; when the consumer left early (or the stream did not end
            # in time), this is what makes Triton abort the request.
            responses.cancel()
        if tail := decoder.decode(b"", final=True):
            yield ChoiceText(tail)
