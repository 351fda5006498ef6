"""Triton's vLLM backend, as a Python-based backend: our own implementation of its published contract.

``nvcr.io/nvidia/tritonserver:<ver>-vllm-python-py3`` serves any model whose config.pbtxt says
``backend: "vllm"`` with triton-inference-server/vllm_backend. This file implements the same contract
(written from that project's documentation and behaviour, not copied) so the same model repository
runs on a tritonserver that lacks the image:

- the model folder holds ``1/model.json``: vLLM ``AsyncEngineArgs`` as JSON;
- inputs: ``text_input`` (BYTES), and optionally ``stream``, ``exclude_input_in_output`` and the
  ``return_*`` flags (BOOL), ``sampling_parameters`` (BYTES: JSON of vLLM SamplingParams fields;
  ``structured_outputs`` is itself a JSON string of vLLM's StructuredOutputsParams);
- outputs: ``text_output`` (BYTES; deltas when streaming, else the whole text), and on request
  ``finish_reason``, ``cumulative_logprob``, ``logprobs`` (JSON), ``num_input_tokens``,
  ``num_output_tokens``;
- decoupled: every request ends with a response flagged TRITONSERVER_RESPONSE_COMPLETE_FINAL, on
  every path (success, error, cancellation); Triton waits for it before a model can unload.

vLLM's AsyncLLM runs on an asyncio loop in a background thread of the stub process; ``execute``
only hands each request to that loop, so vLLM batches them itself (max_batch_size 0).
One extension, which a client uses only where the model's config declares it: with the
``return_num_cached_tokens`` input, a ``num_cached_tokens`` output (the prompt tokens vLLM's prefix
cache served), so usage can report cached tokens.
Not implemented: images, embedding requests, LoRA, the optional engine health check.
"""

from __future__ import annotations

import asyncio
import json
import locale
import math
import os
import threading
import traceback
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, TypeVar

# The stub embeds Python without its C-locale coercion: under a pod's plain C locale, open() would
# read files as ASCII, and vLLM (torch's templates, tokenizers) reads UTF-8 ones as it imports.
# Only the character type changes; it must happen before vllm is imported.
if locale.getpreferredencoding(False).lower() not in ("utf-8", "utf8"):
    locale.setlocale(locale.LC_CTYPE, "C.UTF-8")

import numpy as np
import triton_python_backend_utils as pb_utils
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.exceptions import VLLMClientError
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams
from vllm.usage.usage_lib import UsageContext
from vllm.v1.engine.async_llm import AsyncLLM

ENGINE_ARGS_FILE = "model.json"
# How long an unload waits for the requests in flight before aborting them.
FINALIZE_GRACE_S = 10.0
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
T = TypeVar("T")

# The contract's tensors; auto_complete_config adds whichever a config.pbtxt leaves out.
FLAGS = (
    "return_finish_reason",
    "return_cumulative_logprob",
    "return_logprobs",
    "return_num_input_tokens",
    "return_num_output_tokens",
    "return_num_cached_tokens",  # our extension (see the module's docstring)
)
INPUTS = [
    {"name": "text_input", "data_type": "TYPE_STRING", "dims": [1]},
    {"name": "stream", "data_type": "TYPE_BOOL", "dims": [1], "optional": True},
    {"name": "sampling_parameters", "data_type": "TYPE_STRING", "dims": [1], "optional": True},
    {"name": "exclude_input_in_output", "data_type": "TYPE_BOOL", "dims": [1], "optional": True},
    *({"name": flag, "data_type": "TYPE_BOOL", "dims": [1], "optional": True} for flag in FLAGS),
]
OUTPUTS = [
    {"name": "text_output", "data_type": "TYPE_STRING", "dims": [-1]},
    {"name": "finish_reason", "data_type": "TYPE_STRING", "dims": [-1]},
    {"name": "cumulative_logprob", "data_type": "TYPE_FP32", "dims": [-1]},
    {"name": "logprobs", "data_type": "TYPE_STRING", "dims": [-1]},
    {"name": "num_input_tokens", "data_type": "TYPE_UINT32", "dims": [1]},
    {"name": "num_output_tokens", "data_type": "TYPE_UINT32", "dims": [-1]},
    {"name": "num_cached_tokens", "data_type": "TYPE_UINT32", "dims": [1]},
]
# The gauge this backend keeps on Triton's metrics port (see _InFlightGauge).
IN_FLIGHT_METRIC = "vllm:num_requests_unfinished"


