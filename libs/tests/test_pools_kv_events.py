"""Engine pools that follow their engines' KV-cache events (modelplex_kit.pools.kv_events).

The view is tested on its own; then a pool over two stand-in engines (small aiohttp servers, a
character per token) whose events are published on real ZMQ PUB sockets in vLLM's wire format, as
vLLM's ZmqEventPublisher sends them: (topic, 8-byte sequence, msgpack of [ts, [event...], rank]).
That the real vLLM publishes exactly this is the engine suite's (tests/vllm/test_kv_events_on_vllm.py).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import msgpack
import pytest
import zmq
from aiohttp import web

from libs.tests.test_pools_http import FakeVllm, serving
from modelplex_kit.pools.http import OpenAIPool
from modelplex_kit.pools.kv_events import EngineCacheView, Stored, decode_batch, events_address, token_block_keys
from modelplex_kit.pools.picker import PickRequest, Reason
from modelplex_kit.pools.settings import PoolSettings
from tests.support.ports import free_port
from tests.support.until import until

BLOCK = 4


def stored(hashes, parent, tokens, *, block_size=BLOCK, **extra) -> dict:
    return {"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": parent, "token_ids": tokens,
            "block_size": block_size, "lora_id": None, "medium": "GPU", "lora_name": None} | extra  # fmt: skip


def batch(*events) -> bytes:
    return msgpack.packb([time.time(), list(events), 0])


def test_a_batch_decodes_from_vllms_map_form_and_its_array_form():
    as_maps = batch(stored([b"h1"], None, [1, 2, 3, 4]), {"type": "BlockRemoved", "block_hashes": [7], "medium": None},
                    {"type": "AllBlocksCleared"})  # fmt: skip
    as_arrays = batch(["BlockStored", [b"h1"], None, [1, 2, 3, 4], 4, None, "GPU"], ["BlockRemoved", [7], None],
                      ["AllBlocksCleared"])  # fmt: skip
    for payload in (as_maps, as_arrays):
        events = decode_batch(payload)
        assert [type(e).__name__ for e in events] == ["Stored", "Removed", "Cleared"]
        assert events[0] == Stored([b"h1"], None, [1, 2, 3, 4], 4, plain=True)
    with pytest.raises(ValueError):
        decode_batch(msgpack.packb({"not": "a batch"}))


def test_the_view_follows_stores_evictions_and_clears_block_by_block():
    view = EngineCacheView(max_blocks_per_replica=100)
    prompt = list(range(100, 114))  # 3 whole blocks of 4 and 2 tokens over
    view.apply("a", decode_batch(batch(stored([1, 2], None, prompt[:8]))))
    view.apply("a", decode_batch(batch(stored([3], 2, prompt[8:12]))))  # chained on its parent's engine hash
    view.apply("b", decode_batch(batch(stored([9], None, prompt[:4]))))
    assert view.matches(prompt, ["a", "b", "c"]) == {"a": 3, "b": 1, "c": 0}
    assert view.matches([0, *prompt], ["a", "b"]) == {"a": 0, "b": 0}  # another first block: nothing shared
    view.apply("a", decode_batch(batch({"type": "BlockRemoved", "block_hashes": [2], "medium": "GPU"})))
    assert view.matches(prompt, ["a", "b"]) == {"a": 1, "b": 1}  # its second block gone: the chain stops there
    view.apply("b", decode_batch(batch({"type": "AllBlocksCleared"})))
    assert view.matches(prompt, ["a", "b"]) == {"a": 1, "b": 0} and view.held("b") == 0


def test_what_cannot_be_chained_or_is_not_a_plain_prompt_teaches_nothing():
    view = EngineCacheView(max_blocks_per_replica=100)
    prompt = list(range(8))
    view.apply("a", decode_batch(batch(stored([2], 1, prompt[4:]))))  # its parent was stored before the view began
    view.apply("a", decode_batch(batch(stored([5], None, prompt[:4], lora_name="sql-adapter"))))
    view.apply("a", decode_batch(batch(stored([6], None, prompt[:4], extra_keys=[["salt"]]))))
    assert view.held("a") == 0 and view.matches(prompt, ["a"]) == {"a": 0}


def test_only_the_first_kv_cache_group_and_whole_blocks_of_one_size_are_followed():
    """A hybrid model's sliding-window group stores and evicts the same hashes on its own schedule: its
    removal must not cut the full-attention group's chain. A store of another block size, or of a
    partial block, is not a prefix this view can match."""
    view = EngineCacheView(max_blocks_per_replica=100)
    prompt = list(range(12))
    view.apply("a", decode_batch(batch(stored([1, 2], None, prompt[:8]))))
    view.apply("a", decode_batch(batch({"type": "BlockRemoved", "block_hashes": [1], "medium": "GPU", "group_idx": 1})))
    view.apply("a", decode_batch(batch(stored([7], None, prompt[:4], group_idx=1))))
    view.apply("a", decode_batch(batch(stored([3], 2, prompt[8:10], block_size=2))))  # a partial block
    view.apply("b", decode_batch(batch(stored([5], None, prompt[:8], block_size=8))))  # another block size
    assert view.matches(prompt, ["a", "b"]) == {"a": 2, "b": 0} and view.held("a") == 2


def test_memory_is_bounded_per_replica_oldest_stored_first_out():
    view = EngineCacheView(max_blocks_per_replica=3)
    for i in range(10):
        view.apply("a", [Stored([i], None, [i] * BLOCK, BLOCK, plain=True)])
    assert view.held("a") == 3
    assert view.matches([9] * BLOCK, ["a"]) == {"a": 1} and view.matches([0] * BLOCK, ["a"]) == {"a": 0}
    assert len(view._holders) == 3  # the chain keys went with their blocks


def test_token_block_keys_are_chained_and_the_same_in_every_process():
    import os
    import subprocess
    import sys

    keys = list(token_block_keys(list(range(10)), 4))
    assert len(keys) == 2 and keys[0] != keys[1]
    assert next(token_block_keys([0, 1, 2, 3, 9, 9, 9, 9], 4)) == keys[0]
    code = (
        "from modelplex_kit.pools.kv_events import token_block_keys;print(list(token_block_keys(list(range(10)), 4)))"
    )
    runs = {
        subprocess.run(
            [sys.executable, "-c", code], env=os.environ | {"PYTHONHASHSEED": s}, capture_output=True, text=True
        ).stdout
        for s in ("1", "2")
    }
    assert runs == {f"{keys}\n"}


def test_a_publishers_address_is_its_replicas_host_at_the_events_port():
    assert events_address("10.0.0.7:8000", 5557) == "tcp://10.0.0.7:5557"
    assert events_address("vllm-1.vllm.ns.svc:8000", 5557) == "tcp://vllm-1.vllm.ns.svc:5557"
    assert events_address("[fd00::7]:8000", 5557) == "tcp://[fd00::7]:5557"


# -- a pool following two stand-in engines' events over real ZMQ ------------------------------------
@dataclass
class StandInEngine(FakeVllm):
    """The pool tests' stand-in vLLM pod, with vLLM's /tokenize (one token per character) and a PUB socket
    on which the test publishes its KV-cache events."""

    events_port: int = 0
    tokenized: int = 0
    seq: int = 0
    socket: zmq.Socket | None = field(default=None, repr=False)

    def app(self) -> web.Application:
        async def tokenize(request: web.Request) -> web.Response:
            body = await request.json()
            self.tokenized += 1
            text = "".join(m["content"] for m in body["messages"]) if "messages" in body else body["prompt"]
            return web.json_response({"tokens": tokens_of(text), "count": len(text), "max_model_len": 4096})

        app = super().app()
        app.router.add_post("/tokenize", tokenize)
        return app

    @property
    def key(self) -> str:
        return f"{self.host}:{self.port}"

    def publish(self, *events: dict) -> None:
        assert self.socket is not None
        self.socket.send_multipart((b"", self.seq.to_bytes(8, "big"), batch(*events)))
        self.seq += 1


def tokens_of(text: str) -> list[int]:
    return [ord(c) for c in text]


@asynccontextmanager
async def engines(*replicas: StandInEngine) -> AsyncIterator[None]:
    """The replicas served (``serving``), each with its events' PUB socket bound on its own host."""
    context = zmq.Context.instance()
    async with serving(*replicas):
        for replica in replicas:
            replica.socket = context.socket(zmq.PUB)
            replica.socket.bind(f"tcp://{replica.host}:{replica.events_port}")
        try:
            yield
        finally:
            for replica in replicas:
                if replica.socket is not None:
                    replica.socket.close(linger=0)


