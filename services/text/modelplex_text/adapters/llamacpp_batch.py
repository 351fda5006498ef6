"""Continuous batching over one llama.cpp context: many sequences, one ``llama_decode`` per step.

One scheduler thread owns the context. Each step it takes, for every active
sequence, the tokens it still has to evaluate (a prompt chunk, or the one token
sampled last step), decodes them together in one ``llama_batch`` with one
``seq_id`` per sequence, and samples each sequence from its own logits
(``llama_get_logits_ith``). So a new request's prompt is evaluated alongside the
others' decoding instead of after them, and every active sequence gains one
token per step: fair by construction.

Slots and the KV cache: ``parallel`` sequence ids share one unified cache of
``kv_cache_tokens`` cells. A finished sequence's cells stay in its slot, so a
later prompt sharing a prefix with it (the next turn of a chat, the next choice
of ``n``) reuses them: that is what ``cached_tokens`` reports. When the cache
is full, idle slots are emptied first; then the active sequence with the least
work done (the fewest cells) is preempted, as vLLM does: its cells are dropped
and it waits to be recomputed from its tokens, its sampling state kept, so its
output is unchanged.

LoRA adapters (``llamacpp_lora``): llama.cpp applies adapters per context, so a step's sequences
are decoded in one batch per adapter they run under (the base being one), the context's adapter
set before each; a slot's cached cells are reused only by a sequence under the same adapter.

Aborts (a client gone) and the wall-clock deadline are checked between steps,
so one sequence ends without stalling the others.

After each admission pass the scheduler tells its :class:`StartRate` how many
sequences got their first slot and whether others still wait: how fast the
queue drains, which the engine reads to refuse at once what could not start
within its wait bound (``llamacpp_queue``). After a pass in which sequences
started (the rate became known or changed), it also refuses the waiting ones
at the back of each line that can no longer start within what is left of their
wait (``QueueBounds.late``): each gets a :class:`Failed` with that 503 at once.

Each sequence reports through its ``emit`` callback, in this order: one
:class:`Started` (when it gets a slot), :class:`ChoiceText` pieces, then one
:class:`ChoiceEnd`; or, at any point, one :class:`Failed`. When it asked for
logprobs, each sampled token's are computed from the logits it was drawn from
(after the constraint's mask and the penalties; see ``modelplex_text.logprobs``).
"""

from __future__ import annotations

import collections
import ctypes
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import llama_cpp
import numpy as np

from modelplex.v1 import text_pb2
from modelplex_kit.errors import ServiceError
from modelplex_text.adapters.llamacpp_lora import LoadedLora, LoraLibrary
from modelplex_text.adapters.llamacpp_queue import QueueBounds, QueuePosition, StartRate, Waiter, position
from modelplex_text.choices import ChoiceEnd, ChoiceText
from modelplex_text.decoding import StopText, TokenMatcher, TokenSampler
from modelplex_text.logprobs import token_logprob

log = logging.getLogger(__name__)

# Prompt tokens evaluated per step across all sequences: bounds a step's time, so the
# sequences already decoding keep getting tokens while a long prompt is read.
_STEP_TOKENS = 256


class EngineClosed(RuntimeError):
    """The scheduler stopped (server shutdown) with this sequence unfinished."""


@dataclass(frozen=True, slots=True)
class Started:
    """The sequence got a slot; ``cached_tokens`` of its prompt were already in that slot's cache."""

    cached_tokens: int


@dataclass(frozen=True, slots=True)
class Failed:
    """The sequence ended without finishing: its constraint gave up (a ServiceError), the engine
    closed (EngineClosed), or llama.cpp failed."""

    error: BaseException


SequenceEvent = Started | ChoiceText | ChoiceEnd | Failed
Emit = Callable[[SequenceEvent], None]


