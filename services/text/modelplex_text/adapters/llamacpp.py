"""The embedded engine: llama.cpp in-process via llama-cpp-python, with continuous batching.

Requests are planned and tokenized here, then each choice becomes a
:class:`Sequence` for the :class:`BatchScheduler` (``llamacpp_batch.py``), which
decodes up to ``parallel`` sequences together in one llama.cpp context and
streams each one's text back. Waiting for a free sequence slot is bounded
(``max_queue`` requests, ``max_queue_wait_seconds`` each): a request that could
not start within the wait at the observed start rate, or that finds the queue
full, gets its 503 at once (``llamacpp_queue``); one admitted while no rate was
known (a cold engine) gets it as soon as the first starts show it cannot start
in time (the scheduler refuses it); one still waiting at the bound (the rate
fell meanwhile) gets it then.
Tools and JSON output are enforced token by token with llguidance (see
``modelplex_text.constraints``), one matcher per sequence, so even a 135M model
returns parseable tool calls and schema-valid JSON, and a hostile schema is a
400, not a crash or a hang. Logprobs are scored from the very logits each token
was drawn from, after that constraint's mask (``modelplex_text.logprobs``).
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing

import grpc
from llama_cpp import Llama

from modelplex.v1 import catalog_pb2, text_pb2
from modelplex_kit.errors import ServiceError, unavailable
from modelplex_kit.priority import is_batch
from modelplex_text import gguf
from modelplex_text.adapters.llamacpp_batch import (
    BatchScheduler,
    EngineClosed,
    Failed,
    Sequence,
    SequenceEvent,
    Started,
)
from modelplex_text.adapters.llamacpp_lora import LoadedLora, LoraLibrary
from modelplex_text.adapters.llamacpp_queue import QueueBounds
from modelplex_text.choices import ChoiceEnd, ChoicePiece, ChoiceText, completion_budget, refuse_suffix, stream_choices
from modelplex_text.constraints import CompiledConstraint, ConstraintCompiler
from modelplex_text.decoding import StopText, TokenSampler
from modelplex_text.engine import EngineEvent
from modelplex_text.prompting import PromptPlan, plan_prompt
from modelplex_text.sampling import SamplingParams
from modelplex_text.settings import LlamaCppSettings

log = logging.getLogger(__name__)

# The Llama object only holds weights, tokenizer and metadata: generation runs in the
# scheduler's own context, so this one stays at a token size.
_IDLE_CONTEXT = 256


class LlamaCppEngine:
    capabilities = catalog_pb2.TextCapabilities(
        chat=True,
        completions=True,
        tool_use=True,
        json_schema=True,
        prompt_caching=True,
        logprobs=True,
        multiple_choices=True,
    )

    def __init__(self, settings: LlamaCppSettings) -> None:
        path = gguf.model_path(settings.model_path)
        self._llm = Llama(model_path=path, n_ctx=_IDLE_CONTEXT, n_threads=settings.threads or None, verbose=False)
        self._template = gguf.chat_template(self._llm)
        self._context_length = settings.context_length
        self._defaults = (settings.default_temperature, settings.default_top_p)
        self._max_seconds = settings.max_request_seconds
        self._queue = QueueBounds(settings.max_queue, settings.max_queue_wait_seconds)
        # Keeps self._llm alive: llguidance's tokenizer reads llama.cpp's vocabulary through it.
        self._constraints = ConstraintCompiler.for_llama(self._llm)
        self.loras = LoraLibrary(self._llm.model, max_loras=settings.max_loras, max_rank=settings.max_lora_rank)
        self._scheduler = BatchScheduler(
            self._llm.model,
            self._llm.context_params,
            parallel=settings.parallel,
            kv_tokens=max(settings.kv_cache_tokens, settings.context_length),
            context_length=settings.context_length,
            bounds=self._queue,
            loras=self.loras,
        )
        log.info(
            "llama.cpp engine ready",
            extra={"model_path": path, "n_ctx": settings.context_length, "parallel": settings.parallel},
        )

    async def close(self) -> None:
        await asyncio.to_thread(self._scheduler.close)

    async def stream(
        self, request: text_pb2.GenerateRequest, *, incremental: bool = True
    ) -> AsyncIterator[EngineEvent]:
        refuse_suffix(request)
        # Templating, tokenizing and compiling a grammar take milliseconds for long prompts:
        # off the event loop, so other streams' tokens keep flowing meanwhile.
        plan, tokens, compiled = await asyncio.to_thread(self._prepare, request)
        lora = await self._lora(request.adapter) if request.HasField("adapter") else None
        try:
            async with aclosing(self._generate(request, plan, tokens, compiled, lora)) as events:
                async for event in events:
                    yield event
        finally:
            if lora is not None:
                self.loras.release(lora)

    async def _generate(
        self,
        request: text_pb2.GenerateRequest,
        plan: PromptPlan,
        tokens: list[int],
        compiled: CompiledConstraint | None,
        lora: LoadedLora | None,
    ) -> AsyncIterator[EngineEvent]:
        budget = completion_budget(request, len(tokens), self._context_length)
        first = compiled.matcher() if compiled else None
        sampling = SamplingParams.from_request(request, *self._defaults)

        async def generate(index: int, seed: int | None, deadline: float | None) -> AsyncIterator[ChoicePiece]:
            nonlocal first
            matcher, first = first, None
            if matcher is None and compiled:
                matcher = compiled.matcher()
            queue: asyncio.Queue[SequenceEvent] = asyncio.Queue()
            seq = Sequence(
                tokens=list(tokens),
                max_new=budget,
                sampler=TokenSampler(dataclasses.replace(sampling, seed=seed)),
                stop_text=StopText(list(sampling.stop)),
                matcher=matcher,
                deadline=deadline,
                emit=_emitter(queue),
                context=contextvars.copy_context().run,  # the thread's log lines carry the request id
                top_logprobs=sampling.logprobs,
                batch=is_batch(),
                lora=lora,
            )
            async with aclosing(self._run(seq, queue)) as pieces:
                async for piece in pieces:
                    yield piece

        choices = stream_choices(
            request,
            generate,
            prompt_tokens=len(tokens),
            tool_call_forced=plan.tool_call_forced,
            max_seconds=self._max_seconds,
        )
        try:
            async with aclosing(choices) as events:
                async for event in events:
                    yield event
        finally:
            if first is not None:  # never handed to a sequence
                first.close()

    async def _lora(self, adapter: text_pb2.LoraAdapter) -> LoadedLora:
        """The adapter, held for this request (loading it reads a file: off the event loop). A request
        cancelled meanwhile releases what the load returns, so no adapter stays held by nobody."""
        loading = asyncio.get_running_loop().run_in_executor(None, self.loras.acquire, adapter)
        try:
            return await asyncio.shield(loading)
        except asyncio.CancelledError:
            loading.add_done_callback(lambda done: done.exception() is None and self.loras.release(done.result()))
            raise

    def _prepare(self, request: text_pb2.GenerateRequest) -> tuple[PromptPlan, list[int], CompiledConstraint | None]:
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
        # Compiled now (cached per schema), so a schema beyond the limits is a 400 before any event.
        compiled = self._constraints.compile(plan.constraint) if plan.constraint else None
        return plan, tokens, compiled

    def _tokens(self, request: text_pb2.GenerateRequest, prompt: str) -> list[int]:
        if request.WhichOneof("input") == "chat":  # the template wrote the special tokens itself
            return self._llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
        # A raw prompt is user text: "<|im_start|>" in it must stay text, not become a control
        # token; BOS is added when the model wants one.
        tokens = self._llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=False)
        # An empty prompt is valid (OpenAI's model starts from its document-start token); a model that
        # adds no BOS would have nothing to evaluate, so it starts from its BOS or, lacking one, its EOS.
        return tokens or [self._llm.token_bos() if self._llm.token_bos() >= 0 else self._llm.token_eos()]

    async def _run(self, seq: Sequence, queue: asyncio.Queue[SequenceEvent]) -> AsyncIterator[ChoicePiece]:
        """Queues one sequence for the scheduler and relays its events until it ends."""
        at = self._scheduler.position(batch=seq.batch)
        refusal = self._queue.refusal(at, self._scheduler.start_rate.per_second)
        if refusal is not None:  # full, or it could not start within the wait: 503 now rather than after it
            if seq.matcher is not None:
                seq.matcher.close()
            raise refusal
        self._scheduler.submit(seq)
        try:
            try:
                started = await asyncio.wait_for(queue.get(), self._queue.max_wait)
            except TimeoutError:
                # Rare: the start rate fell after it was admitted and no start since showed it, no rate was known
                # within its wait (a cold engine whose slots did not turn over in time), interactive work that came
                # later went ahead of this batch sequence, or one behind it could still start in time (the
                # scheduler refuses only the back of a line).
                log.warning(
                    "request waited too long for a sequence slot",
                    extra={"waited_s": self._queue.max_wait, "ahead_at_submit": at.ahead},
                )
                raise unavailable("The model is busy; retry shortly.") from None
            # A Failed here may be the scheduler's 503: the first starts showed it could not start in time.
            _raise_if_failed(started)  # otherwise a Started: the sequence has a slot
            while True:
                event = _raise_if_failed(await queue.get())
                if isinstance(event, ChoiceText | ChoiceEnd):  # (Started comes once, even if preempted)
                    yield event
                if isinstance(event, ChoiceEnd):
                    return
        finally:
            # No-op when finished; otherwise (the consumer left, the wait timed out) the scheduler
            # drops the sequence before its next step, leaving the others running.
            seq.abort.set()


def _emitter(queue: asyncio.Queue):
    loop = asyncio.get_running_loop()

    def emit(event: SequenceEvent) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server has stopped, no one is listening
            pass

    return emit


def _raise_if_failed(event: SequenceEvent) -> Started | ChoicePiece:
    """The event, unless it reports a failure: then raises the ServiceError the client should see."""
    if not isinstance(event, Failed):
        return event
    error = event.error
    if isinstance(error, ServiceError):
        raise error
    if isinstance(error, EngineClosed):
        raise unavailable("The model is shutting down; retry shortly.")
    raise ServiceError(grpc.StatusCode.INTERNAL, "llama.cpp failed")
