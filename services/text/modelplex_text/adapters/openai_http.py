"""The remote engine: OpenAI-compatible HTTP servers (vLLM pods), one or a pool of replicas.

The upstream already speaks our API's dialect, so the adapter only re-encodes the
request as OpenAI JSON (``openai_wire``), streamed for GenerateStream and one
non-streaming call for Generate, over the shared pool of upstream clients
(``modelplex_kit.pools.http``: the replica picked by load, prompt prefix and session;
each replica's ``modelplex_kit.openai_upstream``: connections, SSE, error mapping).
Closing the HTTP response is how an abandoned request gets aborted upstream: vLLM
stops generating when its client disconnects.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

from modelplex.v1 import catalog_pb2, text_pb2
from modelplex_kit.errors import unavailable
from modelplex_kit.openai_upstream import usage_of
from modelplex_kit.pools.adapters import AdapterRef
from modelplex_kit.pools.http import OpenAIPool
from modelplex_text.adapters.openai_wire import ChoiceTranslator, as_chunk_choice, pick_request, upstream_request
from modelplex_text.engine import EngineEvent
from modelplex_text.settings import OpenAISettings

# The name the zero adapter is loaded under upstream (never a catalog id: those are the adapters' names).
ZERO_ADAPTER = "modelplex-zero-lora"
# Appended to an adapter's upstream name where it is the base's served name.
_CLASH_SUFFIX = "-lora"


class OpenAIHttpEngine:
    # Everything the protocol can express; the catalog entry narrows it per model.
    capabilities = catalog_pb2.TextCapabilities(
        chat=True,
        completions=True,
        tool_use=True,
        vision=True,
        json_schema=True,
        prompt_caching=True,
        logprobs=True,
        multiple_choices=True,
    )

    def __init__(self, settings: OpenAISettings) -> None:
        if not settings.upstream_url:
            raise ValueError("engine=openai needs MODELPLEX_TEXT_UPSTREAM_URL (e.g. http://vllm:8000/v1)")
        self._model = settings.upstream_model
        self._zero_adapter = AdapterRef(ZERO_ADAPTER, settings.zero_adapter) if settings.zero_adapter else None
        self._upstream = OpenAIPool(
            "text",
            settings,
            settings.upstream_api_key.get_secret_value(),
            max_connections=settings.upstream_max_connections,
            timeout_seconds=settings.upstream_timeout_seconds,
        )

    async def ready(self) -> bool:
        return await self._upstream.ready()

    def _adapter(self, request: text_pb2.GenerateRequest) -> AdapterRef | None:
        """The LoRA adapter the request runs under upstream: the one it names; for the base model, the zero
        adapter where one is configured (it keeps vLLM's CPU path from running the base under another)."""
        if request.HasField("adapter"):
            name = request.adapter.name
            # vLLM refuses an adapter named as its served model ("conflicts with a served base model"): an adapter
            # may take the id the base is served under upstream (a catalog that lists the base under another id).
            return AdapterRef(f"{name}{_CLASH_SUFFIX}" if name == self._model else name, request.adapter.source)
        return self._zero_adapter

    def _model_name(self, request: text_pb2.GenerateRequest, adapter: AdapterRef | None) -> str:
        return adapter.name if adapter is not None else self._model or request.model

    async def close(self) -> None:
        await self._upstream.close()

    async def stream(
        self, request: text_pb2.GenerateRequest, *, incremental: bool = True
    ) -> AsyncIterator[EngineEvent]:
        if not incremental:
            async for event in self._complete(request):
                yield event
            return
        adapter = self._adapter(request)
        path, body = upstream_request(request, self._model_name(request, adapter))
        translate = ChoiceTranslator(request)
        usage, streamed = None, 0
        pick = pick_request(request, body, adapter)
        async with aclosing(self._upstream.events(path, body, pick=pick)) as events:
            async for event in events:
                usage = event.get("usage") or usage
                for choice in event.get("choices") or ():
                    for delta in translate(choice):
                        streamed += bool(delta.text or delta.tool_calls)
                        yield delta
        yield usage_of(usage, streamed)

    async def _complete(self, request: text_pb2.GenerateRequest) -> AsyncIterator[EngineEvent]:
        """One non-streaming upstream call: a whole answer costs one JSON parse, not one per token."""
        adapter = self._adapter(request)
        path, body = upstream_request(request, self._model_name(request, adapter), stream=False)
        answer = await self._upstream.call(path, body, pick=pick_request(request, body, adapter))
        if not isinstance(answer.get("choices"), list):
            raise unavailable("The model server sent a malformed answer; retry shortly.")
        translate = ChoiceTranslator(request)
        for choice in answer["choices"]:
            for delta in translate(as_chunk_choice(choice)):
                yield delta
        yield usage_of(answer.get("usage"))
