"""Which LoRA adapter a request runs under upstream (the openai engine): the one it names, the zero adapter for
the base model where one is configured, and never a name vLLM refuses (its own served model's)."""

from __future__ import annotations

from modelplex.v1 import text_pb2
from modelplex_text.adapters.openai_http import ZERO_ADAPTER, OpenAIHttpEngine
from modelplex_text.adapters.openai_wire import pick_request
from modelplex_text.settings import OpenAISettings


def engine(**settings) -> OpenAIHttpEngine:
    return OpenAIHttpEngine(OpenAISettings(upstream_url="http://127.0.0.1:9/v1", upstream_model="base", **settings))


def request(adapter: str = "") -> text_pb2.GenerateRequest:
    req = text_pb2.GenerateRequest(model=adapter or "base")
    req.chat.messages.add(role="user").content.add(text="Hi")
    if adapter:
        req.adapter.CopyFrom(text_pb2.LoraAdapter(name=adapter, source=f"/adapters/{adapter}"))
    return req


def test_a_request_runs_under_its_adapter_and_the_base_under_the_zero_adapter_where_configured():
    plain, zeroed = engine(), engine(zero_adapter="/zero")
    assert plain._adapter(request()) is None
    assert plain._adapter(request("kiwi")).name == "kiwi"
    zero = zeroed._adapter(request())
    assert (zero.name, zero.source) == (ZERO_ADAPTER, "/zero")
    assert zeroed._model_name(request(), zero) == ZERO_ADAPTER


def test_an_adapter_named_as_the_served_base_model_is_renamed_upstream():
    clashing = engine()._adapter(request("base"))
    assert clashing.name != "base" and clashing.source == "/adapters/base"


def test_the_same_prompt_under_another_adapter_is_another_prefix_and_is_not_tokenized():
    base = pick_request(request(), {"model": "base", "messages": []})
    kiwi = engine()._adapter(request("kiwi"))
    under = pick_request(request("kiwi"), {"model": "kiwi", "messages": []}, kiwi)
    assert under.prompt != base.prompt and under.prompt.endswith(base.prompt)
    assert under.tokenize is None and base.tokenize is not None and under.adapter == kiwi
