"""A procedural stand-in for a fleet of vLLM replicas: the scheduling benchmark's engine.

Not a model. Each replica speaks OpenAI HTTP (``/v1/chat/completions``, ``/v1/completions``,
streamed or not, ``/v1/models``, ``/health``) and exposes vLLM's scheduler metrics under
vLLM's names and types on ``/metrics``, so a picker reads it as it would read vLLM. What it
simulates is what decides time to first token on a real engine:

- a **prefix cache** over fixed-size blocks of prompt tokens (a token is a whitespace-separated
  word; each block's hash chains its predecessor's, as vLLM's do, so a block matches only after
  the same prefix), LRU-evicted beyond a bound of blocks;
- a bound on **running sequences** and a **FIFO queue** behind it;
- **service time** = ``prefill_seconds_per_token`` x the prompt tokens not found in the cache +
  ``decode_seconds_per_token`` x the output tokens; the first token leaves after the prefill and
  one decode step. Prefills take turns, one at a time per replica (a **prefill lane**): prefill
  is compute-bound, so on a GPU one sequence's long prefill delays the next one's first token,
  which is how a cache miss costs other requests too. Decoding sequences run side by side.
  Time passes in ``asyncio.sleep``, so a replica costs almost no CPU.

Simplifications, stated: decoding sequences do not slow each other or the prefills (no shared
batch step), and the prefix cache is a pool apart from the blocks running sequences hold
(``kv_cache_usage_perc`` is the share of ``kv_blocks`` that running sequences' tokens fill), so
nothing is ever preempted.

Like vLLM with ``--kv-events-config``, a replica can publish its prefix cache's **KV-cache events**
(``--events-port``): ``BlockStored`` for each block its prefill adds (its hash, its parent's, its
token ids) and ``BlockRemoved`` for each it evicts, on a ZMQ PUB socket, in vLLM's wire format
(topic, 8-byte sequence number, msgpack of ``[ts, [event, ...], rank]``, events as tagged maps), and
answers vLLM's ``/tokenize`` with the same token ids (a word's id is its CRC-32). Engines publish on one
port of their own host, so with events each replica listens on a loopback address of its own
(127.0.0.2, 127.0.0.3, ...).

Every replica runs in one process, one free port each: ``python -m bench.engine_sim --replicas 8``
prints ``READY <host:port> <host:port> ...`` once all listen (``--max-running 4`` etc. set SimParams).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
import zlib
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

MODEL = "sim"
# Output tokens of a request that sets no max_tokens.
DEFAULT_MAX_TOKENS = 16


@dataclass(frozen=True)
class SimParams:
    """One replica's engine, in the units vLLM's own knobs use."""

    #: Tokens per KV block (vLLM's --block-size).
    block_tokens: int = 16
    #: Blocks the prefix cache keeps before evicting the least recently used.
    cache_blocks: int = 256
    #: Blocks running sequences' tokens may fill: the denominator of ``vllm:kv_cache_usage_perc``.
    #: Sized so that ``max_running`` of the benchmark's longest sequences fit (nothing is preempted).
    kv_blocks: int = 1024
    #: Sequences generating at once (vLLM's --max-num-seqs); more wait in FIFO order.
    max_running: int = 8
    #: Requests waiting beyond this many get 503 at once (memory stays bounded).
    max_waiting: int = 4096
    #: ~10k prompt tokens/s and ~100 output tokens/s per sequence: an 8B model on one current GPU,
    #: to an order of magnitude (what matters here is prefill's cost relative to decode's).
    prefill_seconds_per_token: float = 0.0001
    decode_seconds_per_token: float = 0.01
    #: Output tokens per streamed chunk (vLLM's --stream-interval): fewer writes, same timing.
    stream_interval: int = 8

    def service_seconds(self, uncached_prompt_tokens: float, output_tokens: float) -> float:
        """How long a sequence holds its slot once running (the prefill part of it also holds the lane)."""
        return self.prefill_seconds_per_token * uncached_prompt_tokens + self.decode_seconds_per_token * output_tokens

    def requests_per_second(self, uncached_prompt_tokens: float, output_tokens: float) -> float:
        """One replica's throughput for requests of this mean shape: the lane or the slots, whichever binds."""
        lane = 1 / (self.prefill_seconds_per_token * uncached_prompt_tokens)
        return min(lane, self.max_running / self.service_seconds(uncached_prompt_tokens, output_tokens))


def tokens_of(text: str) -> list[str]:
    """The simulator's tokenizer: whitespace-separated words."""
    return text.split()


def chat_text(messages: Iterable[dict]) -> str:
    """A chat rendered the way a chat template does: each message after its role marker, in order."""
    parts = []
    for message in messages:
        content = message.get("content") or ""
        if isinstance(content, list):
            content = " ".join(part.get("text", "") for part in content if isinstance(part, dict))
        parts.append(f"<|{message.get('role', 'user')}|> {content}")
    return " ".join(parts)


