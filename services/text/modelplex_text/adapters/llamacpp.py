"""The embedded engine: llama.cpp in-process via llama-cpp-python, with continuous batching.

Requests are planned and tokenized here, then each choice becomes a
:class:`Sequence` for the :class:`BatchScheduler` (``llamacpp_batch.py``), which
decodes up to ``parallel`` sequences together in one llama.cpp context and
streams each one's text back. Waiting for a free sequence slot is bounded
(``max_queue`` requests, ``max_queue_wait_seconds`` each): beyond that, 503.
Tools and JSON output are enforced with GBNF grammars, applied per sequence as a
:class:`TokenMatcher`, so even a 135M model returns parseable tool calls and
schema-valid JSON.
"""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import json
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from functools import lru_cache

import grpc
import llama_cpp
import numpy as np
from llama_cpp import Llama, llama_grammar

from modelplex.v1 import catalog_pb2, text_pb2
from modelplex_kit.errors import ServiceError, invalid, unavailable
from modelplex_text import gguf
from modelplex_text.adapters.llamacpp_batch import BatchScheduler, EngineClosed, Sequence
from modelplex_text.choices import ChoiceEnd, ChoicePiece, completion_budget, refuse_suffix, stream_choices
from modelplex_text.decoding import SamplingParams, StopText, TokenMatcher, TokenSampler
from modelplex_text.engine import EngineEvent
from modelplex_text.prompting import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, OutputConstraint, PromptPlan, plan_prompt
from modelplex_text.sampling import sampling_kwargs
from modelplex_text.settings import LlamaCppSettings

log = logging.getLogger(__name__)

# The Llama object only holds weights, tokenizer and metadata: generation runs in the
# scheduler's own context, so this one stays at a token size.
_IDLE_CONTEXT = 256


@lru_cache(maxsize=64)
def _grammar_text(kind: str, schema_json: str) -> str:
    if kind == "json_object":
        return llama_grammar.JSON_GBNF
    gbnf = llama_grammar.json_schema_to_gbnf(schema_json)
    if kind != "tool_call_or_text":
        return gbnf
    # Prose (which may not open with "<"), or one call wrapped in tags.
    call = gbnf.replace("root ::=", "tool-call ::=", 1)
    return (
        f'root ::= "{TOOL_CALL_OPEN}" tool-call "{TOOL_CALL_CLOSE}" | free-text\nfree-text ::= [^<] [^\\x00]*\n' + call
    )


def grammar_for(constraint: OutputConstraint | None) -> str | None:
    """The GBNF grammar enforcing ``constraint`` (None: unconstrained)."""
    if constraint is None:
        return None
    schema_json = json.dumps(constraint.schema) if constraint.schema is not None else ""
    try:
        return _grammar_text(constraint.kind, schema_json)
    except (ValueError, RuntimeError) as exc:  # a schema the GBNF converter cannot express
        raise invalid(f"Cannot enforce this JSON schema: {exc}", _constraint_param(constraint)) from exc


def _constraint_param(constraint: OutputConstraint) -> str:
    return "response_format" if constraint.kind in ("json_schema", "json_object") else "tools"


_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])  # llama_token_data


class GbnfMatcher:
    """llama.cpp's grammar sampler as a :class:`TokenMatcher` (it masks; sampling stays ours)."""

    def __init__(self, vocab, grammar: str, n_vocab: int) -> None:
        self._sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
        if not self._sampler:
            raise ValueError("llama.cpp could not parse the grammar")
        self._data = np.zeros(n_vocab, dtype=_TOKEN_DATA)
        self._data["id"] = np.arange(n_vocab, dtype=np.int32)
        pointer = self._data.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data))
        self._array = llama_cpp.llama_token_data_array(data=pointer, size=n_vocab, selected=-1, sorted=False)

    def apply(self, logits: np.ndarray) -> None:
        self._data["logit"] = logits
        self._array.size, self._array.selected, self._array.sorted = len(logits), -1, False
        llama_cpp.llama_sampler_apply(self._sampler, ctypes.byref(self._array))
        logits[:] = self._data["logit"]

    def consume(self, token_id: int) -> None:
        llama_cpp.llama_sampler_accept(self._sampler, token_id)

    def is_stopped(self) -> bool:
        return False  # a grammar allows the end token only where it accepts; that token ends the choice

    def close(self) -> None:
        if self._sampler:
            llama_cpp.llama_sampler_free(self._sampler)
            self._sampler = None


