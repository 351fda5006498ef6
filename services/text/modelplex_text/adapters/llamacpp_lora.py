"""LoRA adapters on the embedded llama.cpp engine: GGUF adapters loaded on demand, kept by last use.

A request naming an adapter (``GenerateRequest.adapter``, the catalog's adapter entry) gets it here:
loaded from its ``source`` (a GGUF LoRA file, e.g. made by llama.cpp's ``convert_lora_to_gguf.py``
from a PEFT adapter) against the engine's model the first time, then shared by every request that
names it. At most ``max_loras`` stay loaded; past that the least recently used one that no sequence
is using is let go (its memory is freed by the scheduler thread, the only user of the context).

What llama.cpp can and cannot do: an adapter is applied per context (``llama_set_adapters_lora``),
not per sequence, so one ``llama_decode`` runs one adapter set. The scheduler decodes each step's
sequences in one batch per adapter (the base being one group): requests for different adapters of
the base run concurrently, each gaining a token per step, at the cost of one decode call per distinct
adapter in the step rather than one in all. A sequence's cached prefix is reused only under the same
adapter (the KV cells of a prompt differ per adapter).
"""

from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import llama_cpp

from modelplex.v1 import text_pb2
from modelplex_kit.errors import invalid

log = logging.getLogger(__name__)


@dataclass(eq=False)
class LoadedLora:
    """One adapter loaded against the model: its name, and the native handle the scheduler sets."""

    key: str  # name and source: a reload of the same name from elsewhere is another adapter
    name: str
    handle: llama_cpp.llama_adapter_lora_p
    users: int = 0  # sequences in flight under it (guarded by the library's lock)


class LoraLibrary:
    def __init__(self, model: llama_cpp.llama_model_p, *, max_loras: int, max_rank: int) -> None:
        self._model = model
        self._max_loras = max_loras
        self._max_rank = max_rank
        self._loaded: collections.OrderedDict[str, LoadedLora] = collections.OrderedDict()  # oldest use first
        self._released: list[LoadedLora] = []  # let go, to be freed by the scheduler thread
        self._lock = threading.Lock()

    def acquire(self, adapter: text_pb2.LoraAdapter) -> LoadedLora:
        """The adapter, loaded if it was not (blocking: call off the event loop); the caller releases it.
        A 400 (param ``model``) when it cannot be served: not a GGUF file, missing, rank beyond the
        engine's, or made for another model (llama.cpp refuses it)."""
        key = f"{adapter.name}\0{adapter.source}"
        with self._lock:
            lora = self._loaded.get(key)
            if lora is not None:
                self._loaded.move_to_end(key)
                lora.users += 1
                return lora
        lora = self._load(adapter, key)  # outside the lock: reading the file takes a while
        with self._lock:
            known = self._loaded.get(key)
            if known is not None:  # loaded meanwhile by another request: keep that one
                self._released.append(lora)
                lora = known
            else:
                self._loaded[key] = lora
            self._loaded.move_to_end(key)
            lora.users += 1
            self._let_go_beyond_bound()
        return lora

    def release(self, lora: LoadedLora) -> None:
        with self._lock:
            lora.users -= 1
            self._let_go_beyond_bound()

    def take_released(self) -> list[LoadedLora]:
        """Adapters to free now (on the scheduler thread, with the context's adapters cleared first)."""
        with self._lock:
            released, self._released = self._released, []
        return released

    def _let_go_beyond_bound(self) -> None:
        idle = [key for key, lora in self._loaded.items() if lora.users == 0]
        while len(self._loaded) > self._max_loras and idle:
            lora = self._loaded.pop(idle.pop(0))
            self._released.append(lora)
            log.info("LoRA adapter let go", extra={"adapter": lora.name})

    def _load(self, adapter: text_pb2.LoraAdapter, key: str) -> LoadedLora:
        name = adapter.name
        if adapter.rank > self._max_rank:
            raise _refused(name, f"its rank {adapter.rank} is above this engine's maximum {self._max_rank}")
        path = Path(adapter.source).expanduser()
        if path.suffix != ".gguf":
            raise _refused(name, "the local engine loads GGUF LoRA files (convert_lora_to_gguf.py makes one)")
        if not path.is_file():
            raise _refused(name, "its weights file is missing")
        handle = llama_cpp.llama_adapter_lora_init(self._model, str(path).encode())
        if not handle:
            raise _refused(name, "llama.cpp refused the file (not a LoRA of this model, or damaged)")
        log.info("LoRA adapter loaded", extra={"adapter": name})
        return LoadedLora(key, name, handle)


def _refused(name: str, why: str):
    return invalid(f"The adapter {name!r} cannot be served: {why}.", param="model")