@dataclass(eq=False)
class Sequence:
    """One choice being generated."""

    tokens: list[int]  # the prompt, then each sampled token; the tail not yet in the KV cache is evaluated next
    max_new: int
    sampler: TokenSampler
    stop_text: StopText
    matcher: TokenMatcher | None
    deadline: float | None
    emit: Emit  # thread-safe: hands an event to the request's event loop
    context: Callable  # runs a callable in the request's contextvars (its log lines carry the request id)
    top_logprobs: int | None = None  # None: no logprobs; else alternatives reported per token
    abort: threading.Event = field(default_factory=threading.Event)
    generated: int = 0
    cached_tokens: int | None = None  # set when it first gets a slot (Started is emitted once, even if preempted)
    batch: bool = False  # batch work (x-modelplex-priority: batch): a free slot goes to interactive work first
    queued_at: float | None = None  # when it was submitted (the scheduler's clock)
    lora: LoadedLora | None = None  # the LoRA adapter it runs under (None: the base model)

    @property
    def lora_key(self) -> str:
        return self.lora.key if self.lora is not None else ""

    def release(self) -> None:
        """Frees the matcher's native state; called by the scheduler thread, the matcher's only user."""
        if self.matcher is not None:
            self.matcher.close()
            self.matcher = None


@dataclass(eq=False)
class _Slot:
    seq_id: int
    kv: list[int] = field(default_factory=list)  # the tokens whose cells this sequence id holds
    seq: Sequence | None = None
    lora_key: str = ""  # the adapter those cells were computed under ("": the base)

    def reusable(self, seq: Sequence) -> int:
        """Leading tokens of ``seq`` this slot's cells already hold (none under another adapter)."""
        return _common_prefix(self.kv, seq.tokens) if self.lora_key == seq.lora_key else 0


