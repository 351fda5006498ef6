"""The embedded engine: llama.cpp in-process via llama-cpp-python.

One llama.cpp context serves one sequence at a time, so generations take a
lock inside the worker thread; requests queue for it. The thread checks a stop
flag between tokens, which is how a disconnected client aborts generation.
Tools and JSON output are enforced token by token with llguidance (see
``modelplex_text.constraints``), so even a 135M model returns parseable tool
calls and schema-valid JSON, and a hostile schema is a 400, not a crash.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from llama_cpp import Llama, LogitsProcessorList, StoppingCriteriaList

from modelplex.v1 import catalog_pb2, common_pb2, text_pb2
from modelplex_kit.errors import ServiceError, unavailable, unsupported
from modelplex_text import gguf
from modelplex_text.assembler import ChoiceAssembler
from modelplex_text.constraints import CompiledConstraint, ConstraintCompiler, LogitsMask
from modelplex_text.engine import EngineEvent
from modelplex_text.prompting import PromptPlan, plan_prompt
from modelplex_text.sampling import sampling_kwargs
from modelplex_text.settings import TextSettings

log = logging.getLogger(__name__)


class _SampleCounter:
    """A llama.cpp stopping criterion, called once per sampled token.

    It counts completion tokens exactly and is how an abort takes effect
    between two tokens, even while llama.cpp holds text back (stop strings).
    """

    def __init__(self, stop: threading.Event) -> None:
        self.count = 0
        self._stop = stop

    def __call__(self, input_ids, logits) -> bool:
        self.count += 1
        return self._stop.is_set()

    def completion_tokens(self, finish_reason: str | None) -> int:
        # create_completion asks the criteria once more after its loop, and the
        # end-of-generation token is sampled but not part of the completion (a
        # stop string ends on a real token, so there the count is one short).
        return max(0, self.count - 1 - (finish_reason == "stop"))


def _constrained(constraint: CompiledConstraint) -> dict[str, Any]:
    """create_completion arguments enforcing ``constraint`` on one choice (a matcher of its own)."""
    mask = LogitsMask(constraint.matcher())
    return {"logits_processor": LogitsProcessorList([mask]), "stopping_criteria": [mask.stop_on_error]}


class LlamaCppEngine:
    capabilities = catalog_pb2.TextCapabilities(
        chat=True, completions=True, tool_use=True, json_schema=True, prompt_caching=True, multiple_choices=True
    )

    def __init__(self, settings: TextSettings) -> None:
        path = gguf.model_path(settings.model_path)
        self._llm = Llama(
            model_path=path, n_ctx=settings.context_length, n_threads=settings.threads or None, verbose=False
        )
        self._template = gguf.chat_template(self._llm)
        self._constraints = ConstraintCompiler.for_llama(self._llm)
        self._context_length = settings.context_length
        self._defaults = (settings.default_temperature, settings.default_top_p)
        self._lock = threading.Lock()
        self._max_queue = settings.max_queue
        self._queued = 0
        self._executor = ThreadPoolExecutor(max_workers=settings.max_queue, thread_name_prefix="llamacpp")
        log.info("llama.cpp engine ready", extra={"model_path": path, "n_ctx": settings.context_length})

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def stream(
        self, request: text_pb2.GenerateRequest, *, incremental: bool = True
    ) -> AsyncIterator[EngineEvent]:
        # Templating, tokenizing and compiling a constraint take milliseconds for long prompts:
        # off the event loop, so other streams' tokens keep flowing meanwhile.
        plan, tokens, constraint = await asyncio.to_thread(self._prepare, request)
        # repeat_penalty 1.0: OpenAI has no such knob, so llama.cpp must not apply one either.
        kwargs = {**sampling_kwargs(request, *self._defaults), "repeat_penalty": 1.0}
        seed = request.sampling.seed if request.sampling.HasField("seed") else None
        usage = common_pb2.Usage(prompt_tokens=len(tokens))
        for index in range(max(1, request.n)):
            assembler = ChoiceAssembler(index, plan.tool_call_forced)
            if request.completion.echo:
                yield text_pb2.ChoiceDelta(index=index, text=request.completion.prompt)
            choice_seed = None if seed is None else seed + index
            constrained = _constrained(constraint) if constraint else {}
            async for kind, *payload in self._generate(tokens, {**kwargs, "seed": choice_seed, **constrained}):
                if kind == "cached":
                    if index == 0:
                        usage.cached_prompt_tokens = payload[0]
                        usage.cache_creation_prompt_tokens = len(tokens) - payload[0]
                elif kind == "text":
                    delta = assembler.feed(payload[0])
                    if delta is not None:
                        yield delta
                else:  # "end"
                    usage.completion_tokens += payload[1]
                    for delta in assembler.finish(payload[0]):
                        yield delta
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
        yield usage

    def _prepare(self, request: text_pb2.GenerateRequest) -> tuple[PromptPlan, list[int], CompiledConstraint | None]:
        if request.completion.suffix:
            raise unsupported("suffix", "`suffix`")
        plan = plan_prompt(request, self._template)
        tokens = self._tokens(request, plan.prompt)
        if len(tokens) >= self._context_length:
            raise ServiceError(
                grpc.StatusCode.OUT_OF_RANGE,
                f"This model's maximum context length is {self._context_length} tokens; "
                f"your prompt has {len(tokens)} tokens.",
                param="messages" if request.WhichOneof("input") == "chat" else "prompt",
                code="context_length_exceeded",
            )
        return plan, tokens, self._constraints.compile(plan.constraint) if plan.constraint else None

    def _tokens(self, request: text_pb2.GenerateRequest, prompt: str) -> list[int]:
        if request.WhichOneof("input") == "chat":  # the template wrote the special tokens itself
            return self._llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
        # A raw prompt is user text: "<|im_start|>" in it must stay text, not become a control
        # token; BOS is added when the model wants one.
        return self._llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=False)

    async def _generate(self, tokens: list[int], kwargs: dict[str, Any]) -> AsyncIterator[tuple]:
        """Runs one generation in a worker thread, relaying its events."""
        if self._queued >= self._max_queue:
            raise unavailable("The model is at capacity; retry shortly.")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple] = asyncio.Queue()
        stop = threading.Event()

        def emit(item: tuple) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        self._queued += 1
        try:
            # In the caller's context, so the worker's log lines carry the request id.
            work = functools.partial(contextvars.copy_context().run, self._work, tokens, kwargs, emit, stop)
            worker = loop.run_in_executor(self._executor, work)
        except RuntimeError as exc:  # the executor is shut down: the server is stopping
            self._queued -= 1
            raise unavailable("The model is shutting down; retry shortly.") from exc
        # Counted until the worker thread is done, not until the consumer leaves: an aborted
        # generation still holds the context until its next token.
        worker.add_done_callback(self._release)
        try:
            while True:
                item = await queue.get()
                if item[0] == "error":
                    raise item[1]
                yield item
                if item[0] == "end":
                    return
        finally:
            stop.set()  # no-op when finished; aborts generation when the consumer left

    def _release(self, worker: asyncio.Future) -> None:
        self._queued -= 1

    def _work(
        self, tokens: list[int], kwargs: dict[str, Any], emit: Callable[[tuple], None], stop: threading.Event
    ) -> None:
        try:
            with self._lock:
                if stop.is_set():
                    return
                emit(("cached", self._cached_prefix(tokens)))
                sampled = _SampleCounter(stop)
                reason = None
                kwargs = dict(kwargs)
                criteria = StoppingCriteriaList([sampled, *kwargs.pop("stopping_criteria", ())])
                for chunk in self._llm.create_completion(tokens, stream=True, stopping_criteria=criteria, **kwargs):
                    choice = chunk["choices"][0]
                    reason = choice["finish_reason"] or reason
                    emit(("text", choice["text"]))
                if stop.is_set():
                    log.info("generation aborted: the client went away")
                    return
                emit(("end", reason, sampled.completion_tokens(reason)))
        except Exception as exc:  # relayed to the event loop, mapped to a gRPC status there
            log.exception("llama.cpp generation failed")
            emit(
                (
                    "error",
                    exc
                    if isinstance(exc, ServiceError)
                    else ServiceError(grpc.StatusCode.INTERNAL, "llama.cpp failed"),
                )
            )

    def _cached_prefix(self, tokens: list[int]) -> int:
        """Prompt tokens llama.cpp will reuse from its KV cache (see Llama.generate)."""
        prefix = Llama.longest_token_prefix(self._llm._input_ids.tolist(), tokens)
        return min(prefix, len(tokens) - 1) if prefix else 0
