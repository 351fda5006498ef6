"""The e2e completions and models acceptance tests, unchanged, against a real vLLM."""

from __future__ import annotations

import pytest

from tests.e2e.test_completions_and_models import *  # noqa: F403 - the same tests, collected again here

pytestmark = pytest.mark.vllm