class BatchScheduler:
    def __init__(
        self,
        model,
        base: llama_cpp.llama_context_params,
        *,
        parallel: int,
        kv_tokens: int,
        context_length: int,
        bounds: QueueBounds | None = None,
        loras: LoraLibrary | None = None,
    ) -> None:
        # llama-cpp-python's own choices (threads, flash attention off, ...), so a lone sequence runs
        # exactly as it did through Llama; only what batching needs differs.
        params = llama_cpp.llama_context_params.from_buffer_copy(base)
        params.n_ctx = kv_tokens
        params.n_batch = params.n_ubatch = max(_STEP_TOKENS, parallel)
        params.n_seq_max = parallel
        params.kv_unified = True  # one pool of cells for all sequences, not n_ctx / parallel each
        # Generation runs on n_threads, prompts on n_threads_batch, as in llama-cpp-python. llama.cpp
        # itself would use n_threads_batch for any batch over one token, so every batched decode step.
        self._threads = (params.n_threads, params.n_threads_batch)
        self._threads_now = self._threads
        self._ctx = llama_cpp.llama_init_from_model(model, params)
        if not self._ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._vocab = llama_cpp.llama_model_get_vocab(model)
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self._capacity = llama_cpp.llama_n_ctx(self._ctx)
        self._context_length = context_length
        self._batch = llama_cpp.llama_batch_init(params.n_batch, 0, 1)
        self._slots = [_Slot(i) for i in range(parallel)]
        self._waiting: collections.deque[Sequence] = collections.deque()
        # Batch sequences wait in their own line, served only when no interactive sequence waits.
        self._waiting_batch: collections.deque[Sequence] = collections.deque()
        self._cv = threading.Condition()
        self._closing = False
        # Waiting sequences that can no longer start within bounds.max_wait are refused (None: never).
        self._bounds = bounds
        self._clock = time.monotonic
        # Written by this scheduler's thread only (after each admission pass); read by the engine. Known once each
        # slot's worth of sequences has started out of a backlog (see StartRate).
        self.start_rate = StartRate(self._clock, known_after=parallel)
        self._pieces: dict[int, bytes] = {}
        self._loras = loras
        self._lora_now: LoadedLora | None = None  # the adapter set on the context
        self._thread = threading.Thread(target=self._run, name="llamacpp-batch", daemon=True)
        self._thread.start()

    # -- called from the event loop ----------------------------------------
    def submit(self, seq: Sequence) -> None:
        with self._cv:
            seq.queued_at = self._clock()
            self._line(seq).append(seq)
            self._cv.notify()

    def waiting(self) -> int:
        return len(self._waiting) + len(self._waiting_batch)

    def position(self, *, batch: bool) -> QueuePosition:
        """Where a sequence of that priority submitted now would wait."""
        with self._cv:
            return position(
                interactive_waiting=len(self._waiting),
                batch_waiting=len(self._waiting_batch),
                batch_running=sum(1 for seq in self._active() if seq.batch),
                batch=batch,
            )

    def _line(self, seq: Sequence) -> collections.deque[Sequence]:
        return self._waiting_batch if seq.batch else self._waiting

    def close(self) -> None:
        with self._cv:
            self._closing = True
            self._cv.notify()
        self._thread.join(timeout=30)
        if not self._thread.is_alive():
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self._ctx)

    # -- the scheduler thread ----------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._closing and not self.waiting() and not self._active():
                    self._cv.wait()
                if self._closing:
                    for seq in [*self._waiting, *self._waiting_batch, *self._active()]:
                        seq.emit(Failed(EngineClosed()))
                        seq.release()
                    return
                self._admit()
            try:
                self._step()
            except Exception as exc:  # a failed decode ends the sequences in it, never the thread
                log.exception("llama.cpp batch step failed")
                for slot in self._slots:
                    if slot.seq is not None:
                        slot.seq.emit(Failed(exc))
                        slot.seq.release()
                        self._clear(slot)
                        slot.seq = None

    def _active(self) -> list[Sequence]:
        return [slot.seq for slot in self._slots if slot.seq is not None]

    def _admit(self) -> None:
        started = self._fill_slots()
        self.start_rate.admitted(started, still_waiting=bool(self.waiting()))
        if started:
            self._refuse_late()

    def _refuse_late(self) -> None:
        """Sequences started, so the start rate is known or changed: each line's waiting sequences at the back that
        can no longer start within what is left of their wait get their 503 now (``QueueBounds.late``) rather than
        when the wait runs out. One pass over the waiting sequences, each counted as :func:`position` counts a new
        one (interactive ones first, so batch work counts the interactive sequences that remain)."""
        rate = self.start_rate.per_second
        if self._bounds is None or rate is None or not self.waiting():
            return
        now = self._clock()
        batch_running = sum(1 for seq in self._active() if seq.batch)
        refused = 0
        for line in (self._waiting, self._waiting_batch):
            batch = line is self._waiting_batch
            waiters = [
                Waiter(
                    position(
                        interactive_waiting=len(self._waiting) if batch else index,
                        batch_waiting=index,
                        batch_running=batch_running,
                        batch=batch,
                    ).ahead,
                    seq.queued_at if seq.cached_tokens is None else None,
                )
                for index, seq in enumerate(line)
            ]
            late = self._bounds.late(waiters, rate, now)
            for error in reversed(late):  # the back of the line, last first
                seq = line.pop()
                seq.emit(Failed(error))
                seq.release()
            refused += len(late)
        if refused:
            log.info(
                "refused waiting requests that could no longer start in time",
                extra={"refused": refused, "starts_per_second": round(rate, 3), "still_waiting": self.waiting()},
            )

    def _fill_slots(self) -> int:
        """Moves waiting sequences (interactive ones first, then batch work; oldest first in each) into free slots,
        each where its prompt's cached prefix is longest. Returns how many got their first slot (a preempted
        sequence given one again is not counted)."""
        for line in (self._waiting, self._waiting_batch):
            for seq in [seq for seq in line if seq.abort.is_set()]:  # left while waiting
                line.remove(seq)
                seq.release()
        started = 0
        while self.waiting():
            free = [slot for slot in self._slots if slot.seq is None]
            if not free and not (self._waiting and self._preempt_batch_work()):
                break
            free = free or [slot for slot in self._slots if slot.seq is None]
            seq = (self._waiting or self._waiting_batch).popleft()  # interactive work first
            slot = max(free, key=lambda s: s.reusable(seq))
            reuse = min(slot.reusable(seq), len(seq.tokens) - 1)  # one token must be evaluated
            if not llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, reuse, -1):
                self._clear(slot)  # this model cannot drop part of a sequence
                reuse = 0
            del slot.kv[reuse:]
            slot.seq, slot.lora_key = seq, seq.lora_key
            if seq.cached_tokens is None:
                seq.cached_tokens = reuse
                seq.emit(Started(reuse))
                started += 1
        return started

    def _step(self) -> None:
        for slot in self._slots:
            if slot.seq is not None and self._ended_outside(slot.seq):
                slot.seq = None
        plan = self._plan()
        if not plan:
            return
        self._free_released_loras()
        groups: dict[str, list[tuple[_Slot, int]]] = {}
        for slot, count in plan:
            groups.setdefault(slot.seq.lora_key, []).append((slot, count))
        for group in groups.values():
            if not self._decode(group):
                return  # a sequence was preempted to make room: the next step plans again

    def _decode(self, plan: list[tuple[_Slot, int]]) -> bool:
        """One ``llama_decode`` of sequences under one adapter; False when it found no room (one was preempted)."""
        self._use_lora(plan[0][0].seq.lora)
        self._fill(plan)
        self._use_threads(reading_prompt=any(count > 1 for _, count in plan))
        status = llama_cpp.llama_decode(self._ctx, self._batch)
        if status == 1 and self._preempt_least_progressed():  # no room for the batch: retry smaller next step
            return False
        if status != 0:
            raise RuntimeError(f"llama_decode failed ({status})")
        row = 0
        for slot, count in plan:
            slot.kv.extend(slot.seq.tokens[len(slot.kv) : len(slot.kv) + count])
            row += count
            if len(slot.kv) == len(slot.seq.tokens):  # all evaluated: this row's logits are the next token's
                self._advance_or_fail(slot, row - 1)
        return True

    def _use_lora(self, lora: LoadedLora | None) -> None:
        if lora is self._lora_now:
            return
        if lora is None:
            status = llama_cpp.llama_set_adapters_lora(self._ctx, None, 0, None)
        else:
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(lora.handle)
            scales = (ctypes.c_float * 1)(1.0)
            status = llama_cpp.llama_set_adapters_lora(self._ctx, adapters, 1, scales)
        if status != 0:
            raise RuntimeError(f"llama.cpp could not set the LoRA adapter ({status})")
        self._lora_now = lora

    def _free_released_loras(self) -> None:
        """Frees the adapters the library let go (none is in use: no sequence runs under them)."""
        released = self._loras.take_released() if self._loras is not None else []
        if released:
            self._use_lora(None)
            for lora in released:
                llama_cpp.llama_adapter_lora_free(lora.handle)

    def _advance_or_fail(self, slot: _Slot, row: int) -> None:
        """Advances one sequence; its own failure (its constraint gave up: a 400) ends it alone."""
        try:
            self._advance(slot, row)
        except ServiceError as exc:
            if slot.seq is not None:
                slot.seq.emit(Failed(exc))
                slot.seq.release()
                self._clear(slot)
                slot.seq = None

    def _use_threads(self, *, reading_prompt: bool) -> None:
        generation, prompts = self._threads
        wanted = (generation, prompts if reading_prompt else generation)
        if wanted != self._threads_now:
            llama_cpp.llama_set_n_threads(self._ctx, *wanted)
            self._threads_now = wanted

    def _ended_outside(self, seq: Sequence) -> bool:
        """Aborted by the consumer, or past the wall-clock deadline (then finished as "length")."""
        if seq.abort.is_set():
            seq.context(log.info, "generation aborted: the client went away")
            seq.release()
            return True
        if seq.deadline is not None and time.monotonic() >= seq.deadline:
            self._finish(seq, "length", timed_out=True)
            return True
        return False

    def _plan(self) -> list[tuple[_Slot, int]]:
        """(slot, tokens to evaluate) for this step: one per decoding sequence, then prompt chunks."""
        while True:
            busy = [slot for slot in self._slots if slot.seq is not None]
            decoding = [s for s in busy if len(s.seq.tokens) - len(s.kv) == 1]
            plan = [(slot, 1) for slot in decoding]
            budget = max(0, self._batch_size() - len(plan))
            for slot in busy:
                if slot in decoding or budget == 0:
                    continue
                count = min(len(slot.seq.tokens) - len(slot.kv), budget)
                plan.append((slot, count))
                budget -= count
            used = sum(len(slot.kv) for slot in self._slots)
            if used + sum(count for _, count in plan) <= self._capacity:
                return plan
            if not self._evict_idle() and not self._preempt_least_progressed():
                return plan  # one sequence left: it fits by construction (max_new is checked against the context)

    def _batch_size(self) -> int:
        return max(_STEP_TOKENS, len(self._slots))

    def _fill(self, plan: list[tuple[_Slot, int]]) -> None:
        batch, row = self._batch, 0
        for slot, count in plan:
            start = len(slot.kv)
            for offset in range(count):
                batch.token[row] = slot.seq.tokens[start + offset]
                batch.pos[row] = start + offset
                batch.n_seq_id[row] = 1
                batch.seq_id[row][0] = slot.seq_id
                batch.logits[row] = start + offset == len(slot.seq.tokens) - 1
                row += 1
        batch.n_tokens = row

    def _advance(self, slot: _Slot, row: int) -> None:
        """Samples the sequence's next token from its logits row, and emits or finishes it."""
        seq = slot.seq
        pointer = llama_cpp.llama_get_logits_ith(self._ctx, row)
        logits = np.ctypeslib.as_array(pointer, shape=(self._n_vocab,)).copy()
        if seq.matcher is not None:
            seq.matcher.apply(logits)
        seq.sampler.penalize(logits)  # now exactly what the token is drawn from, and scored over
        token = seq.sampler.choose(logits)
        if llama_cpp.llama_vocab_is_eog(self._vocab, token):  # the end token is not part of the completion
            self._finish(seq, "stop")
            slot.seq = None
            return
        seq.generated += 1
        seq.sampler.accept(token)
        if seq.matcher is not None:
            seq.matcher.consume(token)
        text, hit_stop = seq.stop_text.feed(self._piece(token))
        scored = self._scored(seq, logits, token)
        if text or scored:
            seq.emit(ChoiceText(text, scored))
        if hit_stop or (seq.matcher is not None and seq.matcher.is_stopped()):
            self._finish(seq, "stop", flush=not hit_stop)
        elif seq.generated >= seq.max_new or len(seq.tokens) + 1 >= self._context_length:
            self._finish(seq, "length")
        else:
            seq.tokens.append(token)
            return
        slot.seq = None

    def _scored(self, seq: Sequence, logits: np.ndarray, token: int) -> tuple[text_pb2.TokenLogprob, ...]:
        if seq.top_logprobs is None:
            return ()
        return (token_logprob(logits, token, seq.top_logprobs, self._piece),)

    def _finish(self, seq: Sequence, reason: str, *, flush: bool = True, timed_out: bool = False) -> None:
        if flush and (rest := seq.stop_text.flush()):
            seq.emit(ChoiceText(rest))
        seq.emit(ChoiceEnd(reason, seq.generated, seq.cached_tokens, timed_out))
        seq.release()

    def _piece(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            buffer = ctypes.create_string_buffer(64)
            size = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, 64, 0, False)
            if size < 0:  # longer than the buffer: -size is what it needs
                buffer = ctypes.create_string_buffer(-size)
                size = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, -size, 0, False)
            piece = self._pieces[token] = buffer.raw[:size]
        return piece

    # -- making room in the KV cache ----------------------------------------
    def _evict_idle(self) -> bool:
        idle = [slot for slot in self._slots if slot.seq is None and slot.kv]
        if not idle:
            return False
        self._clear(max(idle, key=lambda slot: len(slot.kv)))
        return True

    def _preempt_batch_work(self) -> bool:
        """Interactive work is waiting and every slot is busy: the batch sequence with the least work done gives
        its slot up and goes back first in the batch line (recomputed from its tokens when a slot frees), so a
        batch never makes an interactive request wait for a slot longer than one step."""
        batch = [slot for slot in self._slots if slot.seq is not None and slot.seq.batch]
        if not batch:
            return False
        slot = min(batch, key=lambda s: len(s.kv))
        self._waiting_batch.appendleft(slot.seq)
        slot.seq.context(log.info, "batch sequence preempted: interactive work needs its slot")
        slot.seq = None
        return True

    def _preempt_least_progressed(self) -> bool:
        """Drops the cells of the active sequence with the least work done and requeues it first in line."""
        busy = [slot for slot in self._slots if slot.seq is not None]
        if len(busy) < 2:
            return self._evict_idle()
        slot = min(busy, key=lambda s: len(s.kv))  # least work lost
        self._line(slot.seq).appendleft(slot.seq)
        slot.seq.context(log.info, "sequence preempted: the KV cache is full; it will be recomputed")
        slot.seq = None
        self._clear(slot)
        return True

    def _clear(self, slot: _Slot) -> None:
        llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
        slot.kv.clear()


def _common_prefix(a: list[int], b: list[int]) -> int:
    size = min(len(a), len(b))
    for i in range(size):
        if a[i] != b[i]:
            return i
    return size