def token_ids(tokens: list[str]) -> list[int]:
    """The ids /tokenize answers and the events carry: a word's CRC-32 (the same in every process)."""
    return [zlib.crc32(token.encode()) for token in tokens]


def block_hashes(tokens: list[str], block_tokens: int) -> list[int]:
    """One hash per full block, each chained to the one before (a block is only reused after the same prefix)."""
    hashes, previous = [], 0
    for start in range(0, len(tokens) - block_tokens + 1, block_tokens):
        previous = hash((previous, *tokens[start : start + block_tokens]))
        hashes.append(previous)
    return hashes


class PrefixCache:
    """Block hashes, least recently used first; bounded in blocks."""

    def __init__(self, capacity_blocks: int) -> None:
        self.capacity = capacity_blocks
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def match(self, hashes: list[int]) -> int:
        """How many leading blocks are cached (those are touched, as a hit keeps a block warm)."""
        matched = 0
        for h in hashes:
            if h not in self._blocks:
                break
            self._blocks.move_to_end(h)
            matched += 1
        return matched

    def held(self, hashes: list[int]) -> int:
        """How many leading blocks are cached, touching nothing (the benchmark's probe)."""
        matched = 0
        for h in hashes:
            if h not in self._blocks:
                break
            matched += 1
        return matched

    def insert(self, hashes: list[int]) -> tuple[list[int], list[int]]:
        """Caches the blocks; returns the positions (in ``hashes``) of those it did not hold before, and
        the hashes it evicted to make room (what a KV-cache event publisher reports)."""
        added, evicted = [], []
        for i, h in enumerate(hashes):
            if h not in self._blocks:
                added.append(i)
            self._blocks[h] = None
            self._blocks.move_to_end(h)
        while len(self._blocks) > self.capacity:
            evicted.append(self._blocks.popitem(last=False)[0])
        return added, evicted


class EventPublisher:
    """vLLM's ZmqEventPublisher, as a subscriber sees it: one batch per cache change."""

    def __init__(self, address: str) -> None:
        import zmq

        self._socket = zmq.Context.instance().socket(zmq.PUB)
        self._socket.bind(address)
        self._seq = 0
        self._noblock = zmq.NOBLOCK

    def publish(self, events: list[dict]) -> None:
        import msgpack

        payload = msgpack.packb([time.time(), events, 0])
        # A PUB socket drops past its high-water mark rather than block (a slow subscriber loses batches).
        self._socket.send_multipart((b"", self._seq.to_bytes(8, "big"), payload), flags=self._noblock)
        self._seq += 1

    def close(self) -> None:
        self._socket.close(linger=0)


def cache_events(
    tokens: list[str], hashes: list[int], added: list[int], evicted: list[int], block_tokens: int
) -> list[dict]:
    """The BlockStored (one per added block, chained on its parent) and BlockRemoved events of an insert."""
    events: list[dict] = []
    for i in added:
        block = tokens[i * block_tokens : (i + 1) * block_tokens]
        events.append(
            {
                "type": "BlockStored",
                "block_hashes": [hashes[i]],
                "parent_block_hash": hashes[i - 1] if i else None,
                "token_ids": token_ids(block),
                "block_size": block_tokens,
                "lora_id": None,
                "medium": "GPU",
                "lora_name": None,
            }
        )
    if evicted:
        events.append({"type": "BlockRemoved", "block_hashes": evicted, "medium": "GPU"})
    return events


class Saturated(Exception):
    """The replica's queue is full."""


@dataclass
class Admission:
    """What the scheduler decided for one sequence once it got a slot."""

    prompt_tokens: int
    cached_tokens: int

    @property
    def uncached_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens


class Replica:
    """One simulated engine: slots, a FIFO queue, the prefix cache and vLLM's metrics."""

    def __init__(self, params: SimParams) -> None:
        self.params = params
        self.cache = PrefixCache(params.cache_blocks)
        self.running = 0
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._held_tokens = 0
        self._prefill_lane = asyncio.Lock()
        self.events: EventPublisher | None = None  # set by serve() with an events port
        self.host = "127.0.0.1"
        self.port = 0  # set by serve()
        self.runner: web.AppRunner | None = None
        self.registry = CollectorRegistry()
        labels = {"model_name": MODEL, "engine": "0"}
        self.m_running = Gauge(
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            list(labels),
            registry=self.registry,
        ).labels(**labels)
        self.m_waiting = Gauge(
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            list(labels),
            registry=self.registry,
        ).labels(**labels)
        self.m_kv = Gauge(
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
            list(labels),
            registry=self.registry,
        ).labels(**labels)
        self.m_queries = Counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            list(labels),
            registry=self.registry,
        ).labels(**labels)
        self.m_hits = Counter(
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens.",
            list(labels),
            registry=self.registry,
        ).labels(**labels)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def generate(self, prompt: list[str], max_tokens: int) -> AsyncIterator[Admission | int]:
        """Yields the Admission once its prefill starts, then counts of tokens as they are generated."""
        await self._acquire_slot()
        held = len(prompt) + max_tokens
        self._hold(held)
        try:
            async with self._prefill_lane:  # asyncio.Lock wakes its waiters in FIFO order
                admission = self._schedule(prompt)
                yield admission
                await asyncio.sleep(self.params.prefill_seconds_per_token * admission.uncached_tokens)
                self._insert(prompt)
            left = max_tokens
            while left > 0:  # the first token alone (time to first token), then stream_interval at a time
                step = 1 if left == max_tokens else min(left, self.params.stream_interval)
                await asyncio.sleep(self.params.decode_seconds_per_token * step)
                left -= step
                yield step
        finally:
            self._hold(-held)
            self._release_slot()

    def _insert(self, prompt: list[str]) -> None:
        hashes = block_hashes(prompt, self.params.block_tokens)
        added, evicted = self.cache.insert(hashes)
        if self.events is not None and (added or evicted):
            self.events.publish(cache_events(prompt, hashes, added, evicted, self.params.block_tokens))

    def _schedule(self, prompt: list[str]) -> Admission:
        """The prefix is looked up when the prefill starts (as vLLM's scheduler does), not on arrival."""
        matched = self.cache.match(block_hashes(prompt, self.params.block_tokens))
        # As vLLM: the last prompt token is always computed (its logits give the first output token).
        cached = min(matched * self.params.block_tokens, max(0, len(prompt) - 1))
        self.m_queries.inc(len(prompt))
        self.m_hits.inc(cached)
        return Admission(prompt_tokens=len(prompt), cached_tokens=cached)

    async def _acquire_slot(self) -> None:
        if self.running < self.params.max_running and not self._waiting:
            self.running += 1
            self._publish()
            return
        if len(self._waiting) >= self.params.max_waiting:
            raise Saturated
        turn = asyncio.get_running_loop().create_future()
        self._waiting.append(turn)
        self._publish()
        try:
            await turn  # the slot is handed over by _release_slot, already counted as running
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self._release_slot()  # handed a slot just as the client left: pass it on
            else:
                self._waiting.remove(turn)
                self._publish()
            raise

    def _release_slot(self) -> None:
        while self._waiting:
            turn = self._waiting.popleft()
            if not turn.done():
                turn.set_result(None)
                self._publish()
                return
        self.running -= 1
        self._publish()

    def _hold(self, tokens: int) -> None:
        self._held_tokens += tokens
        blocks = math.ceil(self._held_tokens / self.params.block_tokens)
        self.m_kv.set(min(1.0, blocks / self.params.kv_blocks))

    def _publish(self) -> None:
        self.m_running.set(self.running)
        self.m_waiting.set(len(self._waiting))


# -- OpenAI HTTP -------------------------------------------------------------
def _usage(admission: Admission, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": admission.prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": admission.prompt_tokens + completion_tokens,
        # vLLM's --enable-prompt-tokens-details
        "prompt_tokens_details": {"cached_tokens": admission.cached_tokens},
    }


def _sse(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def _error(status: int, message: str, kind: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "param": None, "code": None}}, status=status)