class LlamaCppEngine:
    capabilities = catalog_pb2.Capabilities(
        chat=True, completions=True, tool_use=True, json_schema=True, prompt_caching=True, multiple_choices=True
    )

    def __init__(self, settings: LlamaCppSettings) -> None:
        path = gguf.model_path(settings.model_path)
        self._llm = Llama(model_path=path, n_ctx=_IDLE_CONTEXT, n_threads=settings.threads or None, verbose=False)
        self._template = gguf.chat_template(self._llm)
        self._context_length = settings.context_length
        self._defaults = (settings.default_temperature, settings.default_top_p)
        self._max_seconds = settings.max_request_seconds
        self._max_queue = settings.max_queue
        self._max_wait = settings.max_queue_wait_seconds
        self._vocab = self._llm._model.vocab
        self._n_vocab = self._llm.n_vocab()
        self._scheduler = BatchScheduler(
            self._llm.model,
            self._llm.context_params,
            parallel=settings.parallel,
            kv_tokens=max(settings.kv_cache_tokens, settings.context_length),
            context_length=settings.context_length,
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
        plan, tokens, grammar = await asyncio.to_thread(self._prepare, request)
        budget = completion_budget(request, len(tokens), self._context_length)
        # Compiled now, so a grammar llama.cpp rejects is a 400 before any event.
        first = await asyncio.to_thread(self._matcher, grammar, plan.constraint) if grammar else None
        kwargs = sampling_kwargs(request, *self._defaults)

        async def generate(index: int, seed: int | None, deadline: float | None) -> AsyncIterator[ChoicePiece]:
            nonlocal first
            matcher, first = first, None
            if matcher is None and grammar:
                matcher = await asyncio.to_thread(self._matcher, grammar, plan.constraint)
            params = SamplingParams(
                kwargs["temperature"], kwargs["top_p"], kwargs["presence_penalty"], kwargs["frequency_penalty"], seed
            )
            queue: asyncio.Queue = asyncio.Queue()
            seq = Sequence(
                tokens=list(tokens),
                max_new=budget,
                sampler=TokenSampler(params),
                stop_text=StopText(kwargs["stop"]),
                matcher=matcher,
                deadline=deadline,
                emit=_emitter(queue),
                context=contextvars.copy_context().run,  # the thread's log lines carry the request id
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

    def _prepare(self, request: text_pb2.GenerateRequest) -> tuple[PromptPlan, list[int], str | None]:
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
        return plan, tokens, grammar_for(plan.constraint)

    def _tokens(self, request: text_pb2.GenerateRequest, prompt: str) -> list[int]:
        if request.WhichOneof("input") == "chat":  # the template wrote the special tokens itself
            return self._llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
        # A raw prompt is user text: "<|im_start|>" in it must stay text, not become a control
        # token; BOS is added when the model wants one.
        return self._llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=False)

    def _matcher(self, grammar: str, constraint: OutputConstraint) -> TokenMatcher:
        try:
            return GbnfMatcher(self._vocab, grammar, self._n_vocab)
        except ValueError as exc:
            raise invalid(f"Cannot enforce this JSON schema: {exc}", _constraint_param(constraint)) from exc

    async def _run(self, seq: Sequence, queue: asyncio.Queue) -> AsyncIterator[ChoicePiece]:
        """Queues one sequence for the scheduler and relays its events until it ends."""
        if self._scheduler.waiting() >= self._max_queue:
            if seq.matcher is not None:
                seq.matcher.close()
            raise unavailable("The model is at capacity; retry shortly.")
        self._scheduler.submit(seq)
        try:
            try:
                started = await asyncio.wait_for(queue.get(), self._max_wait)
            except TimeoutError:
                log.warning("request waited too long for a sequence slot", extra={"waited_s": self._max_wait})
                raise unavailable("The model is busy; retry shortly.") from None
            cached = _check(started)[1]
            while True:
                event = _check(await queue.get())
                if event[0] == "text":
                    yield event[1]
                else:  # "end"
                    _, reason, completion_tokens, timed_out = event
                    yield ChoiceEnd(reason, completion_tokens, cached, timed_out)
                    return
        finally:
            # No-op when finished; otherwise (the consumer left, the wait timed out) the scheduler
            # drops the sequence before its next step, leaving the others running.
            seq.abort.set()


def _emitter(queue: asyncio.Queue):
    loop = asyncio.get_running_loop()

    def emit(event: tuple) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server has stopped, no one is listening
            pass

    return emit


def _check(event: tuple) -> tuple:
    """The event, unless it reports a failure: then the ServiceError the client should see."""
    if event[0] != "error":
        return event
    error = event[1]
    if isinstance(error, ServiceError):
        raise error
    if isinstance(error, EngineClosed):
        raise unavailable("The model is shutting down; retry shortly.")
    raise ServiceError(grpc.StatusCode.INTERNAL, "llama.cpp failed")