class BadRequest(ValueError):
    """The request itself is wrong: answered INVALID_ARG."""


# -- reading a request ---------------------------------------------------------------------------
@dataclass(frozen=True)
class GenerateRequest:
    """One Triton request, decoded."""

    prompt: str
    stream: bool
    prepend_input: bool  # the prompt goes before the generated text (non-streaming only)
    sampling: SamplingParams
    wanted: frozenset[str]  # the return_* flags that are set


def _input(request, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _flag(request, name: str) -> bool | None:
    value = _input(request, name)
    return None if value is None else bool(value.reshape(-1)[0])


def read_request(request) -> GenerateRequest:
    prompt = _input(request, "text_input").reshape(-1)[0]
    prompt = prompt.decode("utf-8") if isinstance(prompt, bytes) else str(prompt)
    stream = bool(_flag(request, "stream"))
    exclude = _flag(request, "exclude_input_in_output")
    # Upstream's rule: the prompt is echoed unless excluded, except that streams default to excluding it.
    prepend_input = (not exclude) if exclude is not None else not stream
    if prepend_input and stream:
        raise BadRequest("When streaming, `exclude_input_in_output` = False is not allowed.")
    raw = _input(request, "sampling_parameters")
    # Without the tensor, the request's own parameters carry them (what BLS callers can send).
    text = raw.reshape(-1)[0].decode("utf-8") if raw is not None else request.parameters()
    sampling = sampling_params(text, stream)
    wanted = frozenset(flag for flag in FLAGS if _flag(request, flag))
    return GenerateRequest(prompt, stream, prepend_input, sampling, wanted)


# Clients often send numbers as strings ({"temperature": "0.1"}, as upstream's samples do).
_SCALARS: dict[Any, Callable[[Any], Any]] = {int: int, float: float, str: str, int | None: int, float | None: float}


def _coerced(name: str, value: Any) -> Any:
    annotation = SamplingParams.__annotations__.get(name)
    if annotation is bool and isinstance(value, str):
        return value.strip().lower() == "true"
    if annotation in _SCALARS and value is not None:
        return _SCALARS[annotation](value)
    return value


def _structured_outputs(value: Any) -> StructuredOutputsParams:
    # A JSON string inside the JSON (the contract's form); an object is taken as well.
    spec = json.loads(value) if isinstance(value, str) else value
    if not isinstance(spec, dict):
        raise BadRequest("structured_outputs must be a JSON object of StructuredOutputsParams fields")
    return StructuredOutputsParams(**spec)


def sampling_params(text: str, stream: bool) -> SamplingParams:
    """vLLM SamplingParams from the request's JSON; anything vLLM refuses is the client's error."""
    try:
        fields = json.loads(text or "{}")
    except json.JSONDecodeError as exc:
        raise BadRequest(f"sampling_parameters is not valid JSON: {exc}") from exc
    if not isinstance(fields, dict):
        raise BadRequest("sampling_parameters must be a JSON object")
    if fields.pop("lora_name", None) is not None:
        raise BadRequest("LoRA feature is not enabled.")
    # Releases before vLLM 0.11 called it guided_decoding; both reach StructuredOutputsParams.
    for key in ("structured_outputs", "guided_decoding"):
        if key in fields:
            fields["structured_outputs"] = _structured_outputs(fields.pop(key))
    try:
        fields = {name: _coerced(name, value) for name, value in fields.items()}
        # Streams get every new piece; otherwise vLLM keeps the outputs to itself until the end.
        fields["output_kind"] = RequestOutputKind.CUMULATIVE if stream else RequestOutputKind.FINAL_ONLY
        return SamplingParams(**fields)
    except (TypeError, ValueError) as exc:  # unknown fields, wrong types, vLLM's validation
        raise BadRequest(str(exc)) from exc


# -- writing responses ---------------------------------------------------------------------------
@dataclass
class _Sent:
    """How much of one completion (one of n) earlier responses carried: each response sends what is new."""

    chars: int = 0
    logprobs: int = 0
    tokens: int = 0


@dataclass
class ResponseWriter:
    """Builds the responses of one request from vLLM's cumulative outputs."""

    request: GenerateRequest
    text_dtype: Any
    sent: dict[int, _Sent] = field(default_factory=dict)
    latest: dict[int, CompletionOutput] = field(default_factory=dict)

    def response(self, output: RequestOutput) -> pb_utils.InferenceResponse:
        # With n > 1, vLLM may report only the completions that moved: keep each one's latest.
        for completion in output.outputs:
            self.latest[completion.index] = completion
        completions = [self.latest[i] for i in sorted(self.latest)]
        sent = [self.sent.setdefault(c.index, _Sent()) for c in completions]
        tensors = [self._text(output, completions, sent)]
        tensors += self._extras(output, completions, sent)
        for completion, progress in zip(completions, sent, strict=True):
            progress.chars, progress.tokens = len(completion.text), len(completion.token_ids)
            progress.logprobs = len(completion.logprobs or ())
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def _text(self, output: RequestOutput, completions: list[CompletionOutput], sent: list[_Sent]):
        prefix = (output.prompt or "") if self.request.prepend_input else ""
        texts = [(prefix + c.text[s.chars :]).encode("utf-8") for c, s in zip(completions, sent, strict=True)]
        return pb_utils.Tensor("text_output", np.asarray(texts, dtype=self.text_dtype))

    def _extras(self, output: RequestOutput, completions: list[CompletionOutput], sent: list[_Sent]) -> list:
        wanted, tensors = self.request.wanted, []
        if "return_finish_reason" in wanted:
            # str(None) == "None" until a completion finishes, as upstream sends it.
            reasons = [str(c.finish_reason) for c in completions]
            tensors.append(pb_utils.Tensor("finish_reason", np.asarray(reasons, dtype=np.object_)))
        if "return_cumulative_logprob" in wanted:
            values = [math.nan if c.cumulative_logprob is None else c.cumulative_logprob for c in completions]
            tensors.append(pb_utils.Tensor("cumulative_logprob", np.asarray(values, dtype=np.float32)))
        if "return_logprobs" in wanted:
            positions = [_logprobs_json(c, s.logprobs) for c, s in zip(completions, sent, strict=True)]
            tensors.append(pb_utils.Tensor("logprobs", np.asarray(positions, dtype=np.object_)))
        if "return_num_input_tokens" in wanted:
            count = len(output.prompt_token_ids or ())
            tensors.append(pb_utils.Tensor("num_input_tokens", np.asarray([count], dtype=np.uint32)))
        if "return_num_output_tokens" in wanted:
            new = [len(c.token_ids) - s.tokens for c, s in zip(completions, sent, strict=True)]
            tensors.append(pb_utils.Tensor("num_output_tokens", np.asarray(new, dtype=np.uint32)))
        if "return_num_cached_tokens" in wanted:
            cached = output.num_cached_tokens or 0
            tensors.append(pb_utils.Tensor("num_cached_tokens", np.asarray([cached], dtype=np.uint32)))
        return tensors


def _logprobs_json(completion: CompletionOutput, already_sent: int) -> bytes:
    """The new positions: per token ``{token_id: {logprob, rank, decoded_token}}``, the sampled one first."""
    if completion.logprobs is None:
        return b"null"  # the sampling parameters asked for none
    positions = [
        {
            str(token_id): {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": lp.decoded_token}
            for token_id, lp in position.items()
        }
        for position in list(completion.logprobs)[already_sent:]
    ]
    return json.dumps(positions).encode("utf-8")


def error_response(message: str, code: int | None = None) -> pb_utils.InferenceResponse:
    error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)


# -- the engine and its loop -----------------------------------------------------------------------
class EngineThread:
    """vLLM's AsyncLLM on its own asyncio loop, in a background thread of the stub process."""

    def __init__(self, engine_args: AsyncEngineArgs) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="vllm-engine", daemon=True)
        self._thread.start()
        try:
            # Made on the loop: AsyncLLM starts its output handler task on the running loop.
            self.engine: AsyncLLM = self.run(self._start(engine_args))
        except BaseException:
            self._stop_loop()
            raise

    @staticmethod
    async def _start(engine_args: AsyncEngineArgs) -> AsyncLLM:
        return AsyncLLM.from_engine_args(engine_args, usage_context=UsageContext.OPENAI_API_SERVER)

    def run(self, coroutine: Awaitable[T]) -> T:
        """Runs ``coroutine`` on the loop and waits for its result (from any other thread)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def submit(self, coroutine: Awaitable[Any]) -> Future:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def shutdown(self) -> None:
        self.engine.shutdown()
        self._stop_loop()

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class _InFlightGauge:
    """vLLM's count of unfinished requests (queued or running) on Triton's metrics port.

    Refreshed when vLLM first reports on a request and whenever one ends (finished, failed or aborted), so it
    reads 0 once every request, a cancelled one included, has left vLLM. None if metrics are off.
    """

    def __init__(self, labels: dict[str, str]) -> None:
        try:
            family = pb_utils.MetricFamily(
                name=IN_FLIGHT_METRIC,
                description="Requests in vLLM, queued or running (vLLM's unfinished count)",
                kind=pb_utils.MetricFamily.GAUGE,
            )
            self._gauge = family.Metric(labels=labels)
            self._family = family
        except Exception as exc:  # "metrics not supported": the server runs with --allow-metrics=false
            pb_utils.Logger.log_info(f"[vllm] no custom metrics: {exc}")
            self._gauge = self._family = None

    def set(self, value: int) -> None:
        if self._gauge is not None:
            self._gauge.set(value)

    def close(self) -> None:
        # Released while the stub can still talk to Triton: freed later, at the stub's exit, they crash it.
        self._gauge = self._family = None


# -- the model ---------------------------------------------------------------------------------
class TritonPythonModel:
    @classmethod
    def auto_complete_config(cls, config):
        """Fills in the contract's tensors; vLLM batches by itself, and streams need decoupled responses."""
        declared = config.as_dict()
        have_inputs = {tensor["name"] for tensor in declared["input"]}
        have_outputs = {tensor["name"] for tensor in declared["output"]}
        for tensor in INPUTS:
            if tensor["name"] not in have_inputs:
                config.add_input(tensor)
        for tensor in OUTPUTS:
            if tensor["name"] not in have_outputs:
                config.add_output(tensor)
        config.set_model_transaction_policy({"decoupled": True})
        config.set_max_batch_size(0)
        return config

    def initialize(self, args: dict[str, str]) -> None:
        self.model_config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(self.model_config):
            raise pb_utils.TritonModelException(
                "vLLM Triton backend must be configured to use decoupled model transaction policy"
            )
        text_config = pb_utils.get_output_config_by_name(self.model_config, "text_output")
        self.text_dtype = pb_utils.triton_string_to_numpy(text_config["data_type"])
        self.engine_thread = EngineThread(AsyncEngineArgs(**self._engine_config()))
        # Every call into the stub's IPC (send, is_cancelled) goes through this one thread: they
        # block, and the engine's loop must keep stepping meanwhile.
        self.ipc = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vllm-responses")
        self.in_flight: set[Future] = set()
        self.gauge = _InFlightGauge({"model": args["model_name"], "version": args["model_version"]})

    @staticmethod
    def _engine_config() -> dict[str, Any]:
        path = os.path.join(pb_utils.get_model_dir(), ENGINE_ARGS_FILE)
        if not os.path.isfile(path):
            raise pb_utils.TritonModelException(
                f"'{ENGINE_ARGS_FILE}' containing vllm engine args must be provided in '{pb_utils.get_model_dir()}'"
            )
        with open(path) as file:
            return json.load(file)

    def execute(self, requests: list) -> None:
        # Decoupled: responses go through each request's sender, from the engine's loop.
        for request in requests:
            future = self.engine_thread.submit(self._serve(request))
            self.in_flight.add(future)
            future.add_done_callback(self.in_flight.discard)
        return None

    async def _ipc(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.ipc, lambda: call(*args, **kwargs))

    async def _serve(self, request) -> None:
        """One request, start to end; whatever happens, its sender gets a final response."""
        sender = request.get_response_sender()
        finished = False
        try:
            finished = await self._generate(read_request(request), sender)
        except (BadRequest, VLLMClientError) as exc:  # the request's fault: wrong inputs, or vLLM refused it
            refusal = error_response(f"Error generating stream: {exc}", pb_utils.TritonError.INVALID_ARG)
            finished = await self._send_final(sender, refusal)
        except asyncio.CancelledError:  # the model is unloading (see finalize)
            unloading = error_response(
                "Request was cancelled: the model is unloading", pb_utils.TritonError.UNAVAILABLE
            )
            finished = await self._send_final(sender, unloading)
            raise
        except Exception as exc:
            pb_utils.Logger.log_error(f"[vllm] Error generating stream: {traceback.format_exc()}")
            finished = await self._send_final(sender, error_response(f"Error generating stream: {exc}"))
        finally:
            if not finished:  # a failure while sending, or an output stream without an end: still close
                await self._send_final(sender, None)
            self.gauge.set(self.engine_thread.engine.get_num_unfinished_requests())

    async def _send_final(self, sender, response: pb_utils.InferenceResponse | None) -> bool:
        await self._ipc(sender.send, response, flags=FINAL)
        return True

    async def _generate(self, request: GenerateRequest, sender) -> bool:
        """Streams (or collects) vLLM's outputs into responses; True once the final one is sent."""
        request_id = uuid.uuid4().hex
        writer = ResponseWriter(request, self.text_dtype)
        outputs = self.engine_thread.engine.generate(request.prompt, request.sampling, request_id)
        last: RequestOutput | None = None
        try:
            async for output in outputs:
                if last is None:  # vLLM has it now
                    self.gauge.set(self.engine_thread.engine.get_num_unfinished_requests())
                # Checked between outputs: a client gone (stream closed, call cancelled) frees vLLM at once.
                if await self._ipc(sender.is_cancelled):
                    await self.engine_thread.engine.abort(request_id)
                    cancelled = error_response("Request was cancelled", pb_utils.TritonError.CANCELLED)
                    return await self._send_final(sender, cancelled)
                last = output
                if request.stream:
                    await self._ipc(sender.send, writer.response(output), flags=FINAL if output.finished else 0)
        finally:
            await outputs.aclose()  # aborts the request in vLLM if it is still running
        if request.stream:
            return last is not None and last.finished
        if last is None:
            raise RuntimeError("vLLM returned no output")
        return await self._send_final(sender, writer.response(last))

    def finalize(self) -> None:
        """Unload: the requests in flight get FINALIZE_GRACE_S to end, the rest are aborted; then vLLM stops."""
        pb_utils.Logger.log_info("[vllm] Issuing finalize to vllm backend")
        _, unfinished = wait(self.in_flight, timeout=FINALIZE_GRACE_S)
        for future in unfinished:
            future.cancel()  # cancels its task: vLLM aborts the request, the sender gets its final response
        wait(unfinished, timeout=FINALIZE_GRACE_S)
        self.engine_thread.shutdown()
        self.ipc.shutdown(wait=True)
        self.gauge.close()
        pb_utils.Logger.log_info("[vllm] Shutdown complete")
