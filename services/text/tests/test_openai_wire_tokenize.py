"""The body the openai adapter gives an engine pool for vLLM's /tokenize (pools following KV-cache events)."""

from __future__ import annotations

from modelplex_text.adapters.openai_wire import tokenize_body


def test_a_chat_is_tokenized_as_sent_with_its_tools_and_the_generation_prompt():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": tools, "max_tokens": 3}
    assert tokenize_body(body) == {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "add_generation_prompt": True,
        "tools": tools,
    }
    assert tokenize_body({"model": "m", "prompt": "once upon"}) == {"model": "m", "prompt": "once upon"}


def test_a_chat_with_an_image_is_not_tokenized():
    """The engine would fetch and encode the image to tokenize it, and blocks holding one never match by tokens."""
    parts = [{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]
    assert tokenize_body({"model": "m", "messages": [{"role": "user", "content": parts}]}) is None
    text_parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    assert tokenize_body({"model": "m", "messages": [{"role": "user", "content": text_parts}]}) is not None
