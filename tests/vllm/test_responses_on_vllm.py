"""The e2e Responses API acceptance tests (tools, structured output, stored state, background, logprobs, and
the OpenAI Agents SDK), unchanged, against a model served by a real vLLM."""

from __future__ import annotations

import pytest

from tests.e2e.test_responses import *  # noqa: F403 - the same tests, collected again here

pytestmark = pytest.mark.vllm
