"""The e2e completions and models acceptance tests, unchanged, against a real vLLM."""

from __future__ import annotations

import pytest

from tests.e2e import test_completions_and_models as e2e
from tests.e2e.test_completions_and_models import *  # noqa: F403 - the same tests, collected again here

pytestmark = pytest.mark.vllm


# Wrapped, not re-marked: a mark on the imported function would reach the e2e module too.
@pytest.mark.xfail(
    strict=True,
    reason="a known difference: vLLM tokenizes control-token text in a raw completions prompt as control "
    "tokens (OpenAI and the local engine keep it text), and takes no per-request switch for it",
)
def test_special_tokens_in_a_raw_prompt_stay_text(client):
    e2e.test_special_tokens_in_a_raw_prompt_stay_text(client)