class ReplicaApp:
    """The HTTP face of one Replica."""

    def __init__(self, replica: Replica) -> None:
        self.replica = replica
        self.app = web.Application()
        self.app.router.add_post("/v1/chat/completions", self.chat)
        self.app.router.add_post("/v1/completions", self.completions)
        self.app.router.add_get("/v1/models", self.models)
        self.app.router.add_get("/health", self.health)
        self.app.router.add_get("/metrics", self.metrics)
        self.app.router.add_post("/tokenize", self.tokenize)
        # The simulator's own probe, not vLLM's: how much of a chat its prefix cache holds now.
        self.app.router.add_post("/sim/cached", self.cached)

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def models(self, request: web.Request) -> web.Response:
        model = {"id": MODEL, "object": "model", "created": 0, "owned_by": "engine_sim"}
        return web.json_response({"object": "list", "data": [model]})

    async def metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.replica.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def tokenize(self, request: web.Request) -> web.Response:
        """vLLM's ``/tokenize``: ``{"messages": [...]}`` or ``{"prompt": "..."}`` -> ``{"tokens": [...]}``."""
        try:
            body = await request.json()
            text = chat_text(body["messages"]) if "messages" in body else str(body["prompt"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            return _error(400, f"bad request: {exc!r}", "invalid_request_error")
        ids = token_ids(tokens_of(text))
        return web.json_response({"tokens": ids, "count": len(ids), "max_model_len": 1 << 20})

    async def cached(self, request: web.Request) -> web.Response:
        """``{"messages": [...]}`` -> ``{"cached_tokens": n}``: the leading tokens its cache holds."""
        try:
            tokens = tokens_of(chat_text((await request.json())["messages"]))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            return _error(400, f"bad request: {exc!r}", "invalid_request_error")
        block = self.replica.params.block_tokens
        return web.json_response({"cached_tokens": self.replica.cache.held(block_hashes(tokens, block)) * block})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, chat=False)

    async def _answer(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        try:
            body = await request.json()
            text = chat_text(body["messages"]) if chat else str(body["prompt"])
            limit = body.get("max_tokens", body.get("max_completion_tokens"))
            max_tokens = DEFAULT_MAX_TOKENS if limit is None else int(limit)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            return _error(400, f"bad request: {exc!r}", "invalid_request_error")
        if max_tokens < 1:
            return _error(400, "max_tokens must be at least 1", "invalid_request_error")
        run = Run(chat=chat, model=body.get("model") or MODEL)
        generation = self.replica.generate(tokens_of(text), max_tokens)
        try:
            if body.get("stream"):
                return await run.stream(request, generation)
            return await run.whole(generation)
        except Saturated:
            return _error(503, "the simulated engine's queue is full", "server_error")
        finally:
            await generation.aclose()


@dataclass
class Run:
    """One request's answer, in chat or legacy-completions shape."""

    chat: bool
    model: str

    def _choice(self, text: str, finish: str | None, *, delta: bool) -> dict:
        if not self.chat:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        key = "delta" if delta else "message"
        return {"index": 0, key: {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}

    def _object(self, *, chunk: bool) -> str:
        kind = "chat.completion" if self.chat else "text_completion"
        return kind + (".chunk" if chunk and self.chat else "")

    def _frame(self, choices: list, usage: dict | None = None) -> dict:
        out = {"id": "cmpl-sim", "object": self._object(chunk=True), "created": int(time.time()), "model": self.model}
        return out | {"choices": choices} | ({"usage": usage} if usage is not None else {})

    async def whole(self, generation: AsyncIterator[Admission | int]) -> web.Response:
        admission, produced = None, 0
        async for event in generation:
            if isinstance(event, Admission):
                admission = event
            else:
                produced += event
        assert admission is not None
        return web.json_response(
            {
                "id": "cmpl-sim",
                "object": self._object(chunk=False),
                "created": int(time.time()),
                "model": self.model,
                "choices": [self._choice("tok " * produced, "length", delta=False)],
                "usage": _usage(admission, produced),
            }
        )

    async def stream(self, request: web.Request, generation: AsyncIterator[Admission | int]) -> web.StreamResponse:
        first = await anext(generation)  # queued until scheduled; Saturated before any byte is sent
        assert isinstance(first, Admission)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        produced = 0
        async for step in generation:
            assert isinstance(step, int)
            produced += step
            await response.write(_sse(self._frame([self._choice("tok " * step, None, delta=True)])))
        await response.write(_sse(self._frame([self._choice("", "length", delta=True)])))
        await response.write(_sse(self._frame([], _usage(first, produced))))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


async def serve(params: SimParams, replicas: int, host: str = "127.0.0.1", events_port: int = 0) -> list[Replica]:
    """Starts ``replicas`` replicas in this event loop, each on a free port (``Replica.port``); with an
    ``events_port``, each on its own loopback address, publishing its KV-cache events on that port."""
    started = []
    for i in range(replicas):
        replica = Replica(params)
        replica.host = f"127.0.0.{i + 2}" if events_port else host
        if events_port:
            replica.events = EventPublisher(f"tcp://{replica.host}:{events_port}")
        runner = web.AppRunner(ReplicaApp(replica).app, access_log=None, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, replica.host, 0).start()
        replica.port = runner.addresses[0][1]
        replica.runner = runner
        started.append(replica)
    return started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=8)
    parser.add_argument("--events-port", type=int, default=0, help="publish KV-cache events on this port (0: none)")
    defaults = SimParams()
    for name in SimParams.__dataclass_fields__:
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(getattr(defaults, name)), default=None)
    args = parser.parse_args()
    chosen = {name: getattr(args, name) for name in SimParams.__dataclass_fields__ if getattr(args, name) is not None}
    params = SimParams(**chosen)
    disable_created_metrics()  # no *_created series: a scraper reads only what vLLM's /metrics has

    async def run() -> None:
        replicas = await serve(params, args.replicas, events_port=args.events_port)
        print("READY " + " ".join(f"{r.host}:{r.port}" for r in replicas), flush=True)
        await asyncio.Event().wait()

    asyncio.run(run())


if __name__ == "__main__":
    main()
