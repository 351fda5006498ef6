"""The e2e logprobs acceptance tests, unchanged, against a real vLLM (which computes its own)."""

from __future__ import annotations

import pytest

from tests.e2e import test_logprobs as e2e
from tests.e2e.test_logprobs import *  # noqa: F403 - the same tests, collected again here

pytestmark = pytest.mark.vllm


# Wrapped, not re-marked: a mark on the imported function would reach the e2e module too.
@pytest.mark.xfail(
    strict=True,
    reason="a known difference: with echo, vLLM scores the prompt's tokens too (as OpenAI's legacy API "
    "does, offsets from 0); the local engine scores only generated tokens",
)
def test_echoed_completion_offsets_start_after_the_prompt(client):
    e2e.test_echoed_completion_offsets_start_after_the_prompt(client)