def chat_body(text: str) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": text}]}


def request_for(text: str) -> PickRequest:
    return PickRequest(prompt=text, tokenize={"model": "m", "messages": [{"role": "user", "content": text}]})


async def test_a_prompt_goes_where_the_engines_events_say_its_prefix_is_cached():
    """Backend B has never seen the prompt (no shared picks): the events of engine 2, filled by requests
    of another backend, send it there; a prompt nobody cached goes by load, and is not tokenized twice
    once the index knows it."""
    port = free_port()
    one, two = StandInEngine("one", events_port=port), StandInEngine("two", host="127.0.0.2", events_port=port)
    system = "You are the claims desk of a harbour insurer; answer in two sentences. " * 8
    async with engines(one, two):
        settings = PoolSettings(
            upstream_url=f"http://{one.key}/v1,http://{two.key}/v1",
            pool_kv_events_port=port,
            pool_prefix_block_chars=64,
            pool_scrape_interval_seconds=0.05,
            pool_tokenize_timeout_seconds=10,  # not the default 250 ms: a loaded machine must not change the pick
        )
        pool = OpenAIPool("kv-test", settings, timeout_seconds=10)
        try:
            await pool.ready()
            view = pool.pool._engine_cache.view
            cached = tokens_of(system)[: len(system) // BLOCK * BLOCK]
            event = stored(list(range(len(cached) // BLOCK)), None, [], block_size=BLOCK)
            event["token_ids"] = cached

            async def two_holds_it() -> bool:
                two.publish(event)  # again until the subscription is up (a PUB drops what no one hears yet)
                return view.held(two.key) > 0

            await until(two_holds_it, 10, what="engine two's events reached the view")
            picks = []
            for question in ("Is a cracked hull covered?", "And a lost anchor?"):
                text = system + question
                answer = await pool.call("chat/completions", chat_body(text), pick=request_for(text))
                picks.append(answer["choices"][0]["message"]["content"])
            assert picks == ["two", "two"]
            assert one.tokenized + two.tokenized == 1  # the second found the index already taught

            cold = "An unrelated tenant's prompt that no engine has cached yet. " * 8
            chosen = pool.pool.picker.pick(
                pool.pool.replicas, request_for(cold), view.matches(tokens_of(cold), [one.key, two.key])
            )
            assert chosen.reason == Reason.LOAD
        finally:
            await pool.close()


async def test_an_engine_that_restarts_or_drops_batches_is_forgotten_until_it_stores_again():
    port = free_port()
    one, two = StandInEngine("one", events_port=port), StandInEngine("two", host="127.0.0.2", events_port=port)
    async with engines(one, two):
        settings = PoolSettings(upstream_url=f"http://{one.key}/v1,http://{two.key}/v1", pool_kv_events_port=port)
        pool = OpenAIPool("kv-test-gap", settings, timeout_seconds=10)
        try:
            await pool.ready()
            view = pool.pool._engine_cache.view

            async def stored_on_one(block: int) -> bool:
                one.publish(stored([block], None, [block] * BLOCK))
                return view.matches([block] * BLOCK, [one.key]) == {one.key: 1}

            await until(lambda: stored_on_one(1), 10, what="engine one's events reached the view")
            one.seq += 5  # five batches lost
            await until(lambda: stored_on_one(2), 10, what="the next batch arrived")
            assert view.matches([1] * BLOCK, [one.key]) == {one.key: 0}  # what came before the gap is gone
            # A batch that cannot be read may have removed anything: the same.
            assert one.socket is not None
            one.socket.send_multipart((b"", one.seq.to_bytes(8, "big"), b"\xc1 not msgpack"))
            one.seq += 1
            await until(lambda: view.held(one.key) == 0, 10, what="the undecodable batch cleared the view")
        finally:
            await pool.close()
